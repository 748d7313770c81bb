"""Direct Preference Optimization (DPO): learn from "this reply is better than that one".

For a prompt x and two replies, the preferred y_w ("chosen") and the other y_l
("rejected"), DPO trains the policy pi so that, relative to a frozen
*reference* model pi_ref (the starting point, usually the SFT model),

    r(y) = beta * (log pi(y | x) - log pi_ref(y | x))        (the implicit reward)

    loss = -log sigmoid(r(y_w) - r(y_l))

i.e. the chosen reply gains probability relative to the rejected one. The
reference term keeps the policy close to where it started: without it, the
cheapest way to widen the gap is to push the rejected reply's probability to
zero and wander off into degenerate text. ``beta`` sets how far it may go
(small beta: rewards are scaled down, so large log-ratio changes are needed
and tolerated; large beta: the policy stays near the reference).

**Label smoothing** (conservative DPO) assumes each label is flipped with
probability eps: ``loss = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)``
with ``z = r(y_w) - r(y_l)``, which stops the loss pushing ``z`` to infinity.

The reference log-probs do not change during training, so by default they are
computed **once** for every pair before training and cached in
``RUN/ref_logps.safetensors`` (``dpo.precompute_ref: false`` recomputes them
with a second model in every step instead). Logged per step and per eval:
chosen/rejected rewards, their margin, and the reward accuracy (how often the
chosen reply has the higher reward).

**Data.** A JSONL of ``{"prompt", "chosen", "rejected"}`` records, or
``"synthetic"``: the synthetic tasks with the correct answer as chosen and a
wrong one as rejected. With ``data.on_policy`` (default) the wrong answer is
the *starting model's own* greedy answer wherever it is wrong -- the mistakes
it actually makes -- and a plausible made-up one where it is right.

This module is also ``minigpt dpo``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from minigpt.train.core import (
    OptimConfig,
    TrainConfig,
    Trainer,
    resolve_device,
    resolve_precision,
    seed_everything,
    to_device,
)
from minigpt.train.sft import ChatDataConfig


@dataclass
class DPOSettings:
    """The DPO objective.

    Attributes:
        beta: inverse temperature of the implicit reward (see module docstring).
        label_smoothing: eps, the assumed rate of flipped preferences (0 = plain DPO).
        precompute_ref: compute reference log-probs once and cache them (else every step).
        nll_weight: alpha of an added ``alpha * NLL(chosen)`` term (mean per token), as
            in RPO (Pang et al. 2024). 0 = plain DPO. Pure DPO only asks the chosen
            reply to beat the rejected one, and it can get there by lowering both;
            the NLL term keeps the chosen reply's own probability up.
    """

    beta: float = 0.1
    label_smoothing: float = 0.0
    precompute_ref: bool = True
    nll_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"dpo.beta must be > 0, got {self.beta}")
        if self.nll_weight < 0:
            raise ValueError(f"dpo.nll_weight must be >= 0, got {self.nll_weight}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


@dataclass
class PreferenceDataConfig(ChatDataConfig):
    """:class:`ChatDataConfig` plus the synthetic pair options.

    Attributes:
        on_policy: reject the starting model's own wrong answers (see module docstring).
        errors_only: with ``on_policy``, train only on the prompts the model gets
            wrong (``num_examples`` prompts are answered; the pairs are its mistakes).
    """

    num_examples: int = 2000
    on_policy: bool = True
    errors_only: bool = False


def _default_train() -> TrainConfig:
    return TrainConfig(
        batch_size=16,
        seq_len=128,
        max_steps=200,
        eval_every_steps=50,
        eval_batches=8,
        log_every_steps=10,
        checkpoint_every_steps=50,
    )


@dataclass
class DPOConfig:
    """One DPO run (YAML sections: data, dpo, train, optim); ``base`` as in SFT."""

    base: str = ""
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    dpo: DPOSettings = field(default_factory=DPOSettings)
    train: TrainConfig = field(default_factory=_default_train)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=10, weight_decay=0.0)
    )
    threads: int = 2


# ---- the math -----------------------------------------------------------------------------


def sequence_logps(
    model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Sum of ``log p(label_t | tokens <= t)`` over the labelled positions of each row.

    Args:
        input_ids, labels: (B, T) int64; labels are -100 where not graded.

    Returns:
        (B,) float32: the log-probability of each row's reply given its prompt.
    """
    logits = model(input_ids).float()
    logp = torch.log_softmax(logits, dim=-1)
    valid = labels != -100
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * valid).sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO loss of a batch of pairs from sequence log-probs (all (B,) tensors).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each (B,):
        ``rewards = beta * (policy - ref)`` (detached) and
        ``losses = -(1-eps) log sigmoid(z) - eps log sigmoid(-z)``,
        ``z = beta * ((pc - rc) - (pr - rr))``.
    """
    z = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def autocast_of(tc: TrainConfig):
    """The autocast context a run with train config ``tc`` uses (as the trainer does)."""
    device = resolve_device(tc.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
        resolve_precision(tc.precision, device)
    )
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


class DPOLoss:
    """``loss_fn(model, batch)`` for the trainer; remembers reward statistics.

    A batch is ``{"input_ids", "labels"}`` of shape (2B, T) -- B chosen rows,
    then their B rejected rows -- plus ``"ref_logps"`` (2B,) when the reference
    log-probs are precomputed. Otherwise ``ref_model`` computes them.
    """

    def __init__(
        self, beta: float, label_smoothing: float = 0.0, ref_model=None, nll_weight: float = 0.0
    ) -> None:
        self.beta, self.label_smoothing, self.ref_model = beta, label_smoothing, ref_model
        self.nll_weight = nll_weight
        self.reset()

    def reset(self) -> None:
        """Forget the statistics gathered so far."""
        self._sums: dict[str, float] = {}
        self._count = 0

    def reference_logps(self, batch: dict) -> torch.Tensor:
        """(2B,) reference log-probs: from the batch, or from the reference model."""
        if "ref_logps" in batch:
            return batch["ref_logps"]
        if self.ref_model is None:
            raise ValueError("the batch has no ref_logps and no reference model was given")
        with torch.no_grad():
            return sequence_logps(self.ref_model, batch["input_ids"], batch["labels"])

    def __call__(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        logps = sequence_logps(model, batch["input_ids"], batch["labels"])
        ref = self.reference_logps(batch).to(logps)
        b = logps.shape[0] // 2
        losses, rc, rr = dpo_loss(
            logps[:b], logps[b:], ref[:b], ref[b:], self.beta, self.label_smoothing
        )
        stats = {
            "reward_chosen": rc.mean(),
            "reward_rejected": rr.mean(),
            "reward_margin": (rc - rr).mean(),
            "reward_acc": (rc > rr).float().mean(),
        }
        loss = losses.mean()
        if self.nll_weight:
            # mean per-token negative log-likelihood of the chosen replies (see DPOSettings)
            n_tokens = (batch["labels"][:b] != -100).sum(-1).clamp(min=1)
            nll = -(logps[:b] / n_tokens).mean()
            stats["nll_chosen"] = nll.detach()
            loss = loss + self.nll_weight * nll
        for k, v in stats.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v)
        self._count += 1
        return loss

    def means(self) -> dict[str, float]:
        """Mean of each statistic since :meth:`reset`."""
        return {k: v / max(self._count, 1) for k, v in self._sums.items()}


class DPOTrainer(Trainer):
    """The shared trainer, logging reward statistics and evaluating DPO metrics."""

    def train_step(self):  # noqa: D102 - see Trainer.train_step
        self.loss_fn.reset()
        result = super().train_step()
        every = self.config.log_every_steps
        if every and self.step % every == 0:
            self.log_metrics("dpo", **self.loss_fn.means())
        return result

    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None) -> dict[str, float]:
        """Validation DPO loss, reward accuracy and margin over the val pairs."""
        if self.val_batches is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        self.loss_fn.reset()
        total, n = 0.0, 0
        for i, batch in enumerate(self.val_batches()):
            if i >= (max_batches or self.config.eval_batches):
                break
            with self.autocast():
                total += float(self.loss_fn(self.model, to_device(batch, self.device)))
            n += 1
        self.model.train(was_training)
        stats = self.loss_fn.means()
        self.loss_fn.reset()
        return {"val_loss": total / max(n, 1), **{f"val_{k}": v for k, v in stats.items()}}


# ---- data ---------------------------------------------------------------------------------


def pad_pairs(pairs, pad_id: int, ref_logps: torch.Tensor | None = None) -> dict:
    """Encoded pairs -> a DPO batch dict (chosen rows first, then rejected)."""
    from minigpt.data.chat import pad_batch

    x, y = pad_batch([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    batch = {"input_ids": x, "labels": y}
    if ref_logps is not None:  # (n, 2) -> chosen column then rejected column
        batch["ref_logps"] = torch.cat([ref_logps[:, 0], ref_logps[:, 1]])
    return batch


class PairBatches:
    """Endless random DPO batches with resumable state (batch k depends on (seed, k) only)."""

    def __init__(self, pairs, batch_size: int, pad_id: int, ref_logps=None, *, seed: int = 0):
        if not pairs:
            raise ValueError("PairBatches needs at least one preference pair")
        self.pairs, self.batch_size, self.pad_id = list(pairs), batch_size, pad_id
        self.ref_logps, self.seed, self.step = ref_logps, int(seed), 0

    def __iter__(self) -> PairBatches:
        return self

    def __next__(self) -> dict:
        import numpy as np

        idx = np.random.default_rng([self.seed, self.step]).integers(
            0, len(self.pairs), self.batch_size
        )
        self.step += 1
        ref = None if self.ref_logps is None else self.ref_logps[torch.from_numpy(idx)]
        return pad_pairs([self.pairs[i] for i in idx], self.pad_id, ref)

    def state_dict(self) -> dict:
        """Resumable position (JSON-able)."""
        return {"kind": "pairs", "seed": self.seed, "step": self.step, "n": len(self.pairs)}

    def load_state_dict(self, state: dict) -> None:
        """Continue where :meth:`state_dict` was taken."""
        if state.get("kind") != "pairs" or state.get("n") != len(self.pairs):
            raise ValueError(f"loader state {state} does not fit these {len(self.pairs)} pairs")
        self.seed, self.step = int(state["seed"]), int(state["step"])


@torch.no_grad()
def precompute_reference(
    model, pairs, pad_id: int, batch_size: int = 32, autocast=contextlib.nullcontext
) -> torch.Tensor:
    """(n, 2) float32 reference log-probs [chosen, rejected] of every pair, once.

    ``autocast``: a context factory; use the training run's precision so that
    at step 0 the policy's log-probs equal these exactly (rewards start at 0).
    """
    out = []
    was_training = model.training
    model.eval()
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        batch = pad_pairs(chunk, pad_id)
        with autocast():
            logps = sequence_logps(model, batch["input_ids"], batch["labels"])
        out.append(torch.stack([logps[: len(chunk)], logps[len(chunk) :]], dim=1))
    model.train(was_training)
    return torch.cat(out).float()


def synthetic_pairs(cfg: PreferenceDataConfig, split: str, n: int, model=None, tokenizer=None):
    """Synthetic preference records: correct answer chosen, a wrong one rejected.

    With ``model`` (on-policy), the model answers every prompt greedily first;
    where it is wrong, its own answer is the rejected one. Returns
    ``(records, n_own_errors)``.
    """
    from minigpt.data.synthetic import generate_tasks, wrong_answer

    examples = generate_tasks(
        n, split, seed=cfg.seed + (7 if split == "test" else 0), tasks=cfg.tasks
    )
    predictions = [None] * len(examples)
    if model is not None:
        from minigpt.train.evaluate import greedy_answers

        predictions = greedy_answers(model, tokenizer, [e.prompt for e in examples])
    rng = random.Random(f"dpo:{cfg.seed}:{split}")
    records, own = [], 0
    for e, pred in zip(examples, predictions):
        if pred is not None and pred.strip() and pred.strip() != e.answer:
            rejected, source, own = pred.strip(), "model", own + 1
        else:
            rejected, source = wrong_answer(e, rng), "synthetic"
        records.append(
            {"prompt": e.prompt, "chosen": e.answer, "rejected": rejected, "task": e.task,
             "rejected_from": source}
        )  # fmt: skip
    return records, own


def load_preference_data(cfg: PreferenceDataConfig, out: Path, model, tokenizer, print_fn=print):
    """(train, val) :class:`PreferencePair` lists; synthetic records are saved to
    ``out/pairs_{train,val}.jsonl`` and reused on resume."""
    from minigpt.data.chat import load_preferences, write_jsonl
    from minigpt.train.sft import split_records

    if cfg.source != "synthetic":
        return split_records(load_preferences(cfg.source), cfg.val_fraction)
    splits = {}
    for split, name, n in (("train", "train", cfg.num_examples), ("test", "val", cfg.val_examples)):
        path = out / f"pairs_{name}.jsonl"
        if not path.is_file():
            records, own = synthetic_pairs(
                cfg, split, n, model if cfg.on_policy else None, tokenizer
            )
            if cfg.on_policy:
                print_fn(f"{name} pairs: the model's own wrong answer is rejected in {own}/{n}")
            if cfg.on_policy and cfg.errors_only and split == "train":
                records = [r for r in records if r["rejected_from"] == "model"]
                if not records:
                    raise ValueError("errors_only: the model answered every training prompt right")
            write_jsonl(path, records)
        splits[name] = load_preferences(path)
    return splits["train"], splits["val"]


def run_dpo(
    cfg: DPOConfig, out: str | Path, resume: str | Path | None = None, print_fn=print
) -> dict[str, Any]:
    """Preference-tune ``cfg.base`` (usually an SFT run); returns a summary."""
    import copy

    from minigpt.data.chat import encode_preference
    from minigpt.model.io import load_tensors, save_tensors
    from minigpt.train.sft import answer_samples, finish_stage, fit_stage, open_stage, report_stage

    t0 = time.perf_counter()
    out, resume_path, model, tokenizer = open_stage(cfg, out, resume, print_fn)
    train_pairs, val_pairs = load_preference_data(cfg.data, out, model.eval(), tokenizer, print_fn)
    model.train()
    enc = lambda ps, s: [  # noqa: E731
        encode_preference(tokenizer, p, cfg.data.max_len, f"{s}[{i}]") for i, p in enumerate(ps)
    ]
    train, val = enc(train_pairs, "train"), enc(val_pairs, "val")
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    ref_model, ref_train, ref_val = None, None, None
    if cfg.dpo.precompute_ref:
        cache = out / "ref_logps.safetensors"
        if cache.is_file():
            saved = load_tensors(cache)
            ref_train, ref_val = saved["train"], saved["val"]
        if ref_train is None or ref_train.shape[0] != len(train) or ref_val.shape[0] != len(val):
            ac = functools.partial(autocast_of, cfg.train)
            ref_train = precompute_reference(model, train, pad_id, autocast=ac)
            ref_val = precompute_reference(model, val, pad_id, autocast=ac)
            save_tensors({"train": ref_train, "val": ref_val}, cache)
    else:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)

    tc = cfg.train
    seed_everything(tc.seed)
    val_sets = [
        pad_pairs(
            val[i : i + tc.batch_size],
            pad_id,
            None if ref_val is None else ref_val[i : i + tc.batch_size],
        )
        for i in range(0, len(val), tc.batch_size)
    ]
    trainer = DPOTrainer(
        model,
        tc,
        cfg.optim,
        PairBatches(train, tc.batch_size, pad_id, ref_train, seed=tc.seed),
        loss_fn=DPOLoss(cfg.dpo.beta, cfg.dpo.label_smoothing, ref_model, cfg.dpo.nll_weight),
        val_batches=lambda: iter(val_sets),
        sample_fn=answer_samples(tokenizer, [p.prompt for p in val_pairs[:3]]),
        run_dir=out,
        extra_state={"stage": "dpo", "tokenizer_fingerprint": tokenizer.fingerprint},
    )
    print_fn(
        f"DPO: beta {cfg.dpo.beta}, label smoothing {cfg.dpo.label_smoothing}; "
        f"{len(train)} train / {len(val)} val pairs; {tc.max_steps} steps of "
        f"{tc.batch_size} pairs; reference "
        f"{'precomputed' if cfg.dpo.precompute_ref else 'on the fly'}"
    )
    summary, samples = fit_stage(trainer, resume_path, print_fn)
    result = {**summary, "stage": "dpo", "samples": samples, "wall_s": time.perf_counter() - t0}
    if not summary["interrupted"]:
        finish_stage(model, tokenizer, out, result)
    done = (
        f"DPO done: {trainer.step} steps, "
        f"val loss {summary.get('val_loss', float('nan')):.4f}, "
        f"val reward accuracy {summary.get('val_reward_acc', float('nan')):.3f}"
    )
    report_stage(result, trainer.step, done, print_fn)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``minigpt dpo``."""
    from minigpt.train.sft import add_stage_arguments

    add_stage_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``minigpt dpo``."""
    from minigpt.train.sft import run_stage

    return run_stage("dpo", DPOConfig, run_dpo, args)
