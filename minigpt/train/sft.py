"""Supervised fine-tuning (SFT): teach a pretrained model to answer in the chat format.

The data are conversations (see :mod:`minigpt.data.chat`). Each is rendered
with the chat template and the loss is the usual next-token cross-entropy,
but **only on the assistant's tokens** (labels elsewhere are -100): the model
reads the user's turn and is graded on its reply, including the closing
``<|end|>`` that teaches it to stop. Everything else -- schedule, precision,
evaluation, checkpoints, exact ``--resume`` -- is the shared trainer core.

Two ways to fine-tune:

* **full** (``lora.rank: 0``, the default): every weight trains;
* **LoRA** (``lora.rank: r > 0``): the weights stay frozen and small rank-r
  adapters train (:mod:`minigpt.nn.lora`); at the end they are merged into the
  weights, so the saved model is a plain GPT again.

Output (``--out RUN``)::

    RUN/config.yaml  metrics.jsonl  curves.png  checkpoints/  summary.json
    RUN/model/       the fine-tuned model (config.json + model.safetensors)
    RUN/tokenizer.json

This module is also ``minigpt sft`` (``add_arguments`` / ``run`` at the bottom).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minigpt.data.synthetic import TASKS
from minigpt.train.core import OptimConfig, TrainConfig, Trainer, causal_lm_loss, seed_everything


@dataclass
class ChatDataConfig:
    """Where the training conversations (or preference pairs) come from.

    Attributes:
        source: ``"synthetic"`` (generated tasks, :mod:`minigpt.data.synthetic`)
            or the path of a JSONL file in the stage's format.
        num_examples: synthetic training examples (train split; prompts may repeat).
        val_examples: synthetic validation examples (held-out split).
        tasks: synthetic task names.
        seed: seed of the synthetic draws.
        max_len: longest rendered example in tokens (longer ones are cut).
        val_fraction: for a JSONL source, the share of records kept for validation.
        pack: pack several conversations into each training row of ``train.seq_len``
            tokens (document-masked attention, positions restarting per
            conversation; see :mod:`minigpt.data.chat`). Off: one conversation per
            row, padded to the longest of the batch. SFT only.
    """

    source: str = "synthetic"
    num_examples: int = 6000
    val_examples: int = 240
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    seed: int = 0
    max_len: int = 128
    val_fraction: float = 0.05
    pack: bool = False


@dataclass
class LoRAConfig:
    """LoRA adapters: ``rank`` 0 means full fine-tuning."""

    rank: int = 0
    alpha: float = 16.0
    targets: list[str] = field(
        default_factory=lambda: ["qkv_proj", "o_proj", "up_proj", "down_proj"]
    )


def _default_train() -> TrainConfig:
    return TrainConfig(
        batch_size=16,
        seq_len=128,
        max_steps=400,
        eval_every_steps=100,
        eval_batches=8,
        log_every_steps=10,
        checkpoint_every_steps=100,
    )


@dataclass
class SFTConfig:
    """One SFT run (YAML sections: data, lora, train, optim).

    Attributes:
        base: the model to start from: a model directory or a run directory
            holding ``model/`` (its ``tokenizer.json`` is found beside it).
        threads: torch intra-op threads (0 = torch's default).
    """

    base: str = ""
    data: ChatDataConfig = field(default_factory=ChatDataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=_default_train)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=20, weight_decay=0.0)
    )
    threads: int = 2


# ---- shared by the chat stages ---------------------------------------------------------------


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory, or the ``model/`` inside a run directory."""
    path = Path(path)
    if not str(path) or str(path) == ".":
        raise ValueError("no base model given: set base=RUN_OR_MODEL_DIR (or --base)")
    if (path / "model" / "config.json").is_file():
        return path / "model"
    if (path / "config.json").is_file():
        return path
    raise FileNotFoundError(f"no model at {path} (expected config.json or model/config.json)")


def load_base(path: str | Path):
    """``(model, tokenizer)`` from a model or run directory, the model in train mode (fp32)."""
    from minigpt.infer.loading import load_for_inference

    model, tokenizer = load_for_inference(resolve_model_dir(path))
    if tokenizer is None or not hasattr(tokenizer, "special_tokens"):
        raise ValueError(f"no MiniGPT tokenizer.json found beside {path}")
    if "<|assistant|>" not in tokenizer.special_tokens:
        raise ValueError(f"the tokenizer of {path} has no chat special tokens")
    return model.float().train(), tokenizer


def split_records(records: list, val_fraction: float) -> tuple[list, list]:
    """Deterministic train/val split of a record list (every ~1/val_fraction-th to val)."""
    from minigpt.data.prepare import is_val_document

    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    val = [r for i, r in enumerate(records) if is_val_document(i, val_fraction)]
    train = [r for i, r in enumerate(records) if not is_val_document(i, val_fraction)]
    if not train:
        raise ValueError("no training records left after the validation split")
    return train, val or train[:1]


def check_lengths(max_len: int, model) -> None:
    """``data.max_len`` must fit the model's context."""
    if max_len < 2:
        raise ValueError(f"data.max_len must be >= 2, got {max_len}")
    if max_len > model.config.max_seq_len:
        raise ValueError(
            f"data.max_len ({max_len}) exceeds the model's context ({model.config.max_seq_len})"
        )


def finish_stage(model, tokenizer, out: Path, summary: dict[str, Any]) -> None:
    """Save the final model + tokenizer of a stage and its ``summary.json``."""
    from minigpt.model.io import save_model

    save_model(model, out / "model")
    tokenizer.save(out / "tokenizer.json")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))


def open_stage(cfg: Any, out: str | Path, resume: str | Path | None, print_fn=print):
    """The common start of a chat stage (SFT, DPO): run dir, threads, config, base model.

    Creates ``out``, applies ``cfg.threads``, resolves ``resume`` to a checkpoint,
    prints and saves the resolved config, loads ``cfg.base`` and checks that
    ``cfg.data.max_len`` fits its context. Returns ``(out, resume_path, model,
    tokenizer)``.
    """
    from minigpt.train.checkpoint import open_run

    out, resume_path = open_run(cfg, out, resume, print_fn)
    model, tokenizer = load_base(cfg.base)
    check_lengths(cfg.data.max_len, model)
    return out, resume_path, model, tokenizer


def fit_stage(trainer, resume_path: Path | None, print_fn=print) -> tuple[dict, list[str]]:
    """Resume ``trainer`` if asked, train, and return ``(summary, final samples)``."""
    if resume_path is not None:
        trainer.resume(resume_path)
        print_fn(f"resumed from {resume_path} at step {trainer.step}")
    summary = trainer.fit()
    samples = trainer.run_samples() if not summary["interrupted"] else []
    trainer.close()
    return summary, samples


def report_stage(result: dict[str, Any], step: int, done_line: str, print_fn=print) -> None:
    """Print a stage's last words: its result line and samples, or how to resume."""
    if result["interrupted"]:
        print_fn(f"stopped at step {step}; continue with --resume")
        return
    print_fn(done_line)
    for s in result["samples"]:
        print_fn("  " + s)


def prompt_part(messages: list[dict]) -> list[dict]:
    """The messages before the last assistant turn (what the model answers)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


def answer_samples(tokenizer, prompts: list[list[dict]], max_new_tokens: int = 24):
    """``sample_fn(model)``: greedy replies to a few prompts, shown during training."""
    from minigpt.data.chat import prompt_ids
    from minigpt.infer import generate
    from minigpt.infer.loading import stop_ids

    def sample_fn(model) -> list[str]:
        ids = [prompt_ids(tokenizer, p) for p in prompts]
        outs = generate(
            model,
            ids,
            tokenizer=tokenizer,
            temperature=0.0,
            max_new_tokens=max_new_tokens,
            stop_tokens=stop_ids(tokenizer),
        )
        return [f"{p[-1]['content']!r} -> {o.text!r}" for p, o in zip(prompts, outs)]

    return sample_fn


# ---- SFT -------------------------------------------------------------------------------------


def sft_loss(model: torch.nn.Module, batch) -> torch.Tensor:
    """Mean cross-entropy over the assistant tokens of ``batch = (input_ids, labels)``.

    The masking is in the labels (-100 outside assistant turns), so this is the
    plain causal-LM loss: :func:`minigpt.train.core.causal_lm_loss`. A packed
    batch ``(input_ids, labels, cu_seqlens)`` passes the conversation offsets on
    to the model, which keeps each conversation's attention to itself.
    """
    if len(batch) == 3:
        x, y, cu_seqlens = batch
        return model(x, y, cu_seqlens=cu_seqlens)
    return causal_lm_loss(model, batch)


def load_sft_conversations(cfg: ChatDataConfig) -> tuple[list, list]:
    """(train, val) conversations (lists of messages) of a data config."""
    from minigpt.data.chat import load_conversations
    from minigpt.data.synthetic import generate_tasks

    if cfg.source == "synthetic":
        train = generate_tasks(
            cfg.num_examples, "train", seed=cfg.seed, tasks=cfg.tasks, unique=False
        )
        val = generate_tasks(cfg.val_examples, "test", seed=cfg.seed + 1, tasks=cfg.tasks)
        return [e.messages() for e in train], [e.messages() for e in val]
    return split_records(load_conversations(cfg.source), cfg.val_fraction)


def run_sft(
    cfg: SFTConfig, out: str | Path, resume: str | Path | None = None, print_fn=print
) -> dict[str, Any]:
    """Fine-tune ``cfg.base`` on ``cfg.data``; returns a summary (see module docstring)."""
    from minigpt.data.chat import ChatBatches, encode_chat, fixed_batches
    from minigpt.nn.lora import add_lora, merge_lora
    from minigpt.train.pretrain import token_byte_lengths

    t0 = time.perf_counter()
    out, resume_path, model, tokenizer = open_stage(cfg, out, resume, print_fn)
    train_conv, val_conv = load_sft_conversations(cfg.data)
    train = [
        encode_chat(tokenizer, m, cfg.data.max_len, f"train[{i}]") for i, m in enumerate(train_conv)
    ]
    val = [encode_chat(tokenizer, m, cfg.data.max_len, f"val[{i}]") for i, m in enumerate(val_conv)]
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    tc = cfg.train
    pack_len = tc.seq_len if cfg.data.pack else None
    if pack_len is not None and not cfg.data.max_len <= pack_len <= model.config.max_seq_len:
        raise ValueError(
            f"data.pack needs data.max_len ({cfg.data.max_len}) <= train.seq_len ({pack_len}) "
            f"<= the model's context ({model.config.max_seq_len})"
        )
    seed_everything(tc.seed)
    if cfg.lora.rank > 0:
        add_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    val_sets = fixed_batches(val, pad_id, tc.batch_size * cfg.data.max_len)
    train_batches = ChatBatches(train, tc.batch_size, pad_id, seed=tc.seed, pack_len=pack_len)
    trainer = Trainer(
        model,
        tc,
        cfg.optim,
        train_batches,
        loss_fn=sft_loss,
        val_batches=lambda: iter(val_sets),
        token_bytes=token_byte_lengths(tokenizer),
        sample_fn=answer_samples(tokenizer, [prompt_part(m) for m in val_conv[:3]]),
        run_dir=out,
        extra_state={"stage": "sft", "tokenizer_fingerprint": tokenizer.fingerprint},
    )
    mode = f"LoRA rank {cfg.lora.rank}" if cfg.lora.rank > 0 else "full fine-tuning"
    print_fn(
        f"SFT ({mode}): {trainable / 1e6:.2f}M trainable parameters; {len(train)} train / "
        f"{len(val)} val conversations; {tc.max_steps} steps of {tc.batch_size} "
        + (f"packed rows of {pack_len} tokens" if pack_len else "conversations")
        + f" on {trainer.device} ({trainer.precision}); "
        f"{100 * train_batches.padding_fraction():.0f}% padding"
    )
    summary, samples = fit_stage(trainer, resume_path, print_fn)
    result = {**summary, "stage": "sft", "samples": samples, "wall_s": time.perf_counter() - t0}
    if not summary["interrupted"]:
        if cfg.lora.rank > 0:
            merge_lora(model)
        finish_stage(model, tokenizer, out, result)
    done = f"SFT done: {trainer.step} steps, val loss {summary.get('val_loss', float('nan')):.4f}"
    report_stage(result, trainer.step, done, print_fn)
    return result


# ---- command line (shared by minigpt sft / dpo) ------------------------------------------------


def add_stage_arguments(parser: argparse.ArgumentParser) -> None:
    """Options common to the chat stages (``minigpt sft`` / ``minigpt dpo``)."""
    from minigpt.train.config import add_override_argument

    parser.add_argument("--config", type=Path, help="YAML config (e.g. configs/sft.yaml)")
    parser.add_argument("--base", help="model or run directory to start from (same as base=...)")
    parser.add_argument("--data", help="JSONL file, or 'synthetic' (same as data.source=...)")
    add_override_argument(parser)
    parser.add_argument("--out", type=Path, required=True, help="run directory")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="",
        metavar="CHECKPOINT",
        help="continue from a checkpoint (default: the newest one in --out)",
    )
    parser.add_argument("--max-steps", type=int, help="same as train.max_steps")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def stage_config(cls: type, args: argparse.Namespace):
    """The resolved config of a chat stage from its command line."""
    from minigpt.train.config import load_config

    config_path = args.config
    if config_path is None and args.resume is not None and (args.out / "config.yaml").is_file():
        config_path = args.out / "config.yaml"  # a resumed run keeps its own config
    overrides = list(args.overrides)
    if args.base is not None:
        overrides.append(f"base={args.base}")
    if args.data is not None:
        overrides.append(f"data.source={args.data}")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.no_progress:
        overrides.append("train.progress=false")
    return load_config(cls, config_path, overrides)


def run_stage(name: str, cls: type, fn, args: argparse.Namespace) -> int:
    """Shared ``run(args)`` of the chat stages: clear errors become exit code 2."""
    from minigpt.train.checkpoint import CheckpointError

    try:
        cfg = stage_config(cls, args)
        resume = None if args.resume is None else (Path(args.resume) if args.resume else args.out)
        fn(cfg, args.out, resume=resume)
    except (ValueError, TypeError, FileNotFoundError, CheckpointError) as e:
        print(f"minigpt {name}: error: {e}")
        return 2
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``minigpt sft``."""
    add_stage_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``minigpt sft``."""
    return run_stage("sft", SFTConfig, run_sft, args)
