"""Checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint is a directory ``<run>/checkpoints/step_00001234/`` holding

=====================  ========================================================
``model.safetensors``  the weights (plus ``config.json`` for a MiniGPT model)
``trainer.safetensors``  optimizer moments, RNG states: every tensor of the trainer
``trainer.json``       step, schedule, counters, RNG / data-loader positions, configs
``manifest.json``      size and SHA-256 of every file above, written last
=====================  ========================================================

No pickle anywhere: safetensors holds raw tensors behind a JSON header and JSON
holds the rest, so loading a checkpoint from elsewhere cannot execute code.

**Atomic writes.** Files are written into a hidden temporary directory next to
the target, each is ``fsync``-ed, then the directory is renamed into place (a
rename is atomic on POSIX) and the parent directory is ``fsync``-ed so the rename
itself survives a power cut. A crash therefore leaves either no new checkpoint
or a complete one. On load, the manifest is checked, so a truncated or edited
file gives a clear :class:`CheckpointError` instead of garbage weights.

:class:`CheckpointManager` keeps the newest ``keep_last`` checkpoints plus the
best one by validation loss (recorded in ``best.json``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from minigpt.model.io import tensor_mismatches

FORMAT = "minigpt-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
TRAINER_TENSORS = "trainer.safetensors"
TRAINER_STATE = "trainer.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt, or does not fit the model."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: its directory, trainer tensors and trainer JSON state."""

    path: Path
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]


# ---- low-level file helpers ------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---- model weights -------------------------------------------------------------------


def _is_minigpt_model(model: nn.Module) -> bool:
    try:
        from minigpt.model import GPT
    except ImportError:  # pragma: no cover - the model package is part of minigpt
        return False
    return isinstance(model, GPT)


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied tensors (same storage) kept once, under their first name."""
    seen: set[int] = set()
    out = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if not tensor.numel():
            key = (id(tensor),)
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous()
    return out


def save_weights(model: nn.Module, directory: Path) -> None:
    """Write the model's weights (and config, for a MiniGPT GPT) into ``directory``."""
    if _is_minigpt_model(model):
        from minigpt.model.io import save_model

        save_model(model, directory)
    else:
        save_file(_unique_state(model), str(directory / WEIGHTS), metadata={"format": "pt"})


def load_weights(model: nn.Module, directory: Path) -> None:
    """Copy the weights in ``directory`` into ``model``, checking names and shapes.

    Raises:
        CheckpointError: the file is unreadable, or its tensors do not match the
            model (a checkpoint from another config).
    """
    path = directory / WEIGHTS
    tensors = _read_safetensors(path)
    problems = tensor_mismatches(_unique_state(model), tensors)
    if problems:
        raise CheckpointError(
            f"the checkpoint {directory} was written for a different model config: "
            + "; ".join(problems[:6])
        )
    with torch.no_grad():
        params = dict(model.named_parameters())
        params.update(dict(model.named_buffers()))
        for name, value in tensors.items():
            params[name].copy_(value)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot read {path}: truncated or corrupt ({e})") from e


# ---- whole checkpoints -------------------------------------------------------------------


def save_checkpoint(
    directory: str | os.PathLike,
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
) -> Path:
    """Atomically write a checkpoint directory (replacing one of the same name).

    Args:
        directory: the final checkpoint directory, e.g. ``run/checkpoints/step_00000100``.
        model: whose weights to save.
        tensors: the trainer's tensors (optimizer moments, RNG states...).
        state: the trainer's JSON-serializable state.
    """
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-"))
    try:
        save_weights(model, tmp)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
            str(tmp / TRAINER_TENSORS),
        )
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1))
        files = {}
        for path in sorted(tmp.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                _fsync_file(path)
                files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        manifest = {"format": FORMAT, "version": VERSION, "files": files}
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # same step written twice: move the old one aside first
            old = final.parent / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def verify_checkpoint(directory: str | os.PathLike) -> dict[str, Any]:
    """Check that every file listed in the manifest exists with its size and hash.

    Returns the manifest. Raises :class:`CheckpointError` naming what is wrong.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoint at {directory}")
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(
            f"{directory} is not a complete checkpoint (no {MANIFEST}; an interrupted write?)"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{manifest_path} is truncated or corrupt: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{directory} is not a MiniGPT checkpoint")
    if manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{directory} has checkpoint format version {manifest.get('version')}, "
            f"this MiniGPT reads version {VERSION}"
        )
    for name, info in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file missing: {path}")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(
                f"checkpoint file {path} has {size} bytes, expected {info['bytes']} (truncated?)"
            )
        if _sha256(path) != info["sha256"]:
            raise CheckpointError(f"checkpoint file {path} is corrupt (SHA-256 mismatch)")
    return manifest


def load_checkpoint(directory: str | os.PathLike, model: nn.Module | None = None) -> Checkpoint:
    """Verify and read a checkpoint; copy its weights into ``model`` when given.

    Raises:
        CheckpointError: missing/incomplete/truncated checkpoint, or weights that
            do not fit ``model``.
    """
    directory = Path(directory)
    verify_checkpoint(directory)
    try:
        state = json.loads((directory / TRAINER_STATE).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{directory / TRAINER_STATE} is corrupt: {e}") from e
    tensors = _read_safetensors(directory / TRAINER_TENSORS)
    if model is not None:
        load_weights(model, directory)
    return Checkpoint(directory, tensors, state)


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories under ``root`` (those with a manifest), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / MANIFEST).is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Turn a checkpoint dir, a ``checkpoints/`` dir or a run dir into one checkpoint dir.

    A run or ``checkpoints/`` directory resolves to its newest complete checkpoint.
    """
    path = Path(path)
    if (path / MANIFEST).is_file() or _STEP_DIR.match(path.name):
        return path
    for root in (path / "checkpoints", path):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    if not path.exists():
        raise CheckpointError(f"cannot resume: {path} does not exist")
    raise CheckpointError(f"cannot resume: no complete checkpoint found in {path}")


class CheckpointManager:
    """Saves numbered checkpoints under ``root``; keeps the last N and the best.

    Args:
        root: directory of the checkpoints (usually ``<run>/checkpoints``).
        keep_last: how many of the newest checkpoints to keep (>= 1).
        keep_best: also keep the checkpoint with the lowest metric ever passed
            to :meth:`save` (its name is recorded in ``best.json``).
    """

    def __init__(self, root: str | os.PathLike, keep_last: int = 2, keep_best: bool = True):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.keep_best = keep_best

    def _best_record(self) -> dict[str, Any] | None:
        path = self.root / "best.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None

    def best(self) -> Path | None:
        """The best checkpoint's directory, if one is recorded and still present."""
        record = self._best_record()
        if record is None:
            return None
        path = self.root / record["name"]
        return path if path.is_dir() else None

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        found = list_checkpoints(self.root)
        return found[-1] if found else None

    def save(
        self,
        step: int,
        model: nn.Module,
        tensors: dict[str, torch.Tensor],
        state: dict[str, Any],
        metric: float | None = None,
    ) -> Path:
        """Write checkpoint ``step_<step>``, update ``best.json``, prune old ones."""
        path = save_checkpoint(self.root / f"step_{step:08d}", model, tensors, state)
        if self.keep_best and metric is not None:
            record = self._best_record()
            if record is None or metric < record["metric"] or self.best() is None:
                atomic_write_json(
                    self.root / "best.json", {"name": path.name, "step": step, "metric": metric}
                )
        self.prune()
        return path

    def prune(self) -> None:
        """Delete checkpoints beyond the newest ``keep_last`` (never the best one)."""
        keep = set(list_checkpoints(self.root)[-self.keep_last :])
        best = self.best() if self.keep_best else None
        if best is not None:
            keep.add(best)
        for path in list_checkpoints(self.root):
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)
        for stale in self.root.glob(".tmp-*"):  # left behind by a crash mid-write
            shutil.rmtree(stale, ignore_errors=True)


def open_run(
    cfg: Any, run_dir: str | os.PathLike, resume, print_fn=print
) -> tuple[Path, Path | None]:
    """The common start of every training stage (pretrain, SFT, DPO).

    Creates ``run_dir``, applies ``cfg.threads`` (0 = torch's default), resolves
    ``resume`` (a checkpoint or a run directory, or None) to a checkpoint path, and
    prints the resolved config and saves it as ``run_dir/config.yaml`` so every run
    records exactly what it ran with. Returns ``(run_dir, resume_path)``.
    """
    from minigpt.train.config import config_to_yaml

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    resume_path = resolve_checkpoint(resume) if resume is not None else None
    print_fn("resolved config:\n" + config_to_yaml(cfg))
    (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    return run_dir, resume_path
