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
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_MOE_ROUTINGS = ("topk", "switch", "expert_choice")
_MOE_GATES = ("softmax", "sigmoid")


@dataclass
class MoEConfig:
    """Mixture-of-experts options of a :class:`GPTConfig` (``moe=None``: dense MLPs).

    The chosen layers replace their MLP by :class:`minigpt.nn.moe.MoEMLP`: a
    router and ``n_experts`` SwiGLU experts of width ``ffn_hidden``, each token
    running through ``k`` of them. See docs/moe.md.
    """

    n_experts: int = 8
    k: int = 2  # experts per token (expert_choice: average experts per token)
    routing: str = "topk"  # "topk" | "switch" (top-1 + capacity) | "expert_choice"
    gate: str = "softmax"  # "softmax" | "sigmoid" router scores
    renormalize: bool = True  # divide a token's k weights by their sum (k > 1 only)
    capacity_factor: float | None = None  # None: no dropping (switch: 1.25, EC: 1.0)
    layers: list[int] | None = None  # which layers are MoE (None: every layer)
    ffn_hidden: int | None = None  # each expert's width (None: the model's ffn_hidden)
    shared_expert_hidden: int = 0  # an always-on shared SwiGLU expert (0: none)
    aux_loss_coef: float = 0.01  # Switch load-balancing loss weight
    z_loss_coef: float = 0.001  # router z-loss weight

    def validate(self, n_layer: int) -> None:
        """Raise ``ValueError`` naming the first bad MoE option."""
        for name in ("n_experts", "k"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"moe.{name} must be a positive int, got {v!r}")
        if self.k > self.n_experts:
            raise ValueError(f"moe.k ({self.k}) must be <= moe.n_experts ({self.n_experts})")
        if self.routing not in _MOE_ROUTINGS:
            raise ValueError(f"moe.routing must be one of {_MOE_ROUTINGS}, got {self.routing!r}")
        if self.gate not in _MOE_GATES:
            raise ValueError(f"moe.gate must be one of {_MOE_GATES}, got {self.gate!r}")
        if self.routing == "switch" and self.k != 1:
            raise ValueError(f"moe.routing='switch' is top-1: set moe.k=1 (got {self.k})")
        if self.routing == "expert_choice" and self.gate != "softmax":
            raise ValueError("moe.routing='expert_choice' uses softmax scores (moe.gate='softmax')")
        cf = self.capacity_factor
        if cf is not None and (isinstance(cf, bool) or not isinstance(cf, int | float) or cf <= 0):
            raise ValueError(f"moe.capacity_factor must be a number > 0 or null, got {cf!r}")
        if self.layers is not None and (
            not isinstance(self.layers, list | tuple)
            or not all(isinstance(i, int) and 0 <= i < n_layer for i in self.layers)
        ):
            raise ValueError(
                f"moe.layers must list layer indices in [0, {n_layer}), got {self.layers!r}"
            )
        if self.ffn_hidden is not None and (
            not isinstance(self.ffn_hidden, int) or self.ffn_hidden <= 0
        ):
            raise ValueError(f"moe.ffn_hidden must be a positive int, got {self.ffn_hidden!r}")
        if not isinstance(self.shared_expert_hidden, int) or self.shared_expert_hidden < 0:
            raise ValueError(
                f"moe.shared_expert_hidden must be an int >= 0, got {self.shared_expert_hidden!r}"
            )
        for name in ("aux_loss_coef", "z_loss_coef"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < math.inf:
                raise ValueError(f"moe.{name} must be a finite number >= 0, got {v!r}")

    def is_moe_layer(self, layer: int) -> bool:
        """True when layer ``layer`` uses the MoE MLP."""
        return self.layers is None or layer in self.layers


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
    moe: MoEConfig | None = None  # mixture-of-experts MLPs (a dict is converted)
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
        if isinstance(self.moe, dict):
            known = {f.name for f in dataclasses.fields(MoEConfig)}
            unknown = sorted(set(self.moe) - known)
            if unknown:
                raise ValueError(f"unknown moe option(s) {unknown}; valid are {sorted(known)}")
            self.moe = MoEConfig(**self.moe)
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
        if self.moe is not None:
            if not isinstance(self.moe, MoEConfig):
                raise ValueError(f"moe must be a MoEConfig, a dict or None, got {self.moe!r}")
            if self.mlp != "swiglu":
                raise ValueError("moe needs mlp='swiglu' (the experts are SwiGLU MLPs)")
            self.moe.validate(self.n_layer)

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
