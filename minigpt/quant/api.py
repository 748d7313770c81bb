"""The quantize_ transform, its configs, and quantized checkpoints (safetensors).

A quantized checkpoint directory is a normal model directory (``config.json``
+ ``model.safetensors``) whose safetensors header carries one extra metadata
entry, ``minigpt_quant``: JSON mapping each quantized module name to its format
and block size. Loading builds the model from the config, swaps those modules
for empty :class:`~minigpt.nn.quant_linear.QuantLinear` layers of the right
shapes, then copies the tensors in (safetensors: no pickle, nothing executes).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from minigpt.nn.quant_linear import QuantLinear

QUANT_METADATA_KEY = "minigpt_quant"
QUANT_METHODS = ("rtn", "mse", "gptq")


@dataclass(frozen=True)
class QuantConfig:
    """Which weight format to use: ``fmt`` in int8/int4/nf4, its block size, and
    ``act_quant`` (None, or "int8" for dynamic per-row int8 activations)."""

    fmt: str = "int8"
    block: int = 0
    act_quant: str | None = None


def _check_act_quant(act_quant: str | None) -> None:
    if act_quant not in (None, "int8"):
        raise ValueError(f"act_quant must be None or 'int8', got {act_quant!r}")


def Int8WeightOnly(act_quant: str | None = None) -> QuantConfig:  # noqa: N802 -- as in torchao
    """int8 weights, one symmetric scale per output channel (~1 byte/weight).

    ``act_quant="int8"`` also rounds activations to int8 per row at run time
    (integer dot products: faster, slightly less exact).
    """
    _check_act_quant(act_quant)
    return QuantConfig("int8", 0, act_quant)


def Int4WeightOnly(group_size: int = 64, act_quant: str | None = None) -> QuantConfig:  # noqa: N802
    """int4 weights, asymmetric scale + zero point per group of 32/64/128 inputs.

    ``act_quant="int8"``: dynamic per-row int8 activations, as in :func:`Int8WeightOnly`.
    """
    if group_size not in (32, 64, 128):
        raise ValueError(f"group_size must be 32, 64 or 128, got {group_size}")
    _check_act_quant(act_quant)
    return QuantConfig("int4", group_size, act_quant)


def NF4(block_size: int = 64) -> QuantConfig:  # noqa: N802
    """4-bit normal-float weights with an absmax per block (QLoRA's base format)."""
    if block_size <= 0 or block_size % 32:
        raise ValueError(f"block_size must be a positive multiple of 32, got {block_size}")
    return QuantConfig("nf4", block_size)


def _default_filter(name: str, module: nn.Module) -> bool:
    return name.split(".")[-1] != "lm_head"


def quantize_(
    model: nn.Module,
    config: QuantConfig,
    *,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    include_lm_head: bool = False,
    calibration: torch.Tensor | Iterable[object] | None = None,
    method: str | None = None,
) -> nn.Module:
    """Replace ``nn.Linear`` layers of ``model`` by :class:`QuantLinear`, in place.

    Args:
        model: any module; its linear layers are found by ``named_modules()``.
        config: :func:`Int8WeightOnly`, :func:`Int4WeightOnly` or :func:`NF4`.
        filter_fn: ``(name, linear) -> bool``; only layers for which it returns
            True are quantized (default: all but ``lm_head``).
        include_lm_head: also quantize layers named ``lm_head`` (ignored when
            ``filter_fn`` is given).
        calibration: model inputs (a tensor of token ids, or an iterable of
            batches) run once through the float model to measure what each
            layer's inputs look like; needed by ``method="gptq"``, optional
            for ``"mse"``. Use different text from what you evaluate on.
        method: how weights are rounded (all give the same packed format):

            * ``"rtn"``: round to nearest on each group's [min, max] range.
            * ``"mse"``: search each group's scale and zero point for the
              lowest error (:mod:`minigpt.quant.search`); with
              ``calibration`` the error of input channel j is weighted by
              ``E[x_j^2]`` (activation-aware), without it plain weight MSE.
            * ``"gptq"``: GPTQ (:mod:`minigpt.quant.gptq`): rounds columns
              one at a time and corrects the rest for the error, with
              activation-weighted searched group parameters; the most
              accurate, needs ``calibration``.

            Default: ``"gptq"`` when ``calibration`` is given, else ``"rtn"``.

    Layers whose input size is not a multiple of the block size cannot use a
    4-bit format; they stay in float and a warning names them.

    Returns:
        ``model`` itself (modified), for chaining.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, QuantConfig):
        raise TypeError("config must be Int8WeightOnly(), Int4WeightOnly(...) or NF4(...)")
    if method is None:
        method = "rtn" if calibration is None else "gptq"
    if method not in QUANT_METHODS:
        raise ValueError(f"method must be one of {QUANT_METHODS}, got {method!r}")
    if method == "gptq" and calibration is None:
        raise ValueError("method='gptq' needs calibration inputs (calibration=batches)")
    if method == "rtn" and calibration is not None:
        raise ValueError("method='rtn' uses no calibration; pass method='gptq' or 'mse'")
    if filter_fn is None:
        filter_fn = (lambda n, m: True) if include_lm_head else _default_filter
    targets = [
        (name, mod)
        for name, mod in model.named_modules()
        if type(mod) is nn.Linear and filter_fn(name, mod)
    ]
    skipped = [
        name for name, linear in targets if config.block and linear.in_features % config.block
    ]
    targets = [(name, linear) for name, linear in targets if name not in skipped]
    if calibration is not None:
        from minigpt.quant.gptq import gptq_quantize_linears

        new_layers = gptq_quantize_linears(
            model,
            dict(targets),
            config.fmt,
            config.block or 64,
            calibration,
            config.act_quant,
            method=method,
        )
    elif method == "mse":
        from minigpt.quant.gptq import quant_linear_from_weight
        from minigpt.quant.search import mse_quantize_weight

        new_layers = {
            name: quant_linear_from_weight(
                linear,
                mse_quantize_weight(linear.weight, config.fmt, config.block or 64),
                config.act_quant,
            )
            for name, linear in targets
        }
    else:
        new_layers = {
            name: QuantLinear.from_linear(linear, config.fmt, config.block or 64, config.act_quant)
            for name, linear in targets
        }
    for name, new in new_layers.items():
        _set_module(model, name, new)
    if skipped:
        warnings.warn(
            f"not quantized (in_features not a multiple of {config.block}): {skipped}",
            stacklevel=2,
        )
    return model


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantized_modules(model: nn.Module) -> dict[str, dict[str, int | str]]:
    """``{module name: {"fmt": ..., "block": ...}}`` for every QuantLinear in ``model``
    (plus ``"act_quant"`` where dynamic activation quantization is on)."""
    return {
        name: {"fmt": m.fmt, "block": m.block} | ({"act_quant": m.act_quant} if m.act_quant else {})
        for name, m in model.named_modules()
        if isinstance(m, QuantLinear)
    }


def _dedup_tied(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share memory: keep the first name of each
    state, seen, out = model.state_dict(), set(), {}
    for k, v in state.items():
        key = (v.data_ptr(), v.shape, v.dtype) if v.numel() else (k,)
        if key in seen:
            continue
        seen.add(key)
        out[k] = v.detach().contiguous()
    return out


def save_quantized(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write a quantized model to ``directory`` (``config.json`` + ``model.safetensors``).

    For our GPT the config is written too, so :func:`load_quantized` (and
    ``minigpt generate``) can rebuild it; for other modules only the weights
    file is written and :func:`load_quantized` needs a model skeleton.
    """
    from minigpt.model.io import WEIGHTS_NAME, save_tensors

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", QUANT_METADATA_KEY: json.dumps(quantized_modules(model))}
    save_tensors(_dedup_tied(model), directory / WEIGHTS_NAME, metadata=meta)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save"):
        config.save(directory / "config.json")
    return directory


def is_quantized_checkpoint(directory: str | os.PathLike) -> bool:
    """True when ``directory/model.safetensors`` was written by :func:`save_quantized`."""
    path = Path(directory) / "model.safetensors"
    if not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as f:
        return QUANT_METADATA_KEY in (f.metadata() or {})


def load_quantized(directory: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Load a checkpoint written by :func:`save_quantized`, in eval mode.

    Args:
        directory: the checkpoint directory.
        model: a float skeleton of the same architecture to load into (any
            nn.Module); default: our GPT built from ``config.json``.
    """
    from minigpt.model.io import WEIGHTS_NAME, load_tensors

    directory = Path(directory)
    path = directory / WEIGHTS_NAME
    if not is_quantized_checkpoint(directory):
        raise ValueError(f"{path} is not a quantized MiniGPT checkpoint")
    with safe_open(str(path), framework="pt") as f:
        layout = json.loads(f.metadata()[QUANT_METADATA_KEY])
    if model is None:
        from minigpt.model.config import GPTConfig
        from minigpt.model.gpt import GPT

        config = GPTConfig.load(directory / "config.json")
        with torch.device("meta"):
            model = GPT(config)
        model = model.to_empty(device="cpu")
        if config.tie_embeddings:
            model.lm_head.weight = model.embed.weight
    tensors = load_tensors(path)
    float_dtype = next((v.dtype for v in tensors.values() if v.is_floating_point()), None)
    # float parameters take the saved dtype; QuantLinear buffers keep their own
    # dtypes (they are created after this cast)
    if float_dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = model.to(float_dtype)
    for name, spec in layout.items():
        old = model.get_submodule(name)
        if not isinstance(old, nn.Linear):
            raise ValueError(f"checkpoint quantizes {name!r}, which is not a Linear in the model")
        new = QuantLinear(
            old.in_features,
            old.out_features,
            spec["fmt"],
            spec["block"] or 64,
            old.bias is not None,
            old.weight.dtype,
            act_quant=spec.get("act_quant"),
        )
        _set_module(model, name, new)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # tied weights were saved once: their other names are "missing" but shared
    state_names = set(_dedup_tied(model))
    really_missing = [k for k in missing if k in state_names]
    if really_missing or unexpected:
        raise ValueError(
            f"{path} does not match the model: missing {really_missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return model.eval()


def copy_tokenizer(source: Path, directory: Path) -> None:
    """Copy ``tokenizer.json`` beside the weights (or from the run dir above)."""
    for candidate in (source / "tokenizer.json", source.parent / "tokenizer.json"):
        if candidate.is_file():
            shutil.copyfile(candidate, directory / "tokenizer.json")
            return
