"""Load a model (and its tokenizer) for inference from whatever the user points at.

Accepted sources:

* a MiniGPT model directory (``save_model``: config.json + model.safetensors),
  with our ``tokenizer.json`` beside it or in the directory above (the layout of
  a training run: ``runs/<name>/tokenizer.json`` + ``runs/<name>/model/``);
* a Hugging Face Llama-family directory (config.json with ``model_type``), whose
  ``tokenizer.json`` is read with the ``tokenizers``/``transformers`` packages;
* a llama-architecture ``.gguf`` file (its tokenizer via ``transformers``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from minigpt.model.gpt import GPT

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFTokenizer:
    """Our tokenizer interface over a ``transformers`` tokenizer (for imported models)."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.vocab_size = len(tok)
        self.bos_id = tok.bos_token_id
        self.eos_id = tok.eos_token_id
        self.pad_id = tok.pad_token_id

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False)
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if add_eos and self.eos_id is not None:
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))

    def apply_chat_template(self, messages, add_generation_prompt: bool = False):
        ids = self.tok.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids), [False] * len(ids)

    def stop_ids(self) -> list[int]:
        ids = {self.eos_id} if self.eos_id is not None else set()
        for special in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
            i = self.tok.convert_tokens_to_ids(special)
            if isinstance(i, int) and i != self.tok.unk_token_id:
                ids.add(i)
        return sorted(ids)


def stop_ids(tokenizer) -> list[int]:
    """Token ids that end a reply: EOS and the chat end-of-turn token, if present."""
    if tokenizer is None:
        return []
    if hasattr(tokenizer, "stop_ids"):
        return tokenizer.stop_ids()
    ids = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
    end = getattr(tokenizer, "special_tokens", {}).get("<|end|>")
    if end is not None:
        ids.add(end)
    return sorted(ids)


def load_for_inference(
    source: str | os.PathLike, tokenizer_path: str | None = None, dtype: str | None = None
) -> tuple[GPT, object | None]:
    """``(model, tokenizer)`` from a model dir, an HF dir or a .gguf file (see above).

    The tokenizer is None when none is found (generation then needs token ids).
    """
    from minigpt.model.hf import import_gguf, import_hf
    from minigpt.model.io import load_model

    source = Path(source)
    torch_dtype = DTYPES[dtype] if dtype else None
    tokenizer = None
    if source.suffix == ".gguf":
        model = import_gguf(source, dtype=torch_dtype)
        if tokenizer_path is None:
            tokenizer = _hf_tokenizer(source.parent, gguf_file=source.name)
    elif not source.exists():
        raise FileNotFoundError(f"no model at {source}")
    elif (source / "config.json").is_file() and "model_type" in json.loads(
        (source / "config.json").read_text()
    ):
        model = import_hf(source, dtype=torch_dtype)
        if tokenizer_path is None and (source / "tokenizer.json").is_file():
            tokenizer = _our_tokenizer(source / "tokenizer.json") or _hf_tokenizer(source)
    else:
        model = load_model(source, dtype=torch_dtype)
        # beside the weights, or in the run directory above them (runs/<name>/model)
        for candidate in (source / "tokenizer.json", source.parent / "tokenizer.json"):
            if tokenizer_path is None and candidate.is_file():
                tokenizer_path = str(candidate)
    if tokenizer_path is not None:
        tokenizer = _our_tokenizer(Path(tokenizer_path))
        if tokenizer is None:
            raise ValueError(f"{tokenizer_path} is not a MiniGPT tokenizer file")
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{model.config.vocab_size}: they do not belong together"
        )
    return model.eval(), tokenizer


def _our_tokenizer(path: Path):
    from minigpt.tokenizer import Tokenizer

    try:
        return Tokenizer.load(path)
    except ValueError:
        return None


def _hf_tokenizer(directory: Path, **kwargs):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return None
    return HFTokenizer(AutoTokenizer.from_pretrained(directory, **kwargs))
