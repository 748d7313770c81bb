"""The code of docs/tokenization.md runs (blocks in order, one shared namespace).

Run from the repository root, as CI does: the chapter reads GPT-2's files from
../shared/data beside the repo.
"""

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHAPTER = ROOT / "docs" / "tokenization.md"


def test_tokenization_chapter_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", CHAPTER.read_text(), flags=re.S)
    assert len(blocks) >= 10
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        for i, block in enumerate(blocks):
            exec(compile(block, f"tokenization.md[block {i}]", "exec"), namespace)
    finally:
        os.chdir(cwd)
    assert "bytes per token: ours" in capsys.readouterr().out
