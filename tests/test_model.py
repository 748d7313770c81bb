"""GPT model: config, shapes, loss, KV cache equivalence, variants, checkpointing,
torch.compile, and model directory save/load with its error cases."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from minigpt.infer import KVCache
from minigpt.model import GPT, PRESETS, GPTConfig
from minigpt.model.io import load_model, save_model

VARIANTS = {
    "llama": dict(),
    "gqa_untied": dict(n_kv_head=1, tie_embeddings=False),
    "gpt2": dict(norm="layernorm", mlp="gelu", pos="learned", bias=True),
}


def tiny_config(**overrides) -> GPTConfig:
    base = dict(vocab_size=61, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=48)
    return GPTConfig(**{**base, **overrides})


def test_presets_span_1m_to_125m():
    sizes = {name: GPT(GPTConfig.preset(name)).num_parameters() for name in ("nano", "base")}
    assert 0.8e6 < sizes["nano"] < 2e6
    assert 100e6 < sizes["base"] < 150e6
    assert set(PRESETS) >= {"nano", "micro", "tiny", "small", "base"}
    assert GPTConfig.preset("tiny", vocab_size=123).vocab_size == 123


def test_config_roundtrip_and_errors(tmp_path):
    cfg = tiny_config(rope_theta=5e5)
    cfg.save(tmp_path / "c.json")
    assert GPTConfig.load(tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match="n_layers"):
        GPTConfig.from_dict({**cfg.to_dict(), "n_layers": 3})
    with pytest.raises(ValueError, match="unknown preset"):
        GPTConfig.preset("huge")
    with pytest.raises(ValueError, match="n_kv_head"):
        tiny_config(n_kv_head=3)
    with pytest.raises(ValueError, match="norm"):
        tiny_config(norm="batchnorm")
    (tmp_path / "bad.json").write_text('{"vocab_size": 3')
    with pytest.raises(ValueError, match="not valid JSON"):
        GPTConfig.load(tmp_path / "bad.json")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_loss_and_kv_cache(variant):
    model = GPT(tiny_config(**VARIANTS[variant])).eval()
    idx = torch.randint(0, 61, (3, 20))
    logits = model(idx)
    assert logits.shape == (3, 20, 61)
    # loss == cross-entropy of the logits
    loss = model(idx[:, :-1], idx[:, 1:])
    ref = F.cross_entropy(model(idx[:, :-1]).reshape(-1, 61), idx[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    # causal: changing a later token never changes earlier logits
    idx2 = idx.clone()
    idx2[:, 10] = (idx2[:, 10] + 1) % 61
    torch.testing.assert_close(model(idx2)[:, :10], logits[:, :10])
    # KV cache: a prefill of 7 then one token at a time gives the same logits
    cache = KVCache.for_model(model, 3, 32)
    parts = [model(idx[:, :7], kv_cache=cache)]
    parts += [model(idx[:, t : t + 1], kv_cache=cache) for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(parts, 1), logits, atol=1e-5, rtol=1e-5)
    assert cache.seqlens.tolist() == [20, 20, 20]


def test_kv_cache_rows_of_different_lengths():
    model = GPT(tiny_config()).eval()
    a, b = torch.randint(0, 61, (1, 9)), torch.randint(0, 61, (1, 4))
    cache = KVCache.for_model(model, 2, 16)
    padded = torch.cat([a, torch.cat([b, torch.zeros(1, 5, dtype=torch.long)], 1)])
    model(padded, kv_cache=cache)
    cache.seqlens = torch.tensor([9, 4])
    nxt = torch.randint(0, 61, (2, 1))
    step = model(nxt, kv_cache=cache)[:, -1]
    torch.testing.assert_close(step[0], model(torch.cat([a, nxt[:1]], 1))[0, -1])
    torch.testing.assert_close(step[1], model(torch.cat([b, nxt[1:]], 1))[0, -1])


def test_ignore_index_and_backward_with_checkpointing():
    cfg = tiny_config(gradient_checkpointing=True)
    model = GPT(cfg).train()
    plain = GPT(tiny_config()).train()
    plain.load_state_dict(model.state_dict())
    idx = torch.randint(0, 61, (2, 12))
    targets = idx.clone()
    targets[:, :3] = -100
    losses, grads = [], []
    for m in (model, plain):
        loss = m(idx, targets)
        loss.backward()
        losses.append(loss)
        grads.append(m.blocks[0].attn.qkv_proj.weight.grad)
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1])
    assert all(p.grad is not None for p in model.parameters())


def test_torch_compile_matches_eager():
    model = GPT(tiny_config()).eval()
    idx = torch.randint(0, 61, (2, 16))
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(idx), model(idx), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled(idx, idx), model(idx, idx), atol=1e-5, rtol=1e-5)


def test_bad_input():
    model = GPT(tiny_config()).eval()
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.tensor([[0, 61]]))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))


def test_save_load_roundtrip_and_errors(tmp_path):
    model = GPT(tiny_config()).eval()
    save_model(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    loaded = load_model(tmp_path / "m")
    idx = torch.randint(0, 61, (2, 10))
    torch.testing.assert_close(loaded(idx), model(idx), atol=0, rtol=0)
    assert loaded.lm_head.weight is loaded.embed.weight
    assert load_model(tmp_path / "m", dtype=torch.bfloat16).embed.weight.dtype == torch.bfloat16

    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nothing")
    # a checkpoint from another config
    save_model(GPT(tiny_config(d_model=64)), tmp_path / "other")
    (tmp_path / "m" / "model.safetensors").write_bytes(
        (tmp_path / "other" / "model.safetensors").read_bytes()
    )
    with pytest.raises(ValueError, match="do not match the model config"):
        load_model(tmp_path / "m")
    # truncated weights
    data = (tmp_path / "other" / "model.safetensors").read_bytes()
    (tmp_path / "other" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_model(tmp_path / "other")
    # missing weights, unknown config key
    (tmp_path / "other" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="weights"):
        load_model(tmp_path / "other")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "n_embd": 3}))
    with pytest.raises(ValueError, match="n_embd"):
        load_model(tmp_path / "m")


def test_bf16_autocast_training_step():
    # the trainer runs forward/backward under autocast: sub-layers return bf16 while
    # the residual stream and the parameters stay float32
    model = GPT(tiny_config())
    idx = torch.randint(0, 61, (2, 12))
    reference = model(idx, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, idx)
        assert model(idx).dtype == torch.bfloat16
    loss.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference, atol=0.05, rtol=0.02)  # bf16 matmuls
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
