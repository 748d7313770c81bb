"""The code blocks of the chat chapters run (docs/instruction_tuning.md, docs/dpo.md),
and the shipped chat configs load."""

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = ["instruction_tuning.md", "dpo.md"]


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_code_runs(chapter):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / chapter).read_text(), flags=re.S)
    assert blocks, f"{chapter} has no python blocks"
    threads = torch.get_num_threads()
    namespace: dict = {}
    try:
        for i, block in enumerate(blocks):
            exec(compile(block, f"{chapter}[block {i}]", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["sft.yaml", "sft_lora.yaml", "dpo.yaml"])
def test_configs_load(name):
    from minigpt.train.config import load_config
    from minigpt.train.dpo import DPOConfig
    from minigpt.train.sft import SFTConfig

    cfg = load_config(DPOConfig if name.startswith("dpo") else SFTConfig, ROOT / "configs" / name)
    assert cfg.data.source == "synthetic" and cfg.train.max_steps > 0
    if name == "sft_lora.yaml":
        assert cfg.lora.rank == 16
