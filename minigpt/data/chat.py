"""Chat data: conversations and preference pairs, from JSONL to loss-masked token batches.

Two on-disk formats, one JSON object per line (``.jsonl`` or ``.jsonl.gz``):

* **conversation** (for SFT)::

      {"messages": [{"role": "user", "content": "2+2?"},
                    {"role": "assistant", "content": "4"}]}

* **preference pair** (for DPO): a prompt (a string, or a list of messages) and
  two candidate replies, the preferred one and the other::

      {"prompt": "2+2?", "chosen": "4", "rejected": "5"}

Rendering uses the tokenizer's chat template
(:meth:`minigpt.tokenizer.Tokenizer.apply_chat_template`). Training predicts
token ``t+1`` from tokens ``<= t``, so an example is ``input_ids = ids[:-1]``
and ``labels = ids[1:]``, where every label that is *not* an assistant token is
replaced by ``-100`` (the ignore index of the loss). The model still *reads*
the system and user turns; it is only graded on what the assistant says.

**Batching, two ways.** (1) One conversation per row:
:func:`pack_by_length` groups conversations of similar length into batches,
right-padded to the longest in the batch (padding sits after the real tokens,
so causal attention never reads it, and its labels are -100 so it costs no
loss). (2) **Packing** (``ChatBatches(..., pack_len=L)``): :func:`pack_examples`
fits several whole conversations into each row of L tokens and
:func:`packed_batch` returns ``(input_ids, labels, cu_seqlens)``, where
``cu_seqlens`` marks where each conversation starts in the flattened batch. The
model (``GPT(x, y, cu_seqlens=...)``) then masks attention per conversation and
restarts positions at 0, so each conversation is computed exactly as if it were
alone -- with far less padding. Labels never cross a boundary: each
conversation's labels are its own shifted tokens, so the last position of one
conversation predicts its own last token, never the next conversation's first.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minigpt.tokenizer import CHAT_ROLES

IGNORE_INDEX = -100
Message = dict[str, str]


# ---- reading and checking records ---------------------------------------------------------


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, record)`` for each non-blank line of a JSONL file.

    ``.gz`` files are decompressed on the fly. A line that is not JSON raises
    ``ValueError`` naming the file and the (1-based) line number.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no JSONL file at {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None


def check_messages(messages: Any, where: str = "messages") -> list[Message]:
    """Validate a conversation and return it as a list of ``{"role", "content"}`` dicts.

    Rules: a non-empty list; each message a dict with a ``role`` in
    ``system/user/assistant`` and a string ``content``; at least one assistant
    turn, and no assistant turn that is empty (it would teach the model to stop
    at once). ``where`` prefixes error messages (e.g. ``"data.jsonl:7"``).
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of messages")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"{where}: message {k} must be an object with 'role' and 'content'")
        for key in ("role", "content"):
            if key not in m:
                raise ValueError(f"{where}: message {k} has no {key!r} key")
        if m["role"] not in CHAT_ROLES:
            raise ValueError(
                f"{where}: message {k} has role {m['role']!r}; expected one of {CHAT_ROLES}"
            )
        if not isinstance(m["content"], str):
            raise ValueError(f"{where}: message {k} 'content' must be a string")
        if m["role"] == "assistant" and not m["content"].strip():
            raise ValueError(f"{where}: message {k} is an empty assistant turn")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError(f"{where}: the conversation has no assistant turn to learn from")
    return out


@dataclass
class PreferencePair:
    """A prompt (a conversation ending before the reply) and two replies to rank."""

    prompt: list[Message]
    chosen: str
    rejected: str


def _reply_text(value: Any, key: str, where: str) -> str:
    """A reply given as a string, an assistant message, or a one-message list."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        if value.get("role", "assistant") != "assistant" or "content" not in value:
            raise ValueError(f"{where}: {key!r} must be a string or an assistant message")
        value = value["content"]
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} must be a string or an assistant message")
    if not value.strip():
        raise ValueError(f"{where}: {key!r} is an empty assistant reply")
    return value


def check_preference(record: Any, where: str = "record") -> PreferencePair:
    """Validate a ``{"prompt", "chosen", "rejected"}`` record (see the module docstring)."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a preference record must be a JSON object")
    for key in ("prompt", "chosen", "rejected"):
        if key not in record:
            raise ValueError(f"{where}: missing key {key!r} (need prompt, chosen, rejected)")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"{where}: 'prompt' is empty")
        prompt = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt:
        # the prompt alone has no assistant turn yet: check it with a stand-in reply
        check_messages([*prompt, {"role": "assistant", "content": "x"}], where)
        prompt = [{"role": m["role"], "content": m["content"]} for m in prompt]
    else:
        raise ValueError(f"{where}: 'prompt' must be a string or a non-empty list of messages")
    chosen = _reply_text(record["chosen"], "chosen", where)
    rejected = _reply_text(record["rejected"], "rejected", where)
    if chosen == rejected:
        raise ValueError(f"{where}: 'chosen' and 'rejected' are identical (nothing to prefer)")
    return PreferencePair(prompt, chosen, rejected)


def load_conversations(path: str | os.PathLike) -> list[list[Message]]:
    """All conversations of a JSONL file (records ``{"messages": [...]}``), checked."""
    out = []
    for line_no, record in read_jsonl(path):
        where = f"{path}:{line_no}"
        if not isinstance(record, dict) or "messages" not in record:
            raise ValueError(f"{where}: missing key 'messages'")
        out.append(check_messages(record["messages"], where))
    if not out:
        raise ValueError(f"{path} holds no conversations")
    return out


def load_preferences(path: str | os.PathLike) -> list[PreferencePair]:
    """All preference pairs of a JSONL file, checked."""
    out = [check_preference(r, f"{path}:{n}") for n, r in read_jsonl(path)]
    if not out:
        raise ValueError(f"{path} holds no preference pairs")
    return out


def write_jsonl(path: str | os.PathLike, records: Sequence[Any]) -> Path:
    """Write records one JSON object a line (atomically: temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


# ---- tokens ---------------------------------------------------------------------------------


@dataclass
class ChatExample:
    """One conversation as training inputs and masked next-token labels.

    ``input_ids[t]`` is read at position t and ``labels[t]`` is the token to
    predict there (``ids[t+1]``), or -100 where that token is not the assistant's.
    Both lists have the same length.
    """

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_chat(
    tokenizer, messages: Sequence[Message], max_len: int | None = None, where: str = "conversation"
) -> ChatExample:
    """Render ``messages`` with the chat template; labels only on assistant tokens.

    Args:
        tokenizer: a :class:`minigpt.tokenizer.Tokenizer` with chat special tokens.
        messages: a checked conversation (see :func:`check_messages`).
        max_len: keep at most this many input positions (the end is cut off); a
            conversation left with no assistant label raises ``ValueError``.
    """
    ids, mask = tokenizer.apply_chat_template(list(messages))
    if max_len is not None:
        ids, mask = ids[: max_len + 1], mask[: max_len + 1]
    labels = [i if m else IGNORE_INDEX for i, m in zip(ids[1:], mask[1:])]
    if all(lab == IGNORE_INDEX for lab in labels):
        raise ValueError(
            f"{where}: no assistant token left within max_len={max_len} "
            f"(the rendered conversation has {len(mask)} tokens)"
        )
    return ChatExample(ids[:-1], labels)


def prompt_ids(tokenizer, prompt: Sequence[Message]) -> list[int]:
    """Token ids of a prompt ending with the ``<|assistant|>`` cue (for generation)."""
    ids, _ = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True)
    return ids


@dataclass
class PreferenceExample:
    """A preference pair as two :class:`ChatExample` (same prompt, two replies)."""

    chosen: ChatExample
    rejected: ChatExample


def encode_preference(
    tokenizer, pair: PreferencePair, max_len: int | None = None, where: str = "pair"
) -> PreferenceExample:
    """Render prompt + chosen and prompt + rejected; labels only on the reply tokens."""
    return PreferenceExample(
        encode_chat(tokenizer, [*pair.prompt, _assistant(pair.chosen)], max_len, where),
        encode_chat(tokenizer, [*pair.prompt, _assistant(pair.rejected)], max_len, where),
    )


def _assistant(text: str) -> Message:
    return {"role": "assistant", "content": text}


def pad_batch(examples: Sequence[ChatExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack examples into ``(input_ids, labels)``, (B, T) int64, right-padded.

    T is the longest example; padding uses ``pad_id`` in the inputs and -100 in
    the labels, so it is never predicted (and, being after the real tokens, is
    never attended to by them under the causal mask).
    """
    if not examples:
        raise ValueError("pad_batch needs at least one example")
    width = max(len(e) for e in examples)
    x = torch.full((len(examples), width), pad_id, dtype=torch.long)
    y = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        x[row, : len(e)] = torch.tensor(e.input_ids, dtype=torch.long)
        y[row, : len(e)] = torch.tensor(e.labels, dtype=torch.long)
    return x, y


def pack_by_length(lengths: Sequence[int], max_tokens: int, max_rows: int = 64) -> list[list[int]]:
    """Group example indices into batches of similar length (one example per row).

    Examples are sorted by length (longest first) and cut into consecutive
    batches whose padded size ``rows * longest`` stays within ``max_tokens``
    (and at most ``max_rows`` rows). Returns the index lists; every index appears
    exactly once.
    """
    if max_tokens < 1 or max_rows < 1:
        raise ValueError("max_tokens and max_rows must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if lengths[i] > max_tokens:
            raise ValueError(f"example {i} has {lengths[i]} tokens > max_tokens={max_tokens}")
        longest = lengths[current[0]] if current else lengths[i]
        if current and ((len(current) + 1) * longest > max_tokens or len(current) >= max_rows):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pack_examples(lengths: Sequence[int], pack_len: int) -> list[list[int]]:
    """Group example indices into rows of at most ``pack_len`` tokens (several per row).

    Greedy best-fit decreasing: examples are taken longest first and each goes
    into the open row with the *least* free space that still fits it (a new row
    if none does). No example is split; an example longer than ``pack_len`` raises
    ``ValueError`` (truncate it first, e.g. ``encode_chat(..., max_len=pack_len)``).
    The result depends only on ``lengths`` (deterministic). Returns one index
    list per row; every index appears exactly once.
    """
    if pack_len < 1:
        raise ValueError(f"pack_len must be >= 1, got {pack_len}")
    rows: list[list[int]] = []
    # rows_by_free[f]: rows with exactly f free tokens (a stack each), for O(pack_len) lookup
    rows_by_free: list[list[int]] = [[] for _ in range(pack_len + 1)]
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if n < 1 or n > pack_len:
            raise ValueError(f"example {i} has {n} tokens; packing needs 1..pack_len={pack_len}")
        fit = next((f for f in range(n, pack_len + 1) if rows_by_free[f]), None)
        if fit is None:
            rows.append([])
            free.append(pack_len)
            row = len(rows) - 1
        else:
            row = rows_by_free[fit].pop()
        rows[row].append(i)
        free[row] -= n
        rows_by_free[free[row]].append(row)
    return rows


def packed_batch(
    rows: Sequence[Sequence[ChatExample]], pack_len: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate each row's examples into ``(input_ids, labels, cu_seqlens)``.

    Returns (B, pack_len) int64 ids and labels (padding: ``pad_id`` / -100) and
    ``cu_seqlens`` (n_docs + 1,) int64: the start of every conversation in the
    flattened (B * pack_len) tokens, then the end. Each row's padding tail is a
    document of its own, so the offsets cover every token and include every row
    start -- what ``GPT(..., cu_seqlens=...)`` expects.
    """
    if not rows:
        raise ValueError("packed_batch needs at least one row")
    x = torch.full((len(rows), pack_len), pad_id, dtype=torch.long)
    y = torch.full((len(rows), pack_len), IGNORE_INDEX, dtype=torch.long)
    cu = [0]
    for r, examples in enumerate(rows):
        ids = [t for e in examples for t in e.input_ids]
        if len(ids) > pack_len:
            raise ValueError(f"row {r} holds {len(ids)} tokens > pack_len={pack_len}")
        x[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        y[r, : len(ids)] = torch.tensor([t for e in examples for t in e.labels], dtype=torch.long)
        for e in examples:
            cu.append(cu[-1] + len(e))
        if len(ids) < pack_len:  # the padding tail
            cu.append(cu[-1] + pack_len - len(ids))
    return x, y, torch.tensor(cu, dtype=torch.long)


class ChatBatches:
    """Endless random SFT batches ``(input_ids, labels)`` with resumable state.

    Batch k is ``batch_size`` examples drawn by ``numpy.random.default_rng([seed,
    k])``, so the sequence of batches depends only on (seed, k): saving ``k`` in a
    checkpoint resumes exactly (like :class:`minigpt.data.RandomWindowLoader`).

    With ``pack_len`` the examples are first packed once into rows of
    ``pack_len`` tokens (:func:`pack_examples`) and a batch is ``batch_size``
    random *rows*, returned as ``(input_ids, labels, cu_seqlens)``
    (:func:`packed_batch`); a step then sees several conversations per row.

    Args:
        examples: encoded conversations.
        batch_size: rows per batch.
        pad_id: token used for padding (any valid id: it is never read or graded).
        seed: decides every batch.
        pack_len: pack conversations into rows of this many tokens (None: one per row).
    """

    def __init__(
        self,
        examples: Sequence[ChatExample],
        batch_size: int,
        pad_id: int,
        *,
        seed: int = 0,
        pack_len: int | None = None,
    ) -> None:
        if not examples:
            raise ValueError("ChatBatches needs at least one example")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.examples = list(examples)
        self.batch_size, self.pad_id, self.seed, self.step = batch_size, pad_id, int(seed), 0
        self.pack_len = pack_len
        self.rows = None if pack_len is None else pack_examples(list(map(len, examples)), pack_len)

    def indices(self, step: int) -> np.ndarray:
        """The example (or, when packing, row) indices of batch ``step`` (deterministic)."""
        rng = np.random.default_rng([self.seed, step])
        n = len(self.examples) if self.rows is None else len(self.rows)
        return rng.integers(0, n, size=self.batch_size)

    def __iter__(self) -> ChatBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        idx = self.indices(self.step)
        self.step += 1
        if self.rows is not None:
            rows = [[self.examples[i] for i in self.rows[r]] for r in idx]
            return packed_batch(rows, self.pack_len, self.pad_id)
        return pad_batch([self.examples[i] for i in idx], self.pad_id)

    def padding_fraction(self) -> float:
        """Expected share of padding tokens in a batch (packed rows, or padded random rows)."""
        tokens = sum(map(len, self.examples))
        if self.rows is not None:
            return 1.0 - tokens / (len(self.rows) * self.pack_len)
        padded = sum(
            int(self.batch_size * max(len(self.examples[i]) for i in self.indices(s)))
            for s in range(64)
        )  # estimated from the first 64 batches
        used = sum(len(self.examples[i]) for s in range(64) for i in self.indices(s))
        return 1.0 - used / padded

    def state_dict(self) -> dict:
        """The position (JSON-able): enough to resume exactly."""
        state = {"kind": "chat", "seed": self.seed, "step": self.step, "n": len(self.examples)}
        return state if self.pack_len is None else {**state, "pack_len": self.pack_len}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`: the next batch is the one it would have been."""
        if (
            state.get("kind") != "chat"
            or state.get("n") != len(self.examples)
            or state.get("pack_len") != self.pack_len
        ):
            raise ValueError(
                f"loader state {state} does not fit this data ({len(self.examples)} examples, "
                f"pack_len={self.pack_len})"
            )
        self.seed, self.step = int(state["seed"]), int(state["step"])


def fixed_batches(
    examples: Sequence[ChatExample], pad_id: int, max_tokens: int = 4096
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every example once, in length-grouped padded batches (for evaluation)."""
    groups = pack_by_length([len(e) for e in examples], max(max_tokens, max(map(len, examples))))
    return [pad_batch([examples[i] for i in g], pad_id) for g in groups]
