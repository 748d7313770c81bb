"""The code blocks in docs/ run: a chapter whose example is broken is a bug.

Every ```python block of each listed chapter is executed in order in one
namespace (so later blocks may use names from earlier ones). Chapters are
listed explicitly so a new chapter is added deliberately.
"""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
RUNNABLE = ["kernels.md", "attention.md", "how_a_gpt_works.md", "decoding.md", "moe.md"]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("chapter", RUNNABLE)
def test_chapter_code_runs(chapter):
    blocks = python_blocks((DOCS / chapter).read_text())
    assert blocks, f"{chapter} has no python blocks"
    namespace: dict = {}
    for i, block in enumerate(blocks):
        if "..." in block:  # an excerpt, not a runnable example
            continue
        exec(compile(block, f"{chapter}[block {i}]", "exec"), namespace)
