"""Trainer core: schedule, weight-decay groups, clipping, accumulation, precision,
evaluation (bits per byte), budgets, and exact resume."""

from __future__ import annotations

import math

import pytest
import torch
from train_testing import TinyLM, ToyBatches, one_thread

from minigpt.train import OptimConfig, TrainConfig, Trainer, param_groups, warmup_cosine_lr
from minigpt.train.schedule import step_progress

_one_thread = pytest.fixture(autouse=True)(one_thread)


def make_trainer(model=None, batches=None, run_dir=None, **train_kw) -> Trainer:
    optim_kw = train_kw.pop("optim", {})
    cfg = TrainConfig(
        **{"max_steps": 10, "progress": False, "device": "cpu", "precision": "fp32", **train_kw}
    )
    optim = OptimConfig(**{"lr": 1e-2, "warmup_steps": 2, **optim_kw})
    return Trainer(
        model if model is not None else TinyLM(),
        cfg,
        optim,
        batches if batches is not None else ToyBatches(),
        run_dir=run_dir,
    )


# ---- schedule ----------------------------------------------------------------------


def test_schedule_warmup_then_cosine():
    kw = dict(max_lr=1.0, min_lr=0.1, warmup_steps=4)
    assert [warmup_cosine_lr(s, 0.0, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine_lr(4, 0.0, **kw) == pytest.approx(1.0)
    assert warmup_cosine_lr(9, 0.5, **kw) == pytest.approx(0.55)  # halfway: mean of the two
    assert warmup_cosine_lr(9, 1.0, **kw) == pytest.approx(0.1)
    assert warmup_cosine_lr(9, 7.0, **kw) == pytest.approx(0.1)  # clamped past the end
    lrs = [warmup_cosine_lr(s, step_progress(s, 4, 20), **kw) for s in range(4, 21)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay after warmup
    assert lrs[-1] == pytest.approx(0.1)


def test_schedule_bad_arguments():
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine_lr(0, 0.0, max_lr=1.0, min_lr=0.0, warmup_steps=-1)
    with pytest.raises(ValueError, match="min_lr"):
        warmup_cosine_lr(0, 0.0, max_lr=1.0, min_lr=2.0, warmup_steps=0)


def test_trainer_follows_schedule():
    trainer = make_trainer(max_steps=6, optim={"lr": 0.5, "warmup_steps": 2, "min_lr_ratio": 0.0})
    lrs = [trainer.train_step().lr for _ in range(6)]
    assert lrs[:2] == [0.25, 0.5]
    assert lrs[2] == pytest.approx(0.5)
    assert lrs[-1] == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))


# ---- optimizer -----------------------------------------------------------------------


def test_weight_decay_groups_skip_norms_biases_embeddings():
    model = TinyLM()
    decay, no_decay = param_groups(model, 0.1)
    decayed = {id(p) for p in decay["params"]}
    assert id(model.mlp[0].weight) in decayed and id(model.mlp[2].weight) in decayed
    for p in (model.embed.weight, model.norm.weight, model.norm.bias, model.mlp[0].bias):
        assert id(p) not in decayed
    assert no_decay["weight_decay"] == 0.0
    n_total = len(decay["params"]) + len(no_decay["params"])
    assert n_total == len(list(model.parameters()))  # the tied head counted once
    with_emb = param_groups(model, 0.1, decay_embeddings=True)[0]
    assert id(model.embed.weight) in {id(p) for p in with_emb["params"]}


@pytest.mark.parametrize("impl", ["fused", "foreach", "loop"])
def test_optimizer_implementations_agree(impl):
    torch.manual_seed(0)
    ref = TinyLM(dropout=0.0)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    results = []
    for which in ("loop", impl):
        model = TinyLM(dropout=0.0)
        model.load_state_dict(state)
        trainer = make_trainer(model, max_steps=3, optim={"impl": which})
        for _ in range(3):
            trainer.train_step()
        results.append(model.mlp[0].weight.detach().clone())
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=1e-5)


def test_bad_optimizer_impl():
    with pytest.raises(ValueError, match="optim.impl"):
        make_trainer(optim={"impl": "magic"})


# ---- clipping and accumulation ---------------------------------------------------------


def _capture_step_grad_norms(trainer: Trainer) -> list[float]:
    norms: list[float] = []
    original = trainer.optimizer.step

    def step(*args, **kwargs):
        grads = [p.grad for g in trainer.optimizer.param_groups for p in g["params"]]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        return original(*args, **kwargs)

    trainer.optimizer.step = step
    return norms


def test_gradient_clipping():
    trainer = make_trainer(optim={"grad_clip": 0.05})
    seen = _capture_step_grad_norms(trainer)
    raw = [trainer.train_step().grad_norm for _ in range(3)]
    assert all(r > 0.05 for r in raw)  # the toy gradients are larger than the clip...
    assert seen == pytest.approx([0.05] * 3, rel=1e-4)  # ...so the step saw clipped ones
    unclipped = make_trainer(optim={"grad_clip": 0.0})
    seen = _capture_step_grad_norms(unclipped)
    raw = [unclipped.train_step().grad_norm for _ in range(2)]
    assert seen == pytest.approx(raw, rel=1e-5)


def test_accumulation_matches_one_big_batch():
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in TinyLM(dropout=0.0).state_dict().items()}
    big = list(zip(*[next(ToyBatches(batch_size=8, seed=s)) for s in range(3)]))

    def run(accum: int) -> torch.Tensor:
        model = TinyLM(dropout=0.0)
        model.load_state_dict(init)
        if accum == 1:
            batches = iter(zip(big[0], big[1]))
        else:  # the same rows, split in halves
            batches = iter([(x[h], y[h]) for x, y in zip(*big) for h in (slice(0, 4), slice(4, 8))])
        trainer = make_trainer(model, batches, grad_accum=accum, max_steps=3)
        losses = [trainer.train_step().loss for _ in range(3)]
        return torch.cat([p.detach().flatten() for p in model.parameters()]), losses

    params_1, losses_1 = run(1)
    params_2, losses_2 = run(2)
    assert losses_1 == pytest.approx(losses_2, rel=1e-5)
    torch.testing.assert_close(params_1, params_2, atol=1e-6, rtol=1e-5)


# ---- precision -----------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(precision):
    trainer = make_trainer(precision=precision, max_steps=20, optim={"lr": 3e-2})
    assert trainer.scaler.is_enabled() == (precision == "fp16")
    losses = [trainer.train_step().loss for _ in range(20)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) < sum(losses[:5])


def test_auto_precision_on_cpu():
    from minigpt.train.core import cpu_has_fast_bf16

    expected = "bf16" if cpu_has_fast_bf16() else "fp32"
    assert make_trainer(precision="auto").precision == expected


# ---- evaluation -------------------------------------------------------------------------


def test_evaluate_bits_per_byte():
    model = TinyLM(dropout=0.0)
    x, y = next(ToyBatches(batch_size=4, seed=9))
    y = y.clone()
    y[0, :3] = -100  # ignored targets count neither nats nor bytes
    with torch.no_grad():
        loss = model(x, y).item()
    valid = y != -100
    token_bytes = torch.arange(32) % 3 + 1  # made-up byte lengths per id
    n_bytes = token_bytes[y[valid]].sum().item()
    trainer = Trainer(
        model,
        TrainConfig(max_steps=1, progress=False, precision="fp32"),
        OptimConfig(),
        ToyBatches(),
        val_batches=lambda: [(x, y)],
        token_bytes=token_bytes,
    )
    out = trainer.evaluate()
    assert out["val_loss"] == pytest.approx(loss, rel=1e-6)
    assert out["val_ppl"] == pytest.approx(math.exp(loss), rel=1e-6)
    expected_bpb = loss * valid.sum().item() / n_bytes / math.log(2)
    assert out["val_bpb"] == pytest.approx(expected_bpb, rel=1e-6)
    # without per-token lengths, an average bytes/token gives the estimate
    trainer.token_bytes, trainer.bytes_per_token = None, 2.0
    assert trainer.evaluate()["val_bpb"] == pytest.approx(loss / 2.0 / math.log(2), rel=1e-6)


# ---- budgets ------------------------------------------------------------------------------


def test_no_budget_is_an_error():
    with pytest.raises(ValueError, match="no budget"):
        make_trainer(max_steps=0, time_budget_s=0.0)


def test_time_budget_stops_and_decays():
    trainer = make_trainer(max_steps=0, time_budget_s=0.3, optim={"warmup_steps": 0})
    summary = trainer.fit()
    assert trainer.elapsed_s >= 0.3 and summary["step"] > 0
    assert trainer.progress() == 1.0
    assert trainer.lr() == pytest.approx(trainer.optim_config.lr * 0.1)


def test_non_finite_loss_is_reported():
    class Bad(TinyLM):
        def forward(self, idx, targets=None):
            return super().forward(idx, targets) * float("nan")

    with pytest.raises(FloatingPointError, match="loss is nan"):
        make_trainer(Bad()).train_step()


# ---- exact resume ---------------------------------------------------------------------------


def test_resume_is_bit_exact(tmp_path):
    k = 5

    def fresh(seed: int, run_dir) -> Trainer:
        torch.manual_seed(seed)
        return make_trainer(
            TinyLM(dropout=0.2),
            ToyBatches(seed=3),
            run_dir=run_dir,
            max_steps=2 * k,
            optim={"warmup_steps": 3},
        )

    whole = fresh(0, None)
    losses_whole = [whole.train_step().loss for _ in range(2 * k)]

    first = fresh(0, tmp_path / "run")
    losses = [first.train_step().loss for _ in range(k)]
    ckpt = first.save_checkpoint()
    first.close()
    torch.manual_seed(999)  # whatever the RNGs did meanwhile must not matter
    second = fresh(7, tmp_path / "run")  # a different init: the checkpoint must overwrite it
    second.resume(ckpt)
    assert second.step == k and second.train_batches.step == k
    losses += [second.train_step().loss for _ in range(k)]
    second.close()

    assert losses == losses_whole  # exactly, not approximately
    for a, b in zip(whole.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)


def test_fit_writes_logs_and_checkpoints(tmp_path):
    trainer = make_trainer(
        run_dir=tmp_path, max_steps=6, log_every_steps=2, checkpoint_every_steps=2, keep_last=2
    )
    trainer.val_batches = lambda: [next(ToyBatches(seed=5))]
    summary = trainer.fit()
    trainer.close()
    assert summary["step"] == 6 and "val_loss" in summary
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert names == ["step_00000004", "step_00000006"]
    assert (tmp_path / "metrics.jsonl").read_text().count('"kind": "train"') == 3
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_time_budget_keeps_the_reserve():
    trainer = make_trainer(max_steps=0, time_budget_s=2.0, optim={"warmup_steps": 0})
    trainer.reserve_s = lambda: 1.6  # e.g. the time a final evaluation will take
    trainer.fit()
    assert 0.4 <= trainer.elapsed_s < 2.0
    assert trainer.progress() == 1.0


def test_ctrl_c_stops_between_steps_with_a_checkpoint(tmp_path):
    import os
    import signal

    trainer = make_trainer(run_dir=tmp_path, max_steps=50)
    original = trainer.train_step

    def step_then_ctrl_c():
        result = original()
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C
        return result

    trainer.train_step = step_then_ctrl_c
    summary = trainer.fit()
    trainer.close()
    assert summary["interrupted"] and summary["step"] == 3
    assert (tmp_path / "checkpoints" / "step_00000003" / "manifest.json").is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
