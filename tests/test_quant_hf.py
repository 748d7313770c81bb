"""quantize_ on Hugging Face Llama models: a tiny one built locally (fast) and
SmolLM2-135M from its GGUF file (slow: perplexity before and after)."""

from __future__ import annotations

import copy
import gzip
import math
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from minigpt.nn.quant_linear import QuantLinear
from minigpt.quant import NF4, Int4WeightOnly, Int8WeightOnly, quantize_

DATA = Path(__file__).parents[1].parent / "shared" / "data"


def _tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config).eval()


# Relative logit error vs the float model. Measured on this randomly initialized
# model (std 0.02 weights, nearly flat logits, so 4-bit noise shows fully):
# int8 0.7 %, int4 g32 10.5 %, nf4 b32 11.2 %, int8 weights + int8 activations 1.0 %.
HF_CASES = {
    "int8": (Int8WeightOnly(), 0.015),
    "int4": (Int4WeightOnly(32), 0.2),
    "nf4": (NF4(32), 0.2),
    "int8-dyn": (Int8WeightOnly(act_quant="int8"), 0.02),
}


@pytest.mark.parametrize("case", HF_CASES)
def test_quantize_hf_llama(case):
    config, max_rel = HF_CASES[case]
    model = _tiny_llama()
    idx = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        before = model(idx).logits
    linears = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    quantize_(model, config)
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    # every linear layer but the output head (the default filter)
    assert quantized == linears - {"lm_head"} and len(quantized) == 2 * 7
    assert type(model.lm_head) is nn.Linear
    with torch.no_grad():
        after = model(idx).logits
    rel = float((after - before).norm() / before.norm())
    assert 0 < rel < max_rel, f"{case}: relative logit error {rel:.4f}"
    assert (after.argmax(-1) == before.argmax(-1)).float().mean() > 0.7  # measured >= 0.82
    # and Hugging Face's own generation loop runs on the quantized model
    out = model.generate(idx[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_quantize_hf_llama_filter():
    model = _tiny_llama()
    quantize_(model, Int8WeightOnly(), filter_fn=lambda name, m: name.endswith("mlp.down_proj"))
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert quantized == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


# ---- SmolLM2-135M perplexity (slow) -------------------------------------------------

# Measured on 8 x 256 tokens of Austen; the "float" model is the GGUF's Q4_1
# weights dequantized (ppl 43.10): int8 +0.01 %, int4 g64 +23.9 %, nf4 b64 +26.5 %,
# int8 + dynamic int8 activations +2.2 %, int4 + int8 activations +29.5 %.
# The goal for int4 g64 is +10 %: plain round-to-nearest int4 does NOT
# reach it on this 135M model (weights re-quantized from an existing 4-bit grid;
# small models are the most sensitive). The limit below guards the measured
# round-to-nearest value against regressions; GPTQ with searched group
# parameters reaches the goal (test_smollm2_perplexity_gptq_int4).
PPL_LIMITS = {"int8": 0.01, "int4": 0.30, "nf4": 0.32}


def _smollm2_and_tokens(n_seq: int = 8, seq: int = 256):
    from minigpt.model.hf import import_gguf, smollm2_gguf_path

    path = smollm2_gguf_path()
    model = import_gguf(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    with gzip.open(DATA / "en" / "austen.txt.gz", "rt", encoding="utf-8") as f:
        f.read(200_000)  # skip the opening pages
        text = f.read(60_000)
    ids = torch.tensor(tok(text)["input_ids"][: n_seq * seq + 1])
    assert len(ids) == n_seq * seq + 1
    return model, ids, n_seq, seq


def _ppl(model: nn.Module, ids: torch.Tensor, n_seq: int, seq: int) -> float:
    x = ids[:-1].reshape(n_seq, seq)
    y = ids[1:].reshape(n_seq, seq)
    with torch.no_grad():
        logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    return math.exp(loss.item())


@pytest.mark.slow
def test_smollm2_perplexity_before_after():
    model, ids, n_seq, seq = _smollm2_and_tokens()
    base = _ppl(model, ids, n_seq, seq)
    assert base < 60, f"unexpected float perplexity {base:.2f}"  # measured 43.1
    results = {}
    for name, config in {
        "int8": Int8WeightOnly(),
        "int4": Int4WeightOnly(64),
        "nf4": NF4(64),
        "int8-dyn": Int8WeightOnly(act_quant="int8"),
        "int4-dyn": Int4WeightOnly(64, act_quant="int8"),
    }.items():
        q = quantize_(copy.deepcopy(model), config)
        results[name] = _ppl(q, ids, n_seq, seq) / base - 1
        print(f"SmolLM2-135M {name}: ppl {base:.3f} -> {base * (1 + results[name]):.3f} "
              f"({100 * results[name]:+.2f} %)")  # fmt: skip
    for name, limit in PPL_LIMITS.items():
        assert results[name] < limit, f"{name}: {100 * results[name]:+.2f} %"


# GPTQ int4 g64, calibrated on a different slice of Austen (2,048 tokens from
# characters 100k-195k; the evaluation text starts at 200k). Each group's scale
# and zero point are searched for the lowest error weighted by E[x_j^2] of its
# input channels (minigpt/quant/search.py), then GPTQ corrects the rounding
# error column by column. Measured: +8.9 % (the goal is +10 %);
# round-to-nearest +23.9 %, the activation-weighted search alone
# (method="mse") +13.2 %, GPTQ with min/max group parameters +23.9 %. The
# whole table: tools/smollm2_quant_ppl.py and docs/quantization.md.
GPTQ_PPL_LIMIT = 0.10


def _calibration_batches(n_tokens: int = 2048, seq: int = 256, batch: int = 4):
    from minigpt.model.hf import smollm2_gguf_path

    path = smollm2_gguf_path()
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    with gzip.open(DATA / "en" / "austen.txt.gz", "rt", encoding="utf-8") as f:
        f.read(100_000)
        text = f.read(95_000)  # ends before the evaluation slice
    ids = torch.tensor(tok(text)["input_ids"][:n_tokens])
    assert len(ids) == n_tokens
    return list(ids.reshape(-1, seq).split(batch))


@pytest.mark.slow
def test_smollm2_perplexity_gptq_int4():
    model, ids, n_seq, seq = _smollm2_and_tokens()
    base = _ppl(model, ids, n_seq, seq)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # GPTQ runs many small column ops: threads only add hand-off cost
    try:
        quantize_(model, Int4WeightOnly(64), method="gptq", calibration=_calibration_batches())
    finally:
        torch.set_num_threads(threads)
    change = _ppl(model, ids, n_seq, seq) / base - 1
    print(f"SmolLM2-135M int4 g64 GPTQ: ppl {base:.3f} -> {base * (1 + change):.3f} "
          f"({100 * change:+.2f} %)")  # fmt: skip
    assert change < GPTQ_PPL_LIMIT, f"GPTQ int4: {100 * change:+.2f} %"
