"""Loaders for public instruction / preference sets kept beside the repo.

The files live in ``../shared/data/eval/`` (see its MANIFEST.md) and are read at
run time; no text of them is stored in this repository.

* **GSM8K** (grade-school math word problems): ``{"question", "answer"}``
  records whose answer ends with ``#### <number>``. :func:`load_gsm8k` turns
  them into conversations; :func:`gsm8k_final_answer` pulls out the number that
  exact-match grading compares.
* **HH-RLHF harmless** preference pairs: ``{"chosen", "rejected"}``, each a
  whole dialogue in the ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` layout. The two
  share every turn but the last assistant reply. :func:`load_hh_pairs` splits
  them into a prompt (the shared turns) and the two final replies, i.e. the
  :class:`~minigpt.data.chat.PreferencePair` format of the DPO stage.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from minigpt.data.chat import Message, PreferencePair, check_preference, read_jsonl

#: Default location: ``<repo>/../shared/data/eval``.
EVAL_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "eval"

_GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*$")
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _eval_file(name: str, directory: str | os.PathLike | None) -> Path:
    path = Path(directory or os.environ.get("MINIGPT_EVAL_DIR", EVAL_DIR)) / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: point MINIGPT_EVAL_DIR (or directory=) at the folder "
            "holding the shared evaluation files"
        )
    return path


def gsm8k_final_answer(answer: str) -> str:
    """The number after ``####`` in a GSM8K answer, without thousands separators."""
    m = _GSM8K_ANSWER.search(answer.strip())
    if m is None:
        raise ValueError(f"not a GSM8K answer (no '#### <number>' line): {answer[-60:]!r}")
    return m.group(1).replace(",", "")


def load_gsm8k(
    split: str = "test", limit: int | None = None, directory: str | os.PathLike | None = None
) -> list[dict]:
    """GSM8K as ``{"messages": [user question, assistant solution], "final": "18"}``.

    Args:
        split: ``"train"`` (7,473 problems) or ``"test"`` (1,319).
        limit: keep only the first ``limit`` records.
        directory: folder of ``gsm8k_<split>.jsonl.gz`` (default: the shared eval folder).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = _eval_file(f"gsm8k_{split}.jsonl.gz", directory)
    out = []
    for line_no, r in read_jsonl(path):
        if not isinstance(r, dict) or "question" not in r or "answer" not in r:
            raise ValueError(f"{path}:{line_no}: expected keys 'question' and 'answer'")
        messages = [
            {"role": "user", "content": r["question"]},
            {"role": "assistant", "content": r["answer"]},
        ]
        out.append({"messages": messages, "final": gsm8k_final_answer(r["answer"])})
        if limit is not None and len(out) >= limit:
            break
    return out


def parse_hh_dialogue(text: str) -> list[Message]:
    """Split an HH dialogue into messages: ``"\\n\\nHuman: a\\n\\nAssistant: b"`` ->
    ``[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]``.

    Raises ``ValueError`` for text that does not start with a Human/Assistant turn.
    """
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise ValueError("not an HH dialogue (expected '\\n\\nHuman: ...' turns)")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c} for r, c in zip(parts[1::2], parts[2::2])]


def hh_pair(chosen: str, rejected: str, where: str = "record") -> PreferencePair:
    """Split an HH (chosen, rejected) dialogue pair into a shared prompt and two replies."""
    a, b = parse_hh_dialogue(chosen), parse_hh_dialogue(rejected)
    if a[-1]["role"] != "assistant" or b[-1]["role"] != "assistant":
        raise ValueError(f"{where}: a dialogue does not end with an assistant reply")
    if a[:-1] != b[:-1]:
        raise ValueError(f"{where}: chosen and rejected do not share the same prompt turns")
    record = {"prompt": a[:-1], "chosen": a[-1]["content"], "rejected": b[-1]["content"]}
    return check_preference(record, where)


def load_hh_pairs(
    limit: int | None = None, directory: str | os.PathLike | None = None
) -> list[PreferencePair]:
    """HH-RLHF harmless-base test pairs as :class:`PreferencePair` s.

    Pairs that cannot be used (an empty reply, identical replies, prompts that
    differ) are skipped; the test set has 2,312 records.
    """
    path = _eval_file("hh_harmless_test.jsonl.gz", directory)
    out = []
    for line_no, r in read_jsonl(path):
        if not isinstance(r, dict) or "chosen" not in r or "rejected" not in r:
            raise ValueError(f"{path}:{line_no}: expected keys 'chosen' and 'rejected'")
        try:
            out.append(hh_pair(r["chosen"], r["rejected"], f"{path}:{line_no}"))
        except ValueError:
            continue  # unusable pair (see docstring)
        if limit is not None and len(out) >= limit:
            break
    return out
