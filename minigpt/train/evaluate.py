"""``minigpt eval``: task accuracy on held-out synthetic tasks, and perplexity on held-out text.

* **Task accuracy.** For each synthetic task, the held-out ("test") split's
  prompts are rendered with the chat template, answered greedily (temperature
  0, stopping at ``<|end|>``), and compared with the true answer by exact match
  (surrounding whitespace ignored). Greedy decoding makes the number a property
  of the model, not of a sampling seed.
* **Perplexity** ``exp(mean nats per token)`` over the validation documents of
  a corpus -- the same documents pretraining holds out (every ~20th, see
  :func:`minigpt.data.prepare.is_val_document`) -- plus the tokenizer-independent
  bits per byte.

Results are written as JSON and printed as a short table::

    minigpt eval --model runs/chat/sft --out runs/chat/sft/eval.json
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from minigpt.data.synthetic import TASKS, answers_match, generate_tasks


@torch.no_grad()
def greedy_answers(
    model, tokenizer, prompts: Sequence[str], batch_size: int = 64, max_new_tokens: int = 32
) -> list[str]:
    """The model's greedy reply to each one-turn user ``prompt`` (without ``<|end|>``)."""
    from minigpt.data.chat import prompt_ids
    from minigpt.infer import generate
    from minigpt.infer.loading import stop_ids

    was_training = model.training
    model.eval()
    out: list[str] = []
    stops = stop_ids(tokenizer)
    for i in range(0, len(prompts), batch_size):
        ids = [
            prompt_ids(tokenizer, [{"role": "user", "content": p}])
            for p in prompts[i : i + batch_size]
        ]
        gens = generate(
            model,
            ids,
            tokenizer=tokenizer,
            temperature=0.0,
            max_new_tokens=max_new_tokens,
            stop_tokens=stops,
        )
        out.extend(g.text or "" for g in gens)
    model.train(was_training)
    return out


def task_accuracy(
    model, tokenizer, examples, batch_size: int = 64, max_new_tokens: int = 32
) -> dict[str, Any]:
    """Exact-match accuracy of greedy answers, overall and per task.

    Returns ``{"accuracy": float, "per_task": {task: float}, "n": int,
    "examples": [first few (prompt, answer, prediction)]}``.
    """
    if not examples:
        raise ValueError("task_accuracy needs at least one example")
    preds = greedy_answers(
        model, tokenizer, [e.prompt for e in examples], batch_size, max_new_tokens
    )
    hits: dict[str, list[bool]] = {}
    for e, p in zip(examples, preds):
        hits.setdefault(e.task, []).append(answers_match(p, e.answer))
    every = [h for v in hits.values() for h in v]
    return {
        "accuracy": sum(every) / len(every),
        "per_task": {t: sum(v) / len(v) for t, v in hits.items()},
        "n": len(every),
        "examples": [
            {"prompt": e.prompt, "answer": e.answer, "prediction": p}
            for e, p in list(zip(examples, preds))[:6]
        ],
    }


@torch.no_grad()
def text_perplexity(
    model, tokenizer, texts: Sequence[str], max_tokens: int = 20_000
) -> dict[str, float]:
    """Perplexity and bits per byte of ``texts`` (each starting with BOS), in windows.

    Documents are concatenated and cut into non-overlapping windows of the
    model's context; at most ``max_tokens`` tokens are scored.
    """
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer.encode(t, add_bos=True))
        if len(ids) > max_tokens:
            break
    ids = ids[: max_tokens + 1]
    if len(ids) < 2:
        raise ValueError("no held-out text to measure perplexity on")
    was_training = model.training
    model.eval()
    window = model.config.max_seq_len
    nats, count, n_bytes = 0.0, 0, 0
    for s in range(0, len(ids) - 1, window):
        chunk = torch.tensor(ids[s : s + window + 1])[None]
        x, y = chunk[:, :-1], chunk[:, 1:]
        n = y.numel()
        nats += float(model(x, y)) * n
        count += n
        n_bytes += sum(
            len(tokenizer.token_bytes[i]) for i in y[0].tolist() if i < len(tokenizer.token_bytes)
        )
    model.train(was_training)
    loss = nats / count
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "bits_per_byte": nats / max(n_bytes, 1) / math.log(2),
        "tokens": count,
    }


def held_out_documents(source: str, val_fraction: float = 0.05, limit: int = 50) -> list[str]:
    """The validation documents of a corpus source, as pretraining splits it."""
    from minigpt.data import load_corpus
    from minigpt.data.prepare import is_val_document

    docs = [d for i, d in enumerate(load_corpus(source)) if is_val_document(i, val_fraction)]
    return docs[:limit]


def evaluate_model(
    model,
    tokenizer,
    *,
    n_per_task: int = 50,
    tasks: Sequence[str] = TASKS,
    seed: int = 0,
    text_source: str | None = None,
    max_text_tokens: int = 20_000,
) -> dict[str, Any]:
    """Held-out task accuracy (and perplexity on ``text_source`` if given) of a model."""
    examples = generate_tasks(n_per_task * len(tasks), "test", seed=seed + 1000, tasks=tasks)
    result: dict[str, Any] = {"tasks": task_accuracy(model, tokenizer, examples)}
    if text_source:
        docs = held_out_documents(text_source)
        result["text"] = {
            "source": text_source,
            **text_perplexity(model, tokenizer, docs, max_text_tokens),
        }
    return result


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table: one row per model, columns overall + per-task accuracy (+ ppl)."""
    names = list(results)
    tasks = sorted({t for r in results.values() for t in r["tasks"]["per_task"]})
    has_ppl = any("text" in r for r in results.values())
    head = ["model", "accuracy", *tasks] + (["ppl", "bits/byte"] if has_ppl else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        r = results[name]
        row = [name, f"{r['tasks']['accuracy']:.1%}"]
        row += [f"{r['tasks']['per_task'].get(t, float('nan')):.0%}" for t in tasks]
        if has_ppl:
            text = r.get("text", {})
            row += [
                f"{text.get('perplexity', float('nan')):.2f}",
                f"{text.get('bits_per_byte', float('nan')):.3f}",
            ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``minigpt eval``."""
    parser.add_argument("--model", required=True, nargs="+", help="model or run directories")
    parser.add_argument("--n", type=int, default=50, help="held-out examples per task")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text", help="corpus source for perplexity, e.g. shakespeare")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    parser.add_argument("--threads", type=int, default=2)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``minigpt eval``."""
    from minigpt.train.sft import load_base

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    results = {}
    try:
        for path in args.model:
            model, tokenizer = load_base(path)
            results[path] = evaluate_model(
                model,
                tokenizer,
                n_per_task=args.n,
                tasks=args.tasks,
                seed=args.seed,
                text_source=args.text,
            )
    except (ValueError, FileNotFoundError) as e:
        print(f"minigpt eval: error: {e}")
        return 2
    print(format_table(results))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")
    return 0
