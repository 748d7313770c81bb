"""Byte-level BPE tokenizer, written from scratch.

>>> from minigpt.tokenizer import train_tokenizer
>>> tok = train_tokenizer(["the cat sat on the mat"] * 10, 300, progress=False)
>>> tok.decode(tok.encode("the cat")) == "the cat"
True

Modules: ``pretokenize`` (the split patterns), ``reference`` (readable Python
BPE), ``tokenizer`` (the :class:`Tokenizer`), ``train`` (:func:`train_tokenizer`),
``hf`` (GPT-2 files, Hugging Face export), ``cli`` (``minigpt tokenizer``).
"""

from minigpt.tokenizer.pretokenize import PATTERNS, split_text
from minigpt.tokenizer.tokenizer import CHAT_ROLES, DEFAULT_SPECIALS, Tokenizer
from minigpt.tokenizer.train import train_tokenizer

__all__ = [
    "CHAT_ROLES",
    "DEFAULT_SPECIALS",
    "PATTERNS",
    "Tokenizer",
    "split_text",
    "train_tokenizer",
]
