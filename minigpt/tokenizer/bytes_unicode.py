"""GPT-2's reversible byte <-> printable-character mapping.

Byte-level vocabularies are written to JSON files as strings. Raw bytes are not
valid text (0x0A is a newline, 0x80 alone is not UTF-8), so GPT-2 maps each of
the 256 bytes to one printable Unicode character: printable ASCII and Latin-1
bytes map to themselves, the others to characters from U+0100 upward (space
0x20 -> "Ġ", newline 0x0A -> "Ċ"). Hugging Face ``tokenizer.json`` files and our
own save format use the same mapping.
"""

from __future__ import annotations

import functools


@functools.cache
def byte_to_char() -> tuple[str, ...]:
    """``byte_to_char()[b]`` is the printable character standing for byte ``b``."""
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table: dict[int, int] = {b: b for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = 256 + n
            n += 1
    return tuple(chr(table[b]) for b in range(256))


@functools.cache
def char_to_byte() -> dict[str, int]:
    """Inverse of :func:`byte_to_char`."""
    return {c: b for b, c in enumerate(byte_to_char())}


def bytes_to_unicode_str(data: bytes) -> str:
    """Bytes -> their printable-character string."""
    table = byte_to_char()
    return "".join(table[b] for b in data)


def unicode_str_to_bytes(text: str) -> bytes:
    """Printable-character string -> bytes; ValueError on a character outside the map."""
    table = char_to_byte()
    try:
        return bytes(table[c] for c in text)
    except KeyError as e:
        raise ValueError(f"{text!r} is not a byte-level token string (bad char {e})") from None
