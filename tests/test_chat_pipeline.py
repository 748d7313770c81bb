"""The pretrain -> SFT -> DPO demo: its corpus keeps held-out text and test prompts out,
and (slow) the whole pipeline runs end to end on tiny budgets."""

from __future__ import annotations

import json

import pytest

from minigpt.data.synthetic import split_of
from minigpt.train.chat_pipeline import PipelineConfig, run_pipeline, write_corpus


def test_corpus_has_no_held_out_prompts_or_plays(tmp_path):
    cfg = PipelineConfig(task_docs=50, english_chars=20_000)
    folder, held_out = write_corpus(cfg, tmp_path / "corpus")
    text = (folder / "tasks.txt").read_text()
    docs = text.strip().split("\n\n\n")
    assert len(docs) == 50
    prompts, lines = [], [line for d in docs for line in d.split("\n")]
    for i, line in enumerate(lines):
        if line.startswith("Question: Text: "):  # a qa prompt spans two lines
            prompts.append(line.removeprefix("Question: ") + "\n" + lines[i + 1])
        elif line.startswith("Question: ") and not lines[i - 1].startswith("Question: Text: "):
            prompts.append(line.removeprefix("Question: "))
    assert len(prompts) == 50 * 8
    assert all(split_of(p) == "train" for p in prompts)  # no held-out prompt in pretraining
    assert held_out is not None and len((folder / "english.txt").read_text()) <= 20_001


@pytest.mark.slow
def test_pipeline_runs_end_to_end(tmp_path):
    cfg = PipelineConfig(
        pretrain_minutes=0.4, sft_minutes=0.2, dpo_minutes=0.15, task_docs=200,
        english_chars=50_000, sft_examples=300, dpo_examples=60, eval_per_task=4,
        d_model=32, n_layer=1, vocab_size=400, threads=1,
    )  # fmt: skip
    summary = run_pipeline(cfg, tmp_path / "chat", print_fn=lambda s: None)
    assert list(summary["stages"]) == ["base (pretrained)", "SFT", "DPO"]
    for stage in summary["stages"].values():
        assert 0.0 <= stage["accuracy"] <= 1.0 and stage["perplexity"] > 1.0
    saved = json.loads((tmp_path / "chat" / "pipeline.json").read_text())
    assert saved["wall_min"] > 0 and (tmp_path / "chat" / "results.md").is_file()
    assert (tmp_path / "chat" / "dpo" / "model" / "model.safetensors").is_file()
