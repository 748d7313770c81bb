"""Saving and loading a model directory: ``config.json`` + ``model.safetensors``.

safetensors holds raw tensors and a JSON header, nothing executable, so loading
a file from elsewhere cannot run code (unlike pickle). Writes are atomic: the
data goes to a temp file in the same directory which is then renamed over the
target, so a crash leaves the old file or the new, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from minigpt.model.config import GPTConfig
from minigpt.model.gpt import GPT

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def model_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """The model's state dict, minus the LM head when it is tied to the embedding."""
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata=None) -> None:
    """Write tensors to a safetensors file atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict:
    """Read a safetensors file, turning a missing/truncated file into a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: the file is truncated or corrupt ({e})") from e


def save_model(model: GPT, directory: str | os.PathLike) -> Path:
    """Write ``model`` to ``directory`` (created if needed) as config.json + weights.

    Returns the directory. The weights keep the model's dtype.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(model_tensors(model), directory / WEIGHTS_NAME, metadata={"format": "pt"})
    model.config.save(directory / CONFIG_NAME)
    return directory


def tensor_mismatches(
    expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]
) -> list[str]:
    """Human-readable differences between two name -> tensor maps (names and shapes).

    Shared by :func:`check_tensors_match` and the trainer's checkpoint loader, so
    every "checkpoint from another config" error lists problems the same way.
    """
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        problems.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for name in sorted(set(expected) & set(found)):
        if expected[name].shape != found[name].shape:
            problems.append(
                f"{name} has shape {tuple(found[name].shape)}, "
                f"the config expects {tuple(expected[name].shape)}"
            )
    return problems


def check_tensors_match(model: GPT, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise ``ValueError`` listing every missing, unexpected or mis-shaped tensor."""
    problems = tensor_mismatches(model_tensors(model), tensors)
    if problems:
        raise ValueError(
            f"the weights in {source} do not match the model config (a checkpoint from "
            f"another config?): " + "; ".join(problems[:8])
        )


def load_weights(model: GPT, tensors: dict[str, torch.Tensor], source: str = "weights") -> GPT:
    """Copy ``tensors`` into ``model`` after checking names and shapes."""
    check_tensors_match(model, tensors, source)
    with torch.no_grad():
        params = dict(model.named_parameters())
        params.update(dict(model.named_buffers()))
        for name, value in tensors.items():
            params[name].copy_(value)
    return model


def load_model(
    directory: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> GPT:
    """Load a model written by :func:`save_model`, in eval mode.

    Args:
        directory: holds ``config.json`` and ``model.safetensors``.
        device: where to put it (default CPU).
        dtype: cast the floating-point weights (default: as saved).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no model directory at {directory}")
    config = GPTConfig.load(directory / CONFIG_NAME)
    tensors = load_tensors(directory / WEIGHTS_NAME)
    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device=device or "cpu")
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    saved_dtype = next(iter(tensors.values())).dtype if tensors else torch.float32
    model = model.to(dtype or saved_dtype)
    load_weights(model, tensors, str(directory / WEIGHTS_NAME))
    return model.eval()
