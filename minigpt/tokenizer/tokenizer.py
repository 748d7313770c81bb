"""The :class:`Tokenizer`: byte-level BPE encode/decode, special tokens, chat template, save/load.

A tokenizer is four things:

* ``pattern``: the name of the pre-split pattern ("gpt2" or "gpt4", see
  :mod:`minigpt.tokenizer.pretokenize`);
* ``token_bytes``: the byte string of every ordinary token, by id;
* ``merges``: ``(left, right, new)`` id triples in the order they were learned
  (the order is the merge *rank*: lower ranks are applied first);
* ``special_tokens``: ``{"<|bos|>": id, ...}``, control tokens placed right after
  the ordinary ones. Merges never produce them and ordinary text never encodes
  to them (the string "<|bos|>" in a document is just text), so a document
  cannot forge a turn of a chat.

Encoding and decoding run in C++ (``minigpt._C``) when it is built, and in the
readable Python reference (:mod:`minigpt.tokenizer.reference`) otherwise; both
give the same ids.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import regex
import torch

from minigpt.tokenizer import _native
from minigpt.tokenizer.bytes_unicode import bytes_to_unicode_str, unicode_str_to_bytes
from minigpt.tokenizer.pretokenize import check_pattern, iter_split
from minigpt.tokenizer.reference import encode_piece

#: The special tokens a new tokenizer gets, in id order.
DEFAULT_SPECIALS: tuple[str, ...] = (
    "<|bos|>",
    "<|eos|>",
    "<|pad|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
)
CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant")
FORMAT_NAME = "minigpt-bpe"
FORMAT_VERSION = 1


class Tokenizer:
    """A byte-level BPE tokenizer (see the module docstring for the parts).

    Build one with :func:`minigpt.tokenizer.train_tokenizer`, :meth:`load`, or
    :meth:`from_gpt2_files`; the constructor checks a raw description.

    Args:
        pattern: pre-split pattern name, "gpt2" or "gpt4".
        token_bytes: byte string of each ordinary token; ids ``0..len-1``.
        merges: ``(left, right, new)`` triples in rank order.
        byte_ids: 256 ids; ``byte_ids[b]`` is the token of the single byte ``b``.
        special_tokens: ``{text: id}`` with ids ``len(token_bytes)`` onward.
        use_native: run the C++ core (default: when it is built).
    """

    def __init__(
        self,
        pattern: str,
        token_bytes: Sequence[bytes],
        merges: Sequence[tuple[int, int, int]],
        byte_ids: Sequence[int] | None = None,
        special_tokens: dict[str, int] | None = None,
        *,
        use_native: bool | None = None,
    ) -> None:
        self.pattern = check_pattern(pattern)
        self.token_bytes: list[bytes] = [bytes(t) for t in token_bytes]
        n = len(self.token_bytes)
        self.merges: list[tuple[int, int, int]] = [tuple(int(x) for x in m) for m in merges]
        self.byte_ids: list[int] = list(range(256)) if byte_ids is None else list(byte_ids)
        self.special_tokens: dict[str, int] = dict(special_tokens or {})
        if len(self.byte_ids) != 256:
            raise ValueError(f"byte_ids must have 256 entries, got {len(self.byte_ids)}")
        for b, i in enumerate(self.byte_ids):
            if not 0 <= i < n or self.token_bytes[i] != bytes([b]):
                raise ValueError(f"byte_ids[{b}] = {i} is not the token of byte {b}")
        for a, b, c in self.merges:
            if not (0 <= a < n and 0 <= b < n and 0 <= c < n):
                raise ValueError(f"merge {(a, b, c)} refers to an id outside 0..{n - 1}")
            if self.token_bytes[a] + self.token_bytes[b] != self.token_bytes[c]:
                raise ValueError(f"merge {(a, b, c)}: bytes of {c} are not bytes of {a} + {b}")
        if sorted(self.special_tokens.values()) != list(range(n, n + len(self.special_tokens))):
            raise ValueError(
                f"special token ids must be {n}..{n + len(self.special_tokens) - 1} "
                f"(right after the ordinary tokens), got {sorted(self.special_tokens.values())}"
            )
        self._special_by_id = {i: s for s, i in self.special_tokens.items()}
        self._ranks = {(a, b): (r, c) for r, (a, b, c) in enumerate(self.merges)}
        self._all_bytes = self.token_bytes + [
            self._special_by_id[i].encode("utf-8") for i in range(n, self.vocab_size)
        ]
        if use_native is None:
            use_native = _native.native_available()
        elif use_native and not _native.native_available():
            raise RuntimeError("use_native=True but minigpt._C has no BPE core; rebuild it")
        self._core = (
            _native.new_core(self.pattern, self.byte_ids, self.merges, self._all_bytes)
            if use_native
            else None
        )
        self._special_re = None

    def __getstate__(self) -> dict:
        # the C++ core cannot be pickled; rebuild it from the description
        return {"description": self.to_dict(), "native": self.uses_native}

    def __setstate__(self, state: dict) -> None:
        other = Tokenizer.from_dict(state["description"], use_native=state["native"])
        self.__dict__.update(other.__dict__)

    # ----------------------------------------------------------------- basics
    @property
    def vocab_size(self) -> int:
        """Number of ids, ordinary + special (the model's embedding rows)."""
        return len(self.token_bytes) + len(self.special_tokens)

    @property
    def uses_native(self) -> bool:
        """True when encode/decode run in the C++ core."""
        return self._core is not None

    def _special(self, *names: str) -> int | None:
        for name in names:
            if name in self.special_tokens:
                return self.special_tokens[name]
        return None

    @property
    def bos_id(self) -> int | None:
        """Id of the begin-of-document token (``<|bos|>``; GPT-2: ``<|endoftext|>``)."""
        return self._special("<|bos|>", "<|endoftext|>")

    @property
    def eos_id(self) -> int | None:
        """Id of the end-of-document token (``<|eos|>``; GPT-2: ``<|endoftext|>``)."""
        return self._special("<|eos|>", "<|endoftext|>")

    @property
    def pad_id(self) -> int | None:
        """Id of the padding token (``<|pad|>``), or None."""
        return self._special("<|pad|>")

    @property
    def fingerprint(self) -> str:
        """SHA-256 over everything that decides the ids: equal iff same encodings."""
        h = hashlib.sha256()
        h.update(json.dumps(self.to_dict(), sort_keys=True).encode())
        return h.hexdigest()

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, pattern={self.pattern!r}, "
            f"merges={len(self.merges)}, specials={len(self.special_tokens)}, "
            f"native={self.uses_native})"
        )

    # ---------------------------------------------------------------- encode
    def _encode_ordinary(self, text: str) -> list[int]:
        if not text:
            return []
        if self._core is not None:
            try:
                return self._core.encode(text).tolist()
            except RuntimeError:  # a lone surrogate (no UTF-8 form) fails the str cast
                clean = _valid_utf8(text)
                if clean is text:
                    raise
                return self._core.encode(clean).tolist()
        text = _valid_utf8(text)
        out: list[int] = []
        cache: dict[str, list[int]] = {}
        for piece in iter_split(text, self.pattern):
            ids = cache.get(piece)
            if ids is None:
                ids = encode_piece(piece.encode("utf-8"), self._ranks, self.byte_ids)
                cache[piece] = ids
            out.extend(ids)
        return out

    def encode(
        self,
        text: str,
        *,
        add_bos: bool = False,
        add_eos: bool = False,
        allowed_special: bool = False,
    ) -> list[int]:
        """Text -> token ids.

        Args:
            text: any Python string. Lone surrogates (not valid UTF-8) become U+FFFD.
            add_bos / add_eos: put :attr:`bos_id` / :attr:`eos_id` around the ids.
            allowed_special: if True, special-token strings in ``text`` (e.g.
                "<|user|>") become their ids; by default they are plain text.

        Returns:
            a list of ints, each in ``0 .. vocab_size - 1``.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not (add_bos or add_eos or allowed_special):
            return self._encode_ordinary(text)  # the common case, without copies
        ids: list[int] = []
        if add_bos:
            ids.append(self._require("bos_id"))
        if allowed_special and self.special_tokens:
            for part in self._split_specials(text):
                if part in self.special_tokens:
                    ids.append(self.special_tokens[part])
                else:
                    ids.extend(self._encode_ordinary(part))
        else:
            ids.extend(self._encode_ordinary(text))
        if add_eos:
            ids.append(self._require("eos_id"))
        return ids

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """Encode many texts, spread over ``num_threads`` C++ threads (default: all cores).

        Same ids as ``[encode(t) for t in texts]`` (no BOS/EOS, specials as text).
        """
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a sequence of strings, not one string")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
        if num_threads is None:
            num_threads = os.cpu_count() or 1
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        if self._core is None or not texts:
            return [self._encode_ordinary(t) for t in texts]
        try:
            flat, offsets = self._core.encode_batch(texts, int(num_threads))
        except RuntimeError:  # a lone surrogate somewhere fails the str cast
            clean = [_valid_utf8(t) for t in texts]
            if all(c is t for c, t in zip(clean, texts)):
                raise
            flat, offsets = self._core.encode_batch(clean, int(num_threads))
        ids = flat.tolist()
        o = offsets.tolist()
        return [ids[o[i] : o[i + 1]] for i in range(len(texts))]

    # ---------------------------------------------------------------- decode
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Ids -> the raw bytes they stand for (specials as their text)."""
        if self._core is not None:
            # the C++ side checks the range; here only that the ids are integers
            if isinstance(ids, np.ndarray):
                ids = (
                    torch.from_numpy(np.asarray(ids, dtype=np.int64))
                    if ids.dtype.kind in "iu"
                    else ids.tolist()
                )
            if not isinstance(ids, torch.Tensor):
                ids = list(ids)
                if not ids:
                    return b""
            try:
                t = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(ids)
            except (TypeError, ValueError, RuntimeError, OverflowError):
                t = None
            if t is None or t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
                _check_ids(ids, self.vocab_size)  # raises the precise error
                raise TypeError("token ids must be ints")
            flat = t.reshape(-1).to(torch.int64)
            return self._core.decode(flat).numpy().tobytes()
        ids = _check_ids(ids, self.vocab_size)
        return b"".join(self._all_bytes[i] for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text. ``decode(encode(s)) == s`` for every string ``s``.

        A cut in the middle of a multi-byte character (e.g. one token of an
        emoji) decodes to U+FFFD for the incomplete part.
        """
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def id_to_token(self, i: int) -> bytes:
        """The bytes of one token id."""
        return self._all_bytes[_check_ids([i], self.vocab_size)[0]]

    # ------------------------------------------------------------------ chat
    def apply_chat_template(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """Render a conversation to ids plus a mask of the assistant's tokens.

        Layout (each ``<|x|>`` is one special token)::

            <|bos|> <|system|> ...text... <|end|> <|user|> ... <|end|> <|assistant|> ... <|end|>

        The mask is True exactly on the assistant's content tokens and their
        closing ``<|end|>`` (so a model trained on masked tokens learns to answer
        and to stop), and False on everything else, role tokens included. With
        ``add_generation_prompt`` the ids end with ``<|assistant|>``, ready for
        the model to write the reply.

        Returns:
            ``(ids, assistant_mask)``, two lists of the same length.
        """
        if isinstance(messages, dict) or not isinstance(messages, Sequence):
            raise TypeError("messages must be a list of {'role', 'content'} dicts")
        need = ["<|bos|>", "<|end|>"] + [f"<|{r}|>" for r in CHAT_ROLES]
        missing = [s for s in need if s not in self.special_tokens]
        if missing:
            raise ValueError(f"this tokenizer has no chat special tokens {missing}")
        ids = [self.special_tokens["<|bos|>"]]
        mask = [False]
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{k}] must be a dict with 'role' and 'content'")
            role, content = m["role"], m["content"]
            if role not in CHAT_ROLES:
                raise ValueError(f"messages[{k}]['role'] must be one of {CHAT_ROLES}, got {role!r}")
            if not isinstance(content, str):
                raise TypeError(f"messages[{k}]['content'] must be a str")
            body = self.encode(content) + [self.special_tokens["<|end|>"]]
            ids.append(self.special_tokens[f"<|{role}|>"])
            mask.append(False)
            ids.extend(body)
            mask.extend([role == "assistant"] * len(body))
        if add_generation_prompt:
            ids.append(self.special_tokens["<|assistant|>"])
            mask.append(False)
        return ids, mask

    # ----------------------------------------------------------- save / load
    def to_dict(self) -> dict:
        """The JSON-able description saved by :meth:`save`.

        Tokens are written the way GPT-2 and Hugging Face write them: every byte
        maps to one printable character (space -> "Ġ", newline -> "Ċ", ASCII
        letters stay themselves), so the file stays readable.
        """
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "pattern": self.pattern,
            "tokens": [bytes_to_unicode_str(t) for t in self.token_bytes],
            "byte_ids": self.byte_ids,
            "merges": [list(m) for m in self.merges],
            "special_tokens": self.special_tokens,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as JSON (atomically: temp file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), ensure_ascii=False))
        os.replace(tmp, path)

    @classmethod
    def from_dict(cls, d: dict, *, use_native: bool | None = None) -> Tokenizer:
        """Inverse of :meth:`to_dict`."""
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise ValueError(f"not a {FORMAT_NAME} tokenizer description")
        if d.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported {FORMAT_NAME} version {d.get('version')!r}")
        return cls(
            d["pattern"],
            [unicode_str_to_bytes(t) for t in d["tokens"]],
            [tuple(m) for m in d["merges"]],
            d["byte_ids"],
            d["special_tokens"],
            use_native=use_native,
        )

    @classmethod
    def load(cls, path: str | os.PathLike, *, use_native: bool | None = None) -> Tokenizer:
        """Read a tokenizer written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(d, use_native=use_native)
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: malformed tokenizer file ({e!r})") from None

    @classmethod
    def from_gpt2_files(
        cls, vocab_json: str | os.PathLike, merges_txt: str | os.PathLike, **kwargs
    ) -> Tokenizer:
        """Load GPT-2's released ``vocab.json`` + ``merges.txt`` (pattern "gpt2")."""
        from minigpt.tokenizer.hf import load_gpt2_files

        return load_gpt2_files(cls, vocab_json, merges_txt, **kwargs)

    @classmethod
    def from_tiktoken_file(
        cls, path: str | os.PathLike, *, pattern: str = "gpt4", **kwargs
    ) -> Tokenizer:
        """Load a tiktoken ranks file (e.g. ``cl100k_base.tiktoken``) with our pre-split."""
        from minigpt.tokenizer.hf import load_tiktoken_file

        return load_tiktoken_file(cls, path, pattern=pattern, **kwargs)

    def export_hf(self, out_dir: str | os.PathLike) -> Path:
        """Write a Hugging Face ``tokenizer.json`` (+ config) into ``out_dir``.

        ``transformers.PreTrainedTokenizerFast.from_pretrained(out_dir)`` loads it
        and encodes text to the same ids as :meth:`encode`.
        """
        from minigpt.tokenizer.hf import export_hf

        return export_hf(self, out_dir)

    # --------------------------------------------------------------- helpers
    def _require(self, name: str) -> int:
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"this tokenizer has no {name.removesuffix('_id')} token")
        return value

    def _split_specials(self, text: str) -> list[str]:
        if self._special_re is None:
            alts = sorted(self.special_tokens, key=len, reverse=True)
            self._special_re = regex.compile("(" + "|".join(regex.escape(s) for s in alts) + ")")
        return [p for p in self._special_re.split(text) if p]


_SURROGATE = regex.compile("[\ud800-\udfff]")


def _valid_utf8(text: str) -> str:
    """``text`` with lone surrogates (which have no UTF-8 form) replaced by U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)


def _check_ids(ids: Iterable[int], vocab_size: int) -> list[int]:
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    elif hasattr(ids, "tolist"):  # numpy arrays
        ids = ids.tolist()
    ids = list(ids)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"token ids must be ints, got {type(i).__name__}")
        if not 0 <= i < vocab_size:
            raise ValueError(f"token id {i} is outside 0..{vocab_size - 1}")
    return ids
