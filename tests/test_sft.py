"""SFT: assistant-only loss, learning on a tiny run, LoRA (frozen base, merged output),
exact resume, and clear errors from the command line."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from chat_testing import make_base_run, tiny_model, tiny_tokenizer
from train_testing import one_thread

from minigpt.cli import main as cli_main
from minigpt.data.chat import ChatBatches, encode_chat, fixed_batches
from minigpt.data.synthetic import generate_tasks
from minigpt.model.io import load_model
from minigpt.nn.lora import LoRALinear
from minigpt.train import OptimConfig, TrainConfig, Trainer
from minigpt.train.config import load_config
from minigpt.train.sft import SFTConfig, run_sft, sft_loss

_one_thread = pytest.fixture(autouse=True)(one_thread)
QUIET = dict(print_fn=lambda s: None)


def sft_config(base, *overrides):
    return load_config(
        SFTConfig,
        None,
        [
            f"base={base}",
            "data.num_examples=96",
            "data.val_examples=12",
            "data.max_len=96",
            "train.batch_size=8",
            "train.max_steps=12",
            "train.eval_every_steps=0",
            "train.precision=fp32",
            "train.device=cpu",
            "train.progress=false",
            "threads=1",
            "optim.lr=3e-3",
            *overrides,
        ],
    )


def test_sft_loss_is_cross_entropy_over_assistant_tokens_only():
    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size)
    ex = encode_chat(tok, generate_tasks(1, seed=3)[0].messages())
    x, y = torch.tensor([ex.input_ids]), torch.tensor([ex.labels])
    logits = model(x)[0]
    graded = y[0] != -100
    expected = F.cross_entropy(logits[graded], y[0][graded])
    torch.testing.assert_close(sft_loss(model, (x, y)), expected, atol=1e-5, rtol=1e-5)
    assert graded.sum() < graded.numel() / 2  # most of the conversation is not graded
    # grading every position (plain language modelling) is a different loss
    everything = torch.tensor([ex.input_ids[1:] + [ex.labels[-1]]])
    assert not torch.allclose(sft_loss(model, (x, everything)), expected)


def test_sft_reduces_assistant_loss():
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = tiny_model(tok.vocab_size)
    train = [encode_chat(tok, e.messages()) for e in generate_tasks(64, seed=0, unique=False)]
    val = fixed_batches(train[:16], tok.pad_id)
    cfg = TrainConfig(batch_size=8, max_steps=30, progress=False, device="cpu", precision="fp32")
    trainer = Trainer(
        model,
        cfg,
        OptimConfig(lr=3e-3, warmup_steps=3),
        ChatBatches(train, 8, tok.pad_id),
        loss_fn=sft_loss,
        val_batches=lambda: iter(val),
    )
    before = trainer.evaluate()["val_loss"]
    trainer.fit()
    after = trainer.evaluate()["val_loss"]
    assert after < 0.8 * before, (before, after)


def test_run_sft_full_and_resume_is_exact(tmp_path):
    base = make_base_run(tmp_path / "base")
    full = run_sft(sft_config(base), tmp_path / "full", **QUIET)
    assert (tmp_path / "full" / "model" / "model.safetensors").is_file()
    first_val_prompt = generate_tasks(12, "test", seed=1)[0].prompt
    assert full["samples"][0].startswith(repr(first_val_prompt) + " -> ")
    assert (tmp_path / "full" / "tokenizer.json").is_file()
    part = run_sft(sft_config(base, "train.stop_at_step=5"), tmp_path / "part", **QUIET)
    assert part["interrupted"] and part["step"] == 5
    done = run_sft(sft_config(base), tmp_path / "part", resume=tmp_path / "part", **QUIET)
    assert done["step"] == 12
    a, b = load_model(tmp_path / "full" / "model"), load_model(tmp_path / "part" / "model")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    base_model = load_model(base / "model")
    assert not torch.equal(a.embed.weight, base_model.embed.weight)  # it did train


def test_run_sft_lora_trains_adapters_only_and_merges(tmp_path, monkeypatch):
    base = make_base_run(tmp_path / "base")
    seen = {}
    original = Trainer.fit

    def spy(self):
        seen["model"] = self.model
        seen["trainable"] = [n for n, p in self.model.named_parameters() if p.requires_grad]
        return original(self)

    monkeypatch.setattr(Trainer, "fit", spy)
    run_sft(sft_config(base, "lora.rank=4", "lora.alpha=8"), tmp_path / "lora", **QUIET)
    assert seen["trainable"] and all("lora_" in n for n in seen["trainable"])
    merged = load_model(tmp_path / "lora" / "model")
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    base_model = load_model(base / "model")
    torch.testing.assert_close(merged.embed.weight, base_model.embed.weight)  # frozen
    w_base = base_model.blocks[0].attn.qkv_proj.weight
    assert not torch.allclose(merged.blocks[0].attn.qkv_proj.weight, w_base)  # adapters merged
    x = torch.randint(0, merged.config.vocab_size, (2, 9))
    with torch.no_grad():  # the merged model computes what the adapted model did
        torch.testing.assert_close(merged(x), seen["model"].eval()(x), atol=1e-4, rtol=1e-4)


def test_sft_cli_and_errors(tmp_path, capsys):
    base = make_base_run(tmp_path / "base")
    data = tmp_path / "conv.jsonl"
    lines = [json.dumps({"messages": e.messages()}) for e in generate_tasks(40, seed=0)]
    data.write_text("\n".join(lines) + "\n")
    args = ["sft", "--base", str(base), "--data", str(data), "--out", str(tmp_path / "run")]
    quick = ["--set", "train.batch_size=4", "--set", "train.eval_every_steps=0", "--no-progress"]
    assert cli_main([*args, "--max-steps", "2", *quick]) == 0
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    assert cli_main([*args, "--set", "optim.lrr=1"]) == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().out
    data.write_text(lines[0] + "\n" + '{"messages": [{"role": "user", "content": "x"}]}\n')
    assert cli_main([*args, "--max-steps", "1", *quick]) == 2
    assert "conv.jsonl:2: the conversation has no assistant turn" in capsys.readouterr().out
    assert cli_main(["sft", "--base", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")]) == 2
    assert "no model at" in capsys.readouterr().out
    too_long = [*args, "--set", "data.max_len=4096", *quick]
    assert cli_main(too_long) == 2
    assert "exceeds the model's context" in capsys.readouterr().out
