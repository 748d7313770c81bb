"""Hugging Face interop: export loads in transformers with equal logits, import
round-trips, GGUF import (incl. llama.cpp's q/k permutation) matches transformers'
own GGUF loader, and the real SmolLM2-135M GGUF (slow)."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
import transformers

from minigpt.model import GPT, GPTConfig
from minigpt.model.hf import export_hf, import_gguf, import_hf


def tiny_llama(**overrides) -> GPT:
    cfg = dict(
        vocab_size=67, n_layer=2, n_head=4, n_kv_head=2, d_model=48, max_seq_len=64,
        rope_theta=50000.0, init_std=0.2,
    )  # fmt: skip
    return GPT(GPTConfig(**{**cfg, **overrides})).eval()


@pytest.mark.parametrize("tie", [True, False])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, tie):
    model = tiny_llama(tie_embeddings=tie)
    export_hf(model, None, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    idx = torch.randint(0, 67, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=2e-5, rtol=1e-5)
    back = import_hf(tmp_path)
    torch.testing.assert_close(back(idx), model(idx), atol=0, rtol=0)


def test_export_with_tokenizer(tmp_path):
    from minigpt.tokenizer import train_tokenizer

    tok = train_tokenizer(["the cat sat on the mat, said the rat"] * 20, 300, progress=False)
    model = tiny_llama(vocab_size=tok.vocab_size)
    export_hf(model, tok, tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tok.encode("the cat sat", add_special_tokens=False) == tok.encode("the cat sat")
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == tok.vocab_size


def test_interop_errors(tmp_path):
    with pytest.raises(ValueError, match="Llama-style"):
        export_hf(tiny_llama(norm="layernorm"), None, tmp_path)
    export_hf(tiny_llama(), None, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type"):
        import_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="lacks tensor"):
        import_hf(tmp_path)
    with pytest.raises(FileNotFoundError):
        import_gguf(tmp_path / "missing.gguf")


def _permute_like_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp's converter reorders each head's q/k rows from rotate-half pairs
    # (i, i + D/2) to interleaved pairs (2i, 2i + 1).
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_tiny_gguf(model: GPT, path) -> None:
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.ffn_hidden)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    w.add_token_merges([])
    from minigpt.model.hf import to_hf_tensors

    names = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }  # fmt: skip
    for name, t in to_hf_tensors(model).items():
        a = t.float().numpy()
        if name == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "model.norm.weight":
            out = "output_norm.weight"
        elif name == "lm_head.weight":
            out = "output.weight"
        else:
            layer, rest = name.split(".")[2], ".".join(name.split(".")[3:-1])
            out = f"blk.{layer}.{names[rest]}.weight"
            if rest == "self_attn.q_proj":
                a = _permute_like_llama_cpp(a, cfg.n_head)
            elif rest == "self_attn.k_proj":
                a = _permute_like_llama_cpp(a, cfg.n_kv_head)
        w.add_tensor(out, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_import_matches_model_and_transformers(tmp_path):
    model = tiny_llama(tie_embeddings=False)
    write_tiny_gguf(model, tmp_path / "tiny.gguf")
    ours = import_gguf(tmp_path / "tiny.gguf")
    idx = torch.randint(0, 67, (1, 23))
    torch.testing.assert_close(ours(idx), model(idx), atol=1e-6, rtol=1e-6)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx), atol=2e-5, rtol=1e-5)


@pytest.mark.slow
def test_smollm2_gguf_logits_match_transformers():
    from minigpt.model.hf import smollm2_gguf_path

    path = smollm2_gguf_path()
    ours = import_gguf(path)
    assert ours.config.n_layer == 30 and ours.config.n_kv_head == 3
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    idx = torch.tensor([[1, 504, 3458, 314, 253, 1234, 28, 6601, 30, 2]])
    with torch.no_grad():
        ref = hf(idx).logits
        got = ours(idx)
    # fp32, 30 layers: summation-order differences only
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-4)
    assert (got[0].argmax(-1) == ref[0].argmax(-1)).all()


def test_import_mistral_style_config(tmp_path):
    model = tiny_llama()
    export_hf(model, None, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(model_type="mistral", sliding_window=16)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    imported = import_hf(tmp_path)
    assert imported.config.max_seq_len == 16  # full attention only inside the window
    idx = torch.randint(0, 67, (1, 16))
    torch.testing.assert_close(imported(idx), model(idx), atol=0, rtol=0)
    cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="RoPE scaling"):
        import_hf(tmp_path)
