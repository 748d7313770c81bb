"""The chat pipeline demo: pretrain -> SFT -> DPO on a CPU, evaluated after every stage.

``minigpt pipeline --out runs/chat`` runs the whole path from random weights to
a (tiny) chat model in about 17 minutes on 2 CPU cores (measured on a loaded
machine; see docs/instruction_tuning.md) and prints held-out task accuracy
after each stage::

    runs/chat/corpus/     pretraining text: English + plain-text task documents
    runs/chat/pretrain/   the base model        (minigpt train)
    runs/chat/sft/        + supervised chat SFT (minigpt sft)
    runs/chat/dpo/        + DPO on its mistakes (minigpt dpo)
    runs/chat/pipeline.json, results.md   accuracy / perplexity / wall time per stage

**What each stage teaches.** The pretraining corpus mixes Shakespeare (the
training documents only; its validation documents measure perplexity) with
plain-text task documents ("Question: ... Answer: ...") from the *train*
split of :mod:`minigpt.data.synthetic`, the way real pretraining corpora
contain some question-answer text. The base model has never seen the chat
template, so asked in the chat format it does not answer: accuracy ~0. SFT
teaches the format (and sharpens the skills); DPO then trains on pairs whose
rejected reply is the SFT model's own wrong answer, which targets exactly the
mistakes it makes. Accuracy is exact match on the *held-out* split, whose
prompts never occur in any training stage (see :func:`minigpt.data.synthetic.split_of`).
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# imported before torch: on an oversubscribed machine it makes idle OpenMP threads sleep
import minigpt.train.cli  # noqa: F401

SHARED_SHAKESPEARE = (
    Path(__file__).resolve().parents[2].parent / "shared" / "data" / "en" / "shakespeare.txt.gz"
)


@dataclass
class PipelineConfig:
    """Budgets and sizes of the demo (minutes are wall time of each training stage).

    Attributes:
        pretrain_minutes, sft_minutes, dpo_minutes: wall-time budgets (DPO also
            stops after ``dpo_steps``: more overfits its pairs).
        sft_examples: training conversations.
        dpo_examples: training prompts the SFT model answers; its wrong answers
            become the rejected replies (``errors_only``: only those pairs are kept).
        task_docs: plain-text task documents (8 question-answer pairs each) in the
            pretraining corpus.
        english_chars: characters of Shakespeare in the pretraining corpus.
        eval_per_task: held-out examples per task in each evaluation.
        d_model, n_layer, vocab_size: model and tokenizer size.
        dpo_beta, dpo_lr, dpo_nll_weight: the DPO stage (see docs/dpo.md).
        threads: torch threads.
    """

    pretrain_minutes: float = 8.0
    sft_minutes: float = 6.0
    dpo_minutes: float = 4.0
    task_docs: int = 6000
    english_chars: int = 2_000_000
    sft_examples: int = 12000
    dpo_examples: int = 6000
    dpo_steps: int = 175
    eval_per_task: int = 200
    d_model: int = 128
    n_layer: int = 4
    vocab_size: int = 2048
    dpo_beta: float = 0.1
    dpo_lr: float = 1e-4
    dpo_nll_weight: float = 1.0  # RPO-style NLL on chosen: plain DPO degraded accuracy here
    threads: int = 2
    seed: int = 0


def write_corpus(cfg: PipelineConfig, directory: Path) -> tuple[Path, str | None]:
    """Write the pretraining corpus folder; returns it and the held-out text source."""
    from minigpt.data.prepare import is_val_document
    from minigpt.data.synthetic import generate_tasks

    directory.mkdir(parents=True, exist_ok=True)
    examples = generate_tasks(cfg.task_docs * 8, "train", seed=cfg.seed + 500, unique=False)
    docs = [
        "\n".join(f"Question: {e.prompt}\nAnswer: {e.answer}" for e in examples[i : i + 8])
        for i in range(0, len(examples), 8)
    ]
    (directory / "tasks.txt").write_text("\n\n\n".join(docs) + "\n")
    held_out = None
    if SHARED_SHAKESPEARE.is_file():  # train documents only; the val ones measure perplexity
        with gzip.open(SHARED_SHAKESPEARE, "rt", encoding="utf-8") as f:
            plays = f.read().split("\n\n\n")
        train_text = "\n\n\n".join(p for i, p in enumerate(plays) if not is_val_document(i, 0.05))
        (directory / "english.txt").write_text(train_text[: cfg.english_chars] + "\n")
        held_out = str(SHARED_SHAKESPEARE)
    return directory, held_out


def run_pipeline(cfg: PipelineConfig, out: str | Path, print_fn=print) -> dict[str, Any]:
    """Run every stage into ``out`` and return the per-stage results."""
    import torch

    from minigpt.train.config import load_config
    from minigpt.train.dpo import DPOConfig, run_dpo
    from minigpt.train.evaluate import evaluate_model, format_table
    from minigpt.train.pretrain import PretrainConfig, pretrain
    from minigpt.train.sft import SFTConfig, load_base, run_sft

    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    quiet = lambda s: None  # noqa: E731 - the stages' own chatter; the summary is printed here
    corpus, held_out = write_corpus(cfg, out / "corpus")
    stages: dict[str, dict[str, Any]] = {}
    results: dict[str, dict[str, Any]] = {}

    def evaluate(name: str, path: Path, train_s: float) -> None:
        t0 = time.perf_counter()
        model, tok = load_base(path)
        r = evaluate_model(
            model, tok, n_per_task=cfg.eval_per_task, seed=cfg.seed, text_source=held_out
        )
        results[name] = r
        stages[name] = {
            "accuracy": r["tasks"]["accuracy"],
            "per_task": r["tasks"]["per_task"],
            "perplexity": r.get("text", {}).get("perplexity"),
            "train_s": round(train_s, 1),
            "eval_s": round(time.perf_counter() - t0, 1),
            "elapsed_min": round((time.perf_counter() - t_start) / 60, 2),
        }
        print_fn(
            f"[{stages[name]['elapsed_min']:5.1f} min] {name}: held-out accuracy "
            f"{r['tasks']['accuracy']:.1%} "
            + " ".join(f"{t}={a:.0%}" for t, a in r["tasks"]["per_task"].items())
        )

    common = [f"train.seed={cfg.seed}", "train.progress=false", f"threads={cfg.threads}"]
    t0 = time.perf_counter()
    pre = load_config(
        PretrainConfig,
        None,
        [
            f"data.corpus={corpus}",
            f"data.vocab_size={cfg.vocab_size}",
            f"model={{preset: nano, d_model: {cfg.d_model}, n_layer: {cfg.n_layer}, "
            "n_head: 4, max_seq_len: 128}",
            "train.batch_size=16",
            "train.seq_len=128",
            "train.eval_every_s=60",
            "sample.prompts=[]",
            f"budget_minutes={cfg.pretrain_minutes}",
            "final_reserve_s=10",
            *common,
        ],
    )
    pretrain(pre, out / "pretrain", print_fn=quiet)
    evaluate("base (pretrained)", out / "pretrain", time.perf_counter() - t0)

    t0 = time.perf_counter()
    sft = load_config(
        SFTConfig,
        None,
        [
            f"base={out / 'pretrain'}",
            f"data.num_examples={cfg.sft_examples}",
            "data.max_len=96",
            "train.batch_size=32",
            "train.max_steps=100000",
            f"train.time_budget_s={cfg.sft_minutes * 60}",
            "train.eval_every_steps=0",
            "train.eval_every_s=60",
            "train.checkpoint_every_steps=0",
            "train.checkpoint_every_s=120",
            "optim.lr=1e-3",
            *common,
        ],
    )
    run_sft(sft, out / "sft", print_fn=quiet)
    evaluate("SFT", out / "sft", time.perf_counter() - t0)

    t0 = time.perf_counter()
    dpo = load_config(
        DPOConfig,
        None,
        [
            f"base={out / 'sft'}",
            f"data.num_examples={cfg.dpo_examples}",
            "data.max_len=96",
            f"dpo.beta={cfg.dpo_beta}",
            f"dpo.nll_weight={cfg.dpo_nll_weight}",
            "data.errors_only=true",
            "train.batch_size=16",
            f"train.max_steps={cfg.dpo_steps}",
            f"train.time_budget_s={cfg.dpo_minutes * 60}",
            "train.eval_every_steps=0",
            "train.eval_every_s=60",
            "train.checkpoint_every_steps=0",
            "train.checkpoint_every_s=120",
            f"optim.lr={cfg.dpo_lr}",
            *common,
        ],
    )
    dpo_summary = run_dpo(dpo, out / "dpo", print_fn=quiet)
    evaluate("DPO", out / "dpo", time.perf_counter() - t0)

    wall = time.perf_counter() - t_start
    table = format_table(results)
    summary = {
        "stages": stages,
        "dpo": {k: v for k, v in dpo_summary.items() if k.startswith("val_")},
        "wall_min": round(wall / 60, 2),
        "config": cfg.__dict__,
    }
    (out / "pipeline.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text(table + f"\n\nwall time: {wall / 60:.1f} min\n")
    print_fn(table)
    print_fn(f"wall time: {wall / 60:.1f} min; results in {out / 'pipeline.json'}")
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``minigpt pipeline``."""
    from minigpt.train.config import add_override_argument

    parser.add_argument("--out", type=Path, default=Path("runs/chat"), help="output directory")
    add_override_argument(parser, "sft_minutes=3", "a PipelineConfig field")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``minigpt pipeline``."""
    from minigpt.train.config import load_config

    try:
        cfg = load_config(PipelineConfig, None, args.overrides)
    except (ValueError, TypeError) as e:
        print(f"minigpt pipeline: error: {e}")
        return 2
    run_pipeline(cfg, args.out)
    return 0
