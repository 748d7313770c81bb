"""``GPTConfig``: every hyper-parameter of a MiniGPT model in one dataclass.

The config is saved next to every set of weights (``config.json``), so a model
directory is self-describing. Presets give named sizes from ~1M to ~125M
parameters; any field can be overridden::

    cfg = GPTConfig.preset("tiny", vocab_size=8192, max_seq_len=512)
    cfg.save("run/config.json");  GPTConfig.load("run/config.json") == cfg
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_CHOICES = {
    "norm": ("rmsnorm", "layernorm"),
    "mlp": ("swiglu", "gelu"),
    "pos": ("rope", "learned"),
}


@dataclass
class GPTConfig:
    """Hyper-parameters of a decoder-only transformer (Llama-style by default).

    Shapes that follow from these: token embedding (vocab_size, d_model); per
    layer, attention projections q (n_head*head_dim, d_model), k and v
    (n_kv_head*head_dim, d_model), o (d_model, n_head*head_dim); an MLP with
    ``ffn_hidden`` hidden units; a final norm and an LM head (vocab_size, d_model),
    shared with the embedding when ``tie_embeddings``.

    The GPT-2-style switches (``norm="layernorm"``, ``mlp="gelu"``,
    ``pos="learned"``, ``bias=True``) exist for teaching: flip one at a time and
    compare the loss curves.
    """

    vocab_size: int = 32000
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None: same as n_head (plain multi-head attention)
    d_model: int = 256
    head_dim: int | None = None  # None: d_model // n_head
    ffn_hidden: int | None = None  # None: ~8/3 d_model for swiglu, 4 d_model for gelu
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm: str = "rmsnorm"
    mlp: str = "swiglu"
    pos: str = "rope"
    tie_embeddings: bool = True
    dropout: float = 0.0
    norm_eps: float = 1e-5
    bias: bool = False
    gradient_checkpointing: bool = False
    init_std: float = 0.02
    moe: dict[str, Any] | None = None  # placeholder for the mixture-of-experts options
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes (e.g. source)

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_head <= 0 or self.d_model % self.n_head:
                raise ValueError(
                    f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head}) "
                    "unless head_dim is given"
                )
            self.head_dim = self.d_model // self.n_head
        if self.ffn_hidden is None:
            if self.mlp == "swiglu":  # keeps the MLP's parameter count near 8 d^2
                self.ffn_hidden = _round_up(int(8 * self.d_model / 3), 64)
            else:
                self.ffn_hidden = 4 * self.d_model
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("ffn_hidden", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})"
            )
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.norm_eps <= 0 or self.rope_theta <= 0 or self.init_std <= 0:
            raise ValueError("norm_eps, rope_theta and init_std must be positive")

    # ---- serialization -------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict of every field (what ``config.json`` holds)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        """Build a config from a dict; an unknown key raises ``ValueError`` naming it."""
        if not isinstance(data, dict):
            raise TypeError(f"config must be a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig key(s) {unknown}; valid keys are {sorted(known)}")
        return cls(**data)

    def save(self, path: str | os.PathLike) -> None:
        """Write the config as JSON, atomically (temp file + rename)."""
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> GPTConfig:
        """Read a config written by :meth:`save`, with clear errors for bad files."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no model config at {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON (truncated?): {e}") from e
        return cls.from_dict(data)

    # ---- presets ---------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """A named model size; keyword arguments override any field.

        ==========  ======  =======  ======  =====  ===========  ======
        name        layers  d_model  heads   kv     vocab        params
        ==========  ======  =======  ======  =====  ===========  ======
        nano        4       128      4       4      4096         ~1.4M
        micro       6       192      6       2      8192         ~3.9M
        tiny        7       320      8       4      8192         ~10.8M
        small       8       512      8       4      16384        ~32M
        base        12      768      12      12     32000        ~124M
        ==========  ======  =======  ======  =====  ===========  ======

        The parameter counts assume the preset's vocabulary (embeddings tied);
        a different ``vocab_size`` changes them by ``vocab_size * d_model``.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


PRESETS: dict[str, dict[str, Any]] = {
    "nano": dict(vocab_size=4096, n_layer=4, n_head=4, d_model=128, max_seq_len=256),
    "micro": dict(vocab_size=8192, n_layer=6, n_head=6, n_kv_head=2, d_model=192),
    "tiny": dict(vocab_size=8192, n_layer=7, n_head=8, n_kv_head=4, d_model=320),
    "small": dict(vocab_size=16384, n_layer=8, n_head=8, n_kv_head=4, d_model=512),
    "base": dict(
        vocab_size=32000,
        n_layer=12,
        n_head=12,
        d_model=768,
        ffn_hidden=2560,
        max_seq_len=2048,
    ),
}
