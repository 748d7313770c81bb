"""minigpt.quant -- quantize a model's linear layers in place, save and load it.

    from minigpt.quant import quantize_, Int8WeightOnly, Int4WeightOnly, NF4
    quantize_(model, Int4WeightOnly(group_size=64))   # every nn.Linear -> QuantLinear

Weight-only quantization keeps activations in float and stores each linear
layer's weight in 8 or 4 bits. Decoding one token reads every weight once, so
its speed is set by memory bandwidth: int8 reads 4x fewer bytes than fp32, int4
about 7x fewer. Which layers to convert: by default every ``nn.Linear`` except
the output head (``lm_head``), which is the most sensitive to rounding and, in
models with tied embeddings, shares its weight with the token embedding; pass
``include_lm_head=True`` or your own ``filter_fn`` to choose. Works on any
``nn.Module`` (our GPT, a Hugging Face model, a plain MLP).

How the 4-bit codes are chosen: ``method="rtn"`` (round to nearest, the
default), ``"mse"`` (searched group scales/zeros, activation-weighted when
``calibration=`` inputs are given) or ``"gptq"`` (error-correcting, needs
``calibration``; the most accurate). See docs/quantization.md.
"""

from minigpt.quant.api import (
    NF4,
    Int4WeightOnly,
    Int8WeightOnly,
    QuantConfig,
    is_quantized_checkpoint,
    load_quantized,
    quantize_,
    quantized_modules,
    save_quantized,
)

__all__ = [
    "NF4",
    "Int4WeightOnly",
    "Int8WeightOnly",
    "QuantConfig",
    "is_quantized_checkpoint",
    "load_quantized",
    "quantize_",
    "quantized_modules",
    "save_quantized",
]
