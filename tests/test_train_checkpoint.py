"""Checkpoints: atomic writes, retention, verification, and clear errors for bad ones."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from train_testing import TinyLM, ToyBatches, one_thread

from minigpt.train import OptimConfig, TrainConfig, Trainer
from minigpt.train import checkpoint as ckpt_mod
from minigpt.train.checkpoint import (
    CheckpointError,
    CheckpointManager,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)

_one_thread = pytest.fixture(autouse=True)(one_thread)


def trained(tmp_path, model=None, steps=2) -> Trainer:
    trainer = Trainer(
        model or TinyLM(),
        TrainConfig(max_steps=10, progress=False),
        OptimConfig(warmup_steps=1),
        ToyBatches(),
        run_dir=tmp_path,
    )
    for _ in range(steps):
        trainer.train_step()
    return trainer


def test_checkpoint_contents_and_no_pickle(tmp_path):
    trainer = trained(tmp_path)
    path = trainer.save_checkpoint()
    names = sorted(p.name for p in path.iterdir())
    assert names == ["manifest.json", "model.safetensors", "trainer.json", "trainer.safetensors"]
    state = json.loads((path / "trainer.json").read_text())
    assert state["step"] == 2 and state["data"] == {"seed": 0, "step": 2}
    manifest = verify_checkpoint(path)
    assert set(manifest["files"]) == {"model.safetensors", "trainer.json", "trainer.safetensors"}
    for name in names:  # every file is plain JSON or safetensors (never torch.save / pickle)
        if name.endswith(".json"):
            json.loads((path / name).read_text())
        else:
            assert load_file(str(path / name))
            assert not (path / name).read_bytes().startswith(b"PK")  # torch.save's zip


def test_gpt_checkpoint_has_config(tmp_path):
    from minigpt.model import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=32, n_layer=1, n_head=2, d_model=16, max_seq_len=16))
    path = trained(tmp_path, model, steps=1).save_checkpoint()
    assert (path / "config.json").is_file()
    other = GPT(GPTConfig(vocab_size=32, n_layer=2, n_head=2, d_model=16, max_seq_len=16))
    trainer = trained(tmp_path / "b", other, steps=0)
    with pytest.raises(CheckpointError, match="different model config"):
        trainer.resume(path)


def test_checkpoint_from_another_config(tmp_path):
    path = trained(tmp_path).save_checkpoint()
    other = trained(tmp_path / "other", TinyLM(dim=24), steps=0)
    with pytest.raises(CheckpointError, match="different model config.*shape"):
        other.resume(path)


def test_atomic_write_leaves_nothing_on_crash(tmp_path, monkeypatch):
    trainer = trained(tmp_path)
    good = trainer.save_checkpoint()
    trainer.train_step()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [good.name]
    assert not list(root.glob(".tmp-*"))  # the half-written temp dir is gone
    verify_checkpoint(good)  # the previous checkpoint is untouched
    assert resolve_checkpoint(tmp_path) == good


def test_missing_checkpoint(tmp_path):
    trainer = trained(tmp_path, steps=0)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        trainer.resume(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path)


@pytest.mark.parametrize("victim", ["model.safetensors", "trainer.safetensors", "trainer.json"])
def test_truncated_checkpoint(tmp_path, victim):
    path = trained(tmp_path).save_checkpoint()
    data = (path / victim).read_bytes()
    (path / victim).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


def test_corrupt_and_incomplete_checkpoint(tmp_path):
    path = trained(tmp_path).save_checkpoint()
    blob = bytearray((path / "model.safetensors").read_bytes())
    blob[-1] ^= 0xFF  # same size, one flipped byte
    (path / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(path)
    (path / "manifest.json").write_text('{"format": "minigpt-checkpoint", "vers')
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_keep_last_and_best(tmp_path):
    model = TinyLM()
    manager = CheckpointManager(tmp_path, keep_last=2)
    metrics = [3.0, 1.0, 2.0, 2.5, 2.2]
    for step, metric in enumerate(metrics, start=1):
        manager.save(step, model, {"x": torch.zeros(1)}, {"step": step}, metric)
    kept = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert kept == ["step_00000002", "step_00000004", "step_00000005"]
    assert manager.best().name == "step_00000002"
    assert manager.latest().name == "step_00000005"
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


def test_overwrite_same_step(tmp_path):
    model = TinyLM()
    first = save_checkpoint(tmp_path / "step_00000001", model, {"x": torch.zeros(1)}, {"a": 1})
    save_checkpoint(first, model, {"x": torch.ones(1)}, {"a": 2})
    loaded = load_checkpoint(first)
    assert loaded.state == {"a": 2} and loaded.tensors["x"].item() == 1.0
