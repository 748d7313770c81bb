"""``minigpt train`` end to end on a tiny corpus and model: artifacts, exact resume,
and clear errors for bad input."""

from __future__ import annotations

import json
import random

import pytest
from train_testing import one_thread

from minigpt.cli import main

_one_thread = pytest.fixture(autouse=True)(one_thread)

WORDS = ["the", "king", "and", "queen", "of", "a", "far", "land", "sing", "to", "their"]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    rng = random.Random(0)
    docs = []
    for _ in range(24):
        lines = [" ".join(rng.choices(WORDS, k=8)).capitalize() + "." for _ in range(12)]
        docs.append("\n".join(lines))
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n\n".join(docs) + "\n")
    config = root / "tiny.yaml"
    config.write_text(
        f"""
data:
  corpus: {corpus}
  vocab_size: 300
  val_fraction: 0.1
model:
  n_layer: 1
  d_model: 32
  n_head: 2
  max_seq_len: 32
train:
  batch_size: 4
  seq_len: 16
  max_steps: 6
  log_every_steps: 1
  eval_every_steps: 3
  eval_batches: 2
  checkpoint_every_s: 0
  progress: false
optim:
  lr: 0.01
  warmup_steps: 2
sample:
  prompts: ["The king"]
  max_new_tokens: 5
budget_minutes: 0
threads: 1
"""
    )
    return root, config


def train_losses(run_dir) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"}


def test_train_end_to_end_and_exact_resume(tiny_setup, capsys):
    root, config = tiny_setup
    whole = root / "whole"
    assert main(["train", "--config", str(config), "--out", str(whole)]) == 0
    out = capsys.readouterr().out
    assert "resolved config:" in out and "bits/byte" in out and "The king" in out
    for name in ("config.yaml", "tokenizer.json", "metrics.jsonl", "curves.png", "summary.json"):
        assert (whole / name).is_file(), name
    assert list(whole.glob("events.out.tfevents.*"))
    assert (whole / "model" / "model.safetensors").is_file()
    assert (whole / "bpb_vs_time.csv").read_text().startswith("minutes,step,tokens,val_loss")
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["step"] == 6 and summary["val_bpb"] > 0

    split = root / "split"
    args = ["train", "--config", str(config), "--out", str(split)]
    assert main([*args, "--set", "train.stop_at_step=3"]) == 0
    assert "continue with --resume" in capsys.readouterr().out
    assert max(train_losses(split)) == 3
    assert main(["train", "--out", str(split), "--resume"]) == 0  # its saved config
    assert "resumed from" in capsys.readouterr().out
    assert train_losses(split) == train_losses(whole)  # bit-for-bit equal losses


def test_train_bad_input(tiny_setup, capsys, tmp_path):
    root, config = tiny_setup
    base = ["train", "--config", str(config), "--out", str(tmp_path / "r")]
    assert main([*base, "--set", "train.batch_sise=3"]) == 2
    assert "unknown config key 'train.batch_sise'" in capsys.readouterr().out
    assert main([*base, "--set", "model.n_layerz=3"]) == 2
    assert "unknown config key 'model.n_layerz'" in capsys.readouterr().out
    assert main([*base, "--resume", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().out
    assert main(["train", "--resume"]) == 2
    assert "needs --out" in capsys.readouterr().out
    assert main(["train", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().out
