"""End-to-end decode speed of one model in fp32, bf16 and weight-only int8 / int4.

A ~30M-parameter Llama-style GPT of ours (random weights: speed does not depend
on what the weights say) generates ``NEW_TOKENS`` tokens greedily at batch 1
with :func:`minigpt.infer.generate`. Every quantized variant is timed against
the fp32 and bf16 models in the same run; ``tokens/s`` of each is recorded.
Quantized variants convert every linear layer including the output head
(``include_lm_head=True``); ``-dyn`` adds dynamic int8 activations
(``act_quant="int8"``, the AVX512-VNNI integer kernels).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from minigpt.infer import generate
from minigpt.model import GPT, GPTConfig
from minigpt.quant import Int4WeightOnly, Int8WeightOnly, quantize_

NEW_TOKENS = 32
PROMPT = [1, 504, 3458, 314, 253, 1234, 28, 6601]
VARIANTS = {
    "int8": Int8WeightOnly(),
    "int4": Int4WeightOnly(64),
    "int8-dyn": Int8WeightOnly(act_quant="int8"),
    "int4-dyn": Int4WeightOnly(64, act_quant="int8"),
}


@functools.cache
def _float_model() -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=8192,
        d_model=512,
        n_layer=8,
        n_head=8,
        n_kv_head=4,
        ffn_hidden=1408,
        max_seq_len=256,
        tie_embeddings=False,
    )
    return GPT(config).eval()


@functools.cache
def _bf16_model() -> GPT:
    return copy.deepcopy(_float_model()).to(torch.bfloat16)


def _decoder(model: GPT, new_tokens: int):
    def run():
        out = generate(model, [PROMPT], temperature=0, max_new_tokens=new_tokens)
        assert len(out[0].tokens) == new_tokens

    return run


@pytest.mark.parametrize("variant", VARIANTS)
def test_decode_quantized(compare, variant):
    fp32 = _float_model()
    bf16 = _bf16_model()
    quant = quantize_(copy.deepcopy(fp32), VARIANTS[variant], include_lm_head=True)
    new = NEW_TOKENS if not getattr(compare.benchmark, "disabled", False) else 2
    info = compare.run(
        _decoder(quant, new),
        {"fp32": _decoder(fp32, new), "bf16": _decoder(bf16, new)},
        rounds=5,
        warmup=1,
        variant=variant,
        params_M=round(sum(p.numel() for p in fp32.parameters()) / 1e6, 1),
    )
    if "time_ms" in info:
        info["tokens/s"] = {k: round(new / (v / 1e3), 1) for k, v in info["time_ms"].items()}
