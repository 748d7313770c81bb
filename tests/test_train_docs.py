"""docs/training.md: every ```python block runs, in order, in one namespace."""

import re
from pathlib import Path

import torch

CHAPTER = Path(__file__).resolve().parents[1] / "docs" / "training.md"


def test_training_chapter_code_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", CHAPTER.read_text(), flags=re.S)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only adds contention
    try:
        namespace: dict = {}
        for i, block in enumerate(blocks):
            exec(compile(block, f"training.md[block {i}]", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
