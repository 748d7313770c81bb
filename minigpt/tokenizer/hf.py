"""Interop with the Hugging Face / GPT-2 file formats.

* :func:`load_gpt2_files` reads GPT-2's released ``vocab.json`` + ``merges.txt``
  (the format Hugging Face also uses for byte-level BPE).
* :func:`export_hf` writes a ``tokenizer.json`` for the Rust ``tokenizers``
  library, plus ``tokenizer_config.json`` (special tokens, chat template), so
  ``transformers.PreTrainedTokenizerFast.from_pretrained(dir)`` gives the same ids
  as our :class:`~minigpt.tokenizer.Tokenizer`.

The pieces of a Hugging Face byte-level BPE pipeline map one to one onto ours:
``Split(pattern)`` is our pre-split, ``ByteLevel(use_regex=False)`` turns bytes
into the printable characters of :mod:`~minigpt.tokenizer.bytes_unicode`, and
the ``BPE`` model applies merges lowest rank first, as we do
(``ignore_merges=False``: a piece is always merged step by step).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from minigpt.tokenizer.bytes_unicode import bytes_to_unicode_str, unicode_str_to_bytes
from minigpt.tokenizer.pretokenize import PATTERNS

if TYPE_CHECKING:
    from minigpt.tokenizer.tokenizer import Tokenizer


def load_gpt2_files(
    cls: type[Tokenizer],
    vocab_json: str | os.PathLike,
    merges_txt: str | os.PathLike,
    *,
    special_tokens: tuple[str, ...] = ("<|endoftext|>",),
    pattern: str = "gpt2",
    use_native: bool | None = None,
) -> Tokenizer:
    """Build a tokenizer from ``vocab.json`` ({token string: id}) and ``merges.txt``.

    ``merges.txt`` lists one merge per line, ``"left right"`` in rank order (a
    first ``#version`` line is skipped). Tokens named in ``special_tokens`` that
    appear in the vocabulary become special tokens.
    """
    for p in (vocab_json, merges_txt):
        if not Path(p).is_file():
            raise FileNotFoundError(f"no such file: {p}")
    vocab: dict[str, int] = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
    specials = {s: vocab[s] for s in special_tokens if s in vocab}
    ordinary = sorted((i, s) for s, i in vocab.items() if s not in specials)
    if [i for i, _ in ordinary] != list(range(len(ordinary))):
        raise ValueError(f"{vocab_json}: ordinary token ids must be 0..{len(ordinary) - 1}")
    token_bytes = [unicode_str_to_bytes(s) for _, s in ordinary]
    id_of = {b: i for i, b in enumerate(token_bytes)}
    merges: list[tuple[int, int, int]] = []
    for lineno, line in enumerate(Path(merges_txt).read_text(encoding="utf-8").splitlines(), 1):
        if not line or line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{merges_txt}:{lineno}: expected 'left right', got {line!r}")
        a, b = (unicode_str_to_bytes(p) for p in parts)
        try:
            merges.append((id_of[a], id_of[b], id_of[a + b]))
        except KeyError as e:
            raise ValueError(f"{merges_txt}:{lineno}: token {e} is not in {vocab_json}") from None
    byte_ids = [id_of[bytes([b])] for b in range(256)]
    return cls(pattern, token_bytes, merges, byte_ids, specials, use_native=use_native)


def chat_template_jinja() -> str:
    """Our chat layout as a Jinja template (what ``transformers`` expects)."""
    return (
        "{{ '<|bos|>' }}{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )


def tokenizer_json(tok: Tokenizer) -> dict:
    """The ``tokenizer.json`` document for ``tok``."""
    vocab = {bytes_to_unicode_str(t): i for i, t in enumerate(tok.token_bytes)}
    if len(vocab) != len(tok.token_bytes):
        raise ValueError("two ordinary tokens have the same bytes; cannot export")
    merges = [
        [bytes_to_unicode_str(tok.token_bytes[a]), bytes_to_unicode_str(tok.token_bytes[b])]
        for a, b, _ in tok.merges
    ]
    added = [
        {
            "id": i,
            "content": s,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for s, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    ]
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": PATTERNS[tok.pattern]},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {"type": "ByteLevel", **byte_level},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def export_hf(tok: Tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json(tok), ensure_ascii=False))
    names = {"bos_token": tok.bos_id, "eos_token": tok.eos_id, "pad_token": tok.pad_id}
    by_id = {i: s for s, i in tok.special_tokens.items()}
    special_map = {k: by_id[v] for k, v in names.items() if v is not None}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 1_000_000_000,
        **special_map,
    }
    chat_specials = {"<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"}
    if chat_specials <= set(tok.special_tokens):
        config["chat_template"] = chat_template_jinja()
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    return out


def load_tiktoken_file(
    cls: type[Tokenizer],
    path: str | os.PathLike,
    *,
    pattern: str = "gpt4",
    special_tokens: dict[str, int] | None = None,
    use_native: bool | None = None,
) -> Tokenizer:
    """Build a tokenizer from a tiktoken ``.tiktoken`` file (``base64(token) rank`` lines).

    tiktoken stores no merge list: it merges, at each step, the adjacent pair whose
    concatenation has the lowest rank. The same rule as a merge list: every way of
    cutting a token into two tokens is a merge creating it, ranked by the token's
    rank (then by the halves' ranks). With ``pattern="gpt4"`` and cl100k_base
    this reproduces tiktoken's ``cl100k_base`` ids (tested).
    """
    import base64

    if not Path(path).is_file():
        raise FileNotFoundError(f"no such file: {path}")
    ranked: dict[bytes, int] = {}
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranked[base64.b64decode(token)] = int(rank)
        except ValueError:
            raise ValueError(f"{path}:{lineno}: expected 'base64 rank', got {line!r}") from None
    if sorted(ranked.values()) != list(range(len(ranked))):
        raise ValueError(f"{path}: ranks must be 0..{len(ranked) - 1}")
    token_bytes = sorted(ranked, key=ranked.__getitem__)
    merges: list[tuple[int, int, int]] = []
    for new, token in enumerate(token_bytes):
        splits = [
            (ranked[token[:i]], ranked[token[i:]])
            for i in range(1, len(token))
            if token[:i] in ranked and token[i:] in ranked
        ]
        merges.extend((a, b, new) for a, b in sorted(splits))
    byte_ids = [ranked[bytes([b])] for b in range(256)]
    return cls(pattern, token_bytes, merges, byte_ids, special_tokens or {}, use_native=use_native)
