"""The MoE MLP module, its GPT integration (config, aux losses, checkpointing) and the
trainer's router diagnostics."""

import json

import pytest
import torch
from kernel_testing import random_tensor

from minigpt.kernels.reference import moe as R
from minigpt.model.config import GPTConfig, MoEConfig
from minigpt.model.gpt import GPT
from minigpt.nn import MoEMLP
from minigpt.nn.moe import moe_aux_loss, moe_diagnostics


def _reference_forward(m: MoEMLP, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's output and aux loss rebuilt from the per-token reference loops."""
    logits = x.float() @ m.router.weight.float().t()
    n, e = logits.shape
    if m.routing == "expert_choice":
        cap = R.expert_capacity(n, e, m.k, m.capacity_factor)
        ids, w = R.expert_choice_routing_reference(logits, cap)
        chosen = ids
        probs = R.router_probs_reference(logits, "softmax")
    else:
        cap = None if m.capacity_factor is None else R.expert_capacity(n, e, m.k, m.capacity_factor)
        chosen, w = R.topk_routing_reference(logits, m.k, m.gate, m.renormalize)
        ids, _ = R.topk_routing_reference(logits, m.k, m.gate, m.renormalize, capacity=cap)
        probs = R.router_probs_reference(logits, m.gate)
    y = R.moe_mlp_reference(x, ids, w, m.gate_up_proj.weight, m.down_proj.weight)
    if m.shared_expert is not None:
        y = y + m.shared_expert(x)
    aux = m.aux_loss_coef * R.load_balancing_loss_reference(probs, chosen.clamp(min=0), e)
    aux = aux + m.z_loss_coef * R.router_z_loss_reference(logits)
    return y, aux


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(k=2, renormalize=True),
        dict(k=1, gate="sigmoid"),
        dict(k=4, gate="sigmoid", renormalize=True, capacity_factor=0.8),
        dict(k=1, routing="switch"),
        dict(k=1, routing="switch", capacity_factor=0.5),
        dict(k=2, routing="expert_choice"),
        dict(k=2, shared_expert_hidden=16),
    ],
    ids=["top2", "top1-sigmoid", "top4-capacity", "switch", "switch-tight", "ec", "shared"],
)
def test_moe_mlp_matches_reference(kwargs):
    torch.manual_seed(0)
    m = MoEMLP(16, 24, n_experts=8, **kwargs)
    x = random_tensor((3, 11, 16), requires_grad=True)
    y = m(x)
    x2 = x.detach().reshape(-1, 16).requires_grad_()
    y_ref, aux_ref = _reference_forward(m, x2)
    torch.testing.assert_close(y, y_ref.view(3, 11, 16), atol=2e-5, rtol=2e-5)
    # note: expert-choice aux: f_e counts picks; chosen.clamp keeps the ids' shape
    if m.routing != "expert_choice":
        torch.testing.assert_close(m.aux_loss, aux_ref)
    g = torch.randn_like(y)
    params = [p for p in m.parameters()]
    grads = torch.autograd.grad(y, [x, *params], g)
    grads_ref = torch.autograd.grad(y_ref.view(3, 11, 16), [x2, *params], g)
    torch.testing.assert_close(grads[0], grads_ref[0].view(3, 11, 16), atol=2e-5, rtol=2e-5)
    for a, b in zip(grads[1:], grads_ref[1:]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    stats = m.last_stats
    assert len(stats["tokens_per_expert"]) == 8
    assert 0.0 <= stats["drop_rate"] <= 1.0 and stats["router_entropy"] > 0


def test_switch_drops_overflow_and_dropped_tokens_output_zero():
    torch.manual_seed(0)
    m = MoEMLP(8, 16, n_experts=4, k=1, routing="switch", capacity_factor=0.25)
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0, 0] = 10.0  # every token with x[0] > 0 wants expert 0
    x = random_tensor((40, 8)).abs()
    y = m(x)
    cap = R.expert_capacity(40, 4, 1, 0.25)
    assert m.last_stats["tokens_per_expert"][0] == cap
    assert m.last_stats["drop_rate"] == pytest.approx(1 - cap / 40)
    assert (y[cap:] == 0).all() and (y[:cap] != 0).any()  # the block adds the residual


def test_aux_loss_gradient_reaches_router():
    m = MoEMLP(8, 16, n_experts=4, k=2)
    m(random_tensor((20, 8)))
    m.aux_loss.backward()
    assert m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0


def test_prune_experts_keeps_most_used():
    torch.manual_seed(0)
    m = MoEMLP(8, 16, n_experts=6, k=2)
    m.expert_usage.copy_(torch.tensor([5.0, 0.0, 9.0, 1.0, 7.0, 0.0]))
    w_before = m.gate_up_proj.weight.detach().clone()
    kept = m.prune_experts(3)
    assert kept == [0, 2, 4] and m.n_experts == 3 and m.k == 2
    assert m.router.weight.shape == (3, 8) and m.down_proj.weight.shape == (3, 8, 16)
    torch.testing.assert_close(m.gate_up_proj.weight, w_before[[0, 2, 4]])
    assert m(random_tensor((5, 8))).shape == (5, 8)
    assert m.prune_experts([1]) == [1] and m.k == 1
    with pytest.raises(ValueError, match="keep"):
        m.prune_experts(5)


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="routing"):
        MoEMLP(8, 8, routing="hash")
    with pytest.raises(ValueError, match="top-1"):
        MoEMLP(8, 8, k=2, routing="switch")
    with pytest.raises(ValueError, match="k <= n_experts"):
        MoEMLP(8, 8, n_experts=2, k=3)


def test_bf16_autocast_forward_backward():
    m = MoEMLP(16, 32, n_experts=4, k=2)
    x = random_tensor((2, 9, 16), requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert m.gate_up_proj.weight.grad.dtype == torch.float32
    ref, _ = _reference_forward(m, x.detach().reshape(-1, 16))
    torch.testing.assert_close(y.float(), ref.view(2, 9, 16), atol=3e-2, rtol=3e-2)


# ---- GPT integration -----------------------------------------------------------------------


def _moe_config(**moe) -> GPTConfig:
    return GPTConfig.preset(
        "nano", vocab_size=64, d_model=32, n_layer=2, max_seq_len=32, moe={"n_experts": 4, **moe}
    )


def test_config_round_trip_and_validation(tmp_path):
    cfg = _moe_config(k=1, routing="switch", capacity_factor=1.5, layers=[1])
    assert isinstance(cfg.moe, MoEConfig)
    cfg.save(tmp_path / "config.json")
    assert GPTConfig.load(tmp_path / "config.json") == cfg
    assert json.loads((tmp_path / "config.json").read_text())["moe"]["routing"] == "switch"
    for bad, match in [
        ({"n_experts": 0}, "n_experts"),
        ({"k": 5}, "moe.k"),
        ({"routing": "hash"}, "moe.routing"),
        ({"gate": "relu"}, "moe.gate"),
        ({"routing": "switch", "k": 2}, "top-1"),
        ({"layers": [2]}, "moe.layers"),
        ({"capacity_factor": -1}, "capacity_factor"),
        ({"aux_loss_coef": -0.1}, "aux_loss_coef"),
        ({"experts": 8}, "unknown moe option"),
    ]:
        with pytest.raises(ValueError, match=match):
            _moe_config(**bad)
    with pytest.raises(ValueError, match="swiglu"):
        GPTConfig.preset("nano", mlp="gelu", moe={})


def test_gpt_uses_moe_on_chosen_layers_and_adds_aux_loss():
    torch.manual_seed(0)
    model = GPT(_moe_config(k=2, layers=[1]))
    assert not isinstance(model.blocks[0].mlp, MoEMLP)
    assert isinstance(model.blocks[1].mlp, MoEMLP)
    idx = torch.randint(0, 64, (2, 12))
    model.train()
    loss_train = model(idx, idx)
    aux = moe_aux_loss(model)
    assert aux is not None and float(aux.detach()) > 0
    model.eval()
    loss_eval = model(idx, idx)  # validation loss is the LM loss alone
    torch.testing.assert_close(loss_train, loss_eval + aux)
    diag = moe_diagnostics(model)
    assert set(diag) == {"moe_drop_rate", "moe_router_entropy", "moe_aux_loss", "moe_load_max"}


def test_gpt_moe_gradient_checkpointing_matches():
    torch.manual_seed(0)
    cfg = _moe_config(k=2)
    model = GPT(cfg)
    idx = torch.randint(0, 64, (2, 12))
    model.train()
    model(idx, idx).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.config.gradient_checkpointing = True
    model(idx, idx).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


def test_trainer_logs_router_diagnostics(tmp_path):
    from train_testing import ToyBatches

    from minigpt.train.core import OptimConfig, TrainConfig, Trainer

    torch.manual_seed(0)
    model = GPT(_moe_config(k=2))
    trainer = Trainer(
        model,
        TrainConfig(max_steps=2, log_every_steps=1, device="cpu", precision="fp32"),
        OptimConfig(lr=1e-3, warmup_steps=0),
        ToyBatches(batch_size=2, seq_len=8, vocab_size=32),
        run_dir=tmp_path,
    )
    result = trainer.train_step()
    assert 0.0 <= result.extra["moe_drop_rate"] <= 1.0
    trainer.fit()
    trainer.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert train and "moe_router_entropy" in train[-1] and "moe_load_max" in train[-1]
