"""The trainer core every stage shares (pretraining, SFT, DPO, ...).

One optimizer step, as :meth:`Trainer.train_step` does it:

1. set the learning rate from the schedule (:mod:`minigpt.train.schedule`);
2. for each of ``grad_accum`` micro-batches: compute the loss under autocast
   (bf16 on CPU/CUDA, or fp16 with a gradient scaler on CUDA), divide it by
   ``grad_accum`` and back-propagate, so the gradients *sum* to the gradient of
   the mean loss over the whole (micro-batches x batch) -- the same update a
   batch ``grad_accum`` times larger would give, in a fraction of the memory;
3. clip the gradient's global L2 norm to ``grad_clip`` (rescaling all gradients
   together keeps their direction; it only tames rare huge steps);
4. take an AdamW step and zero the gradients.

What a step computes is pluggable: ``loss_fn(model, batch) -> scalar loss``.
The default, :func:`causal_lm_loss`, is next-token cross-entropy for
``batch = (x, y)``; SFT masks prompt tokens through ``y == -100``; DPO passes
its own function over (chosen, rejected) pairs. Everything else -- schedule,
accumulation, precision, clipping, eval, logging, checkpoints, exact resume --
is the same code for all of them.

Evaluation reports the mean validation loss (nats per token), the perplexity
``exp(loss)`` and **bits per byte**: total nats over the evaluated targets,
divided by the number of UTF-8 bytes those targets spell, divided by ln 2.
Unlike loss per token it does not depend on the tokenizer, so a BPE model and a
character-level model can be compared on the same text.
"""

from __future__ import annotations

import dataclasses
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from minigpt.nn.moe import moe_diagnostics
from minigpt.train.checkpoint import CheckpointError, CheckpointManager, load_checkpoint
from minigpt.train.runlog import RunLogger
from minigpt.train.schedule import step_progress, warmup_cosine_lr

Batch = Any
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


@dataclass
class OptimConfig:
    """AdamW, its schedule and gradient clipping.

    Attributes:
        lr: peak learning rate (after warmup).
        min_lr_ratio: the cosine decays to ``lr * min_lr_ratio``.
        warmup_steps: optimizer steps of linear warmup.
        weight_decay: decoupled weight decay on matrices (not on norms, biases,
            or -- unless ``decay_embeddings`` -- embeddings).
        beta1, beta2, eps: Adam's moment decay rates and denominator epsilon.
        grad_clip: max global gradient L2 norm; 0 disables clipping.
        decay_embeddings: also weight-decay embedding tables.
        impl: ``"auto"`` (fused where torch has it, else foreach), ``"fused"``,
            ``"foreach"`` or ``"loop"``.
    """

    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    decay_embeddings: bool = False
    impl: str = "auto"


@dataclass
class TrainConfig:
    """How long and how a run trains, evaluates, logs and checkpoints.

    The run stops at ``max_steps`` optimizer steps or after ``time_budget_s``
    seconds of wall time, whichever comes first (0 disables either; at least one
    must be set). With a time budget the cosine decay follows the *clock*
    (progress = elapsed / budget), so a slower machine takes fewer steps but
    still ends at the low learning rate; such a schedule is not bit-for-bit
    reproducible, a step-budgeted one is.

    Attributes:
        batch_size, seq_len: micro-batch shape (rows x tokens).
        grad_accum: micro-batches per optimizer step.
        precision: ``"auto"`` (bf16 on CUDA if supported else fp16; on CPU bf16
            where it has native bf16 math, else fp32), ``"fp32"``, ``"bf16"``
            (autocast) or ``"fp16"`` (autocast + GradScaler).
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``...
        seed: seeds torch, numpy and Python's ``random`` at the start of a run.
        eval_every_steps / eval_every_s: evaluate periodically (0 = off); always
            at the end.
        eval_batches: validation micro-batches per evaluation.
        log_every_steps: train-loss records in the metrics file.
        sample_every_steps: print sample generations (0 = only at the end).
        checkpoint_every_steps / checkpoint_every_s: periodic checkpoints (0 =
            off); one is always written at the end.
        stop_at_step: stop early at this step as if interrupted (0 = off), leaving
            a checkpoint to ``--resume`` from; the schedule still spans the full run.
        keep_last, keep_best: checkpoint retention.
        progress: show a progress bar.
        compile: run the model through ``torch.compile``.
    """

    batch_size: int = 16
    seq_len: int = 256
    grad_accum: int = 1
    max_steps: int = 1000
    time_budget_s: float = 0.0
    precision: str = "auto"
    device: str = "auto"
    seed: int = 1337
    eval_every_steps: int = 0
    eval_every_s: float = 0.0
    eval_batches: int = 8
    log_every_steps: int = 10
    sample_every_steps: int = 0
    checkpoint_every_steps: int = 0
    checkpoint_every_s: float = 0.0
    stop_at_step: int = 0
    keep_last: int = 2
    keep_best: bool = True
    progress: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "grad_accum", "eval_batches", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(
                f"train.precision must be auto, fp32, bf16 or fp16, got {self.precision!r}"
            )


# ---- the pluggable pieces -----------------------------------------------------------------


def causal_lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy of ``batch = (x, y)``, (B, T) int64 each."""
    x, y = batch
    return model(x, y)


def lm_targets(batch: Batch) -> torch.Tensor:
    """The target ids of a batch: ``y`` of ``(x, y)`` or ``batch["labels"]``."""
    if isinstance(batch, dict):
        return batch["labels"]
    return batch[1]


def count_tokens(batch: Batch) -> int:
    """Tokens in a batch (the numel of its first tensor), for tokens/s."""
    if isinstance(batch, torch.Tensor):
        return batch.numel()
    items = batch.values() if isinstance(batch, dict) else batch
    for item in items:
        if isinstance(item, torch.Tensor):
            return item.numel()
    return 0


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move every tensor of a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16 on Linux).

    Without those instructions bf16 matmuls are emulated and slower than fp32.
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """Pick the autocast mode. ``"auto"``: bf16 (or fp16 without bf16 support) on
    CUDA; on CPU bf16 where the CPU has native bf16 math, else fp32."""
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            # CPU autocast supports fp16, but it is slow and needs loss scaling: allowed
            # (it is how the fp16 path is exercised without a GPU), never the default.
            return "fp16"
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


_AUTOCAST_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


def param_groups(
    model: nn.Module, weight_decay: float, decay_embeddings: bool = False
) -> list[dict[str, Any]]:
    """Split parameters into a weight-decayed group and a non-decayed one.

    Decay shrinks weights toward 0 each step. That regularizes the matrices of
    linear layers, but on a norm's gain (which should stay near 1) or a bias it
    only fights the model, and on embeddings it pulls rare tokens' vectors to 0.
    So: decay parameters with >= 2 dims, except those of ``nn.Embedding`` modules
    (unless ``decay_embeddings``). Tied weights appear once.
    """
    embedding_params = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()
    }
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = id(p) in embedding_params
        if p.dim() >= 2 and (decay_embeddings or not is_embedding):
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, fused (one kernel for all params) when possible."""
    groups = param_groups(model, cfg.weight_decay, cfg.decay_embeddings)
    kwargs: dict[str, Any] = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.impl not in ("auto", "fused", "foreach", "loop"):
        raise ValueError(f"optim.impl must be auto, fused, foreach or loop, got {cfg.impl!r}")
    if cfg.impl in ("auto", "fused"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):
            if cfg.impl == "fused":
                raise
    return torch.optim.AdamW(groups, foreach=cfg.impl != "loop", **kwargs)


# ---- JSON-safe state -------------------------------------------------------------------


def to_jsonable(obj: Any) -> Any:
    """Make loader / RNG state JSON-safe; numpy arrays are tagged to round-trip."""
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        raise TypeError("tensors in JSON state are not supported; put them in the tensor file")
    return obj


def from_jsonable(obj: Any) -> Any:
    """Inverse of :func:`to_jsonable` (lists stay lists)."""
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        return {k: from_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_jsonable(v) for v in obj]
    return obj


def optimizer_state_split(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer ``state_dict`` as (tensors for safetensors, the rest for JSON)."""
    tensors, scalars = {}, {}
    for pid, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_state_join(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    """Rebuild an optimizer ``state_dict`` from :func:`optimizer_state_split` parts."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for pid, entry in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(entry)
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every RNG a run touches: torch (CPU, CUDA), numpy's global, Python's ``random``."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return tensors, {"numpy": to_jsonable(np.random.get_state()), "python": random.getstate()}


def set_rng_state(tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    np_state = from_jsonable(state["numpy"])
    np.random.set_state(tuple(np_state))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and Python's ``random`` (what a fresh run does first)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- the trainer -----------------------------------------------------------------------


@dataclass
class StepResult:
    """What one optimizer step reports."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    seconds: float
    extra: dict[str, float] = dataclasses.field(default_factory=dict)  # e.g. MoE router stats


class Trainer:
    """Runs the optimization loop of any stage over any model.

    Args:
        model: any ``nn.Module``; ``loss_fn(model, batch)`` must return a scalar loss.
        train_config, optim_config: see :class:`TrainConfig`, :class:`OptimConfig`.
        train_batches: an iterator of batches (CPU tensors are moved to the
            device). If it has ``state_dict()`` / ``load_state_dict()`` (like
            :class:`minigpt.data.RandomWindowLoader`), its position is checkpointed.
        loss_fn: the step's loss (default :func:`causal_lm_loss`).
        val_batches: a *factory* returning a fresh iterable of validation batches,
            the same ones every call, so evaluations are comparable.
        token_bytes: (vocab,) int64 count of UTF-8 bytes each token id decodes to,
            for exact bits-per-byte; or
        bytes_per_token: the corpus average, used when ``token_bytes`` is None.
        sample_fn: ``sample_fn(model) -> list[str]``, generations to print/log.
        run_dir: where metrics, plots and ``checkpoints/`` go (None: nowhere).
        extra_state: JSON-safe dict saved in every checkpoint (e.g. tokenizer info).
        reserve_s: ``reserve_s() -> seconds`` of a time budget to leave unused for
            work after :meth:`fit` (a final full evaluation...). It is asked again
            at every step, so it can use :attr:`eval_seconds_per_batch`, measured
            at each evaluation.
    """

    def __init__(
        self,
        model: nn.Module,
        train_config: TrainConfig,
        optim_config: OptimConfig,
        train_batches: Iterator[Batch],
        *,
        loss_fn: LossFn = causal_lm_loss,
        val_batches: Callable[[], Iterable[Batch]] | None = None,
        token_bytes: torch.Tensor | None = None,
        bytes_per_token: float | None = None,
        sample_fn: Callable[[nn.Module], list[str]] | None = None,
        run_dir: str | Path | None = None,
        extra_state: dict[str, Any] | None = None,
        reserve_s: Callable[[], float] | None = None,
    ) -> None:
        if train_config.max_steps <= 0 and train_config.time_budget_s <= 0:
            raise ValueError(
                "the run has no budget: set train.max_steps or train.time_budget_s "
                "(or budget_minutes for minigpt train)"
            )
        self.config = train_config
        self.optim_config = optim_config
        self.device = resolve_device(train_config.device)
        self.precision = resolve_precision(train_config.precision, self.device)
        self.model = model.to(self.device)
        self.step_model = torch.compile(model) if train_config.compile else model
        self.optimizer = build_optimizer(model, optim_config, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.train_batches = train_batches
        self.loss_fn = loss_fn
        self.val_batches = val_batches
        self.token_bytes = token_bytes.to(torch.float64) if token_bytes is not None else None
        self.bytes_per_token = bytes_per_token
        self.sample_fn = sample_fn
        self.extra_state = extra_state or {}
        self.reserve_s = reserve_s
        self.eval_seconds_per_batch = 0.0  # measured by evaluate()
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.logger = RunLogger(self.run_dir) if self.run_dir is not None else None
        self.checkpoints = (
            CheckpointManager(
                self.run_dir / "checkpoints", train_config.keep_last, train_config.keep_best
            )
            if self.run_dir is not None
            else None
        )
        self.step = 0
        self.tokens_seen = 0
        self.elapsed_s = 0.0  # wall time spent in fit(), summed over resumed sessions
        self.best_val_loss: float | None = None
        self.last_eval: dict[str, float] = {}
        self._session_start = time.perf_counter()
        self._session_elapsed0 = 0.0

    # ---- schedule ------------------------------------------------------------------

    def progress(self) -> float:
        """Fraction of the run done, in [0, 1]: by steps, by clock, or the further of both."""
        cfg, warm = self.config, self.optim_config.warmup_steps
        parts = []
        if cfg.max_steps > 0:
            parts.append(step_progress(self.step, warm, cfg.max_steps))
        if cfg.time_budget_s > 0:
            parts.append(self.elapsed_s / self.train_seconds())
        return min(max(parts), 1.0)

    def train_seconds(self) -> float:
        """The time budget minus what ``reserve_s()`` asks to keep for after training."""
        reserve = self.reserve_s() if self.reserve_s is not None else 0.0
        return max(self.config.time_budget_s - reserve, 1e-3)

    def lr(self) -> float:
        """The learning rate of the next optimizer step."""
        o = self.optim_config
        return warmup_cosine_lr(
            self.step,
            self.progress(),
            max_lr=o.lr,
            min_lr=o.lr * o.min_lr_ratio,
            warmup_steps=o.warmup_steps,
        )

    def done(self) -> bool:
        """True once the step or time budget is used up."""
        cfg = self.config
        if cfg.max_steps > 0 and self.step >= cfg.max_steps:
            return True
        return cfg.time_budget_s > 0 and self.elapsed_s >= self.train_seconds()

    def _tick(self) -> None:
        self.elapsed_s = self._session_elapsed0 + time.perf_counter() - self._session_start

    # ---- one step ------------------------------------------------------------------

    def autocast(self):
        """The autocast context of this run's precision (a no-op for fp32)."""
        dtype = _AUTOCAST_DTYPE.get(self.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def train_step(self) -> StepResult:
        """One optimizer step over ``grad_accum`` micro-batches (see module docstring)."""
        t0 = time.perf_counter()
        lr = self.lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.step_model.train()
        accum = self.config.grad_accum
        total_loss = torch.zeros((), device=self.device)
        tokens = 0
        for _ in range(accum):
            batch = to_device(next(self.train_batches), self.device)
            tokens += count_tokens(batch)
            with self.autocast():
                loss = self.loss_fn(self.step_model, batch)
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(f"loss is {loss.item()} at step {self.step}")
            self.scaler.scale(loss / accum).backward()
            total_loss += loss.detach().float()
        self.scaler.unscale_(self.optimizer)  # so clipping sees the true gradient norm
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        clip = self.optim_config.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += tokens
        self._tick()
        return StepResult(
            step=self.step,
            loss=total_loss.item() / accum,
            lr=lr,
            grad_norm=float(grad_norm),
            tokens=tokens,
            seconds=time.perf_counter() - t0,
            extra=moe_diagnostics(self.model),  # empty unless the model has MoE layers
        )

    # ---- evaluation --------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None) -> dict[str, float]:
        """Validation loss (nats/token), perplexity and bits per byte.

        bits/byte = (sum over targets of -ln p) / (UTF-8 bytes of the targets) / ln 2.
        Targets equal to -100 are ignored. Returns {} without ``val_batches``.
        """
        if self.val_batches is None:
            return {}
        max_batches = max_batches or self.config.eval_batches
        was_training = self.model.training
        self.model.eval()
        nats, count, n_bytes = 0.0, 0, 0.0
        t0, n_batches = time.perf_counter(), 0
        for i, batch in enumerate(self.val_batches()):
            if i >= max_batches:
                break
            n_batches += 1
            batch = to_device(batch, self.device)
            with self.autocast():
                loss = self.loss_fn(self.model, batch).float()
            targets = lm_targets(batch)
            valid = targets != -100
            n = int(valid.sum())
            nats += loss.item() * n
            count += n
            if self.token_bytes is not None:
                n_bytes += float(self.token_bytes.to(targets.device)[targets[valid]].sum())
        self.model.train(was_training)
        self.eval_seconds_per_batch = (time.perf_counter() - t0) / max(n_batches, 1)
        if count == 0:
            raise ValueError("the validation set produced no target tokens")
        val_loss = nats / count
        result = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
        if self.token_bytes is None and self.bytes_per_token:
            n_bytes = count * self.bytes_per_token
        if n_bytes > 0:
            result["val_bpb"] = nats / n_bytes / math.log(2)
        return result

    # ---- state ---------------------------------------------------------------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything needed to resume: (tensors, JSON-safe state)."""
        opt_tensors, opt_meta = optimizer_state_split(self.optimizer.state_dict())
        rng_tensors, rng_json = rng_state()
        data_state = None
        if hasattr(self.train_batches, "state_dict"):
            data_state = to_jsonable(self.train_batches.state_dict())
        model_config = getattr(self.model, "config", None)
        if hasattr(model_config, "to_dict"):
            model_config = model_config.to_dict()
        elif dataclasses.is_dataclass(model_config):
            model_config = dataclasses.asdict(model_config)
        else:
            model_config = None
        state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "elapsed_s": self.elapsed_s,
            "best_val_loss": self.best_val_loss,
            "last_eval": self.last_eval,
            "optimizer": opt_meta,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": rng_json,
            "data": data_state,
            "train_config": dataclasses.asdict(self.config),
            "optim_config": dataclasses.asdict(self.optim_config),
            "model_config": model_config,
            "extra": self.extra_state,
        }
        return {**opt_tensors, **rng_tensors}, state

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current step (keeps last N + best)."""
        if self.checkpoints is None:
            return None
        tensors, state = self.state()
        metric = self.last_eval.get("val_loss") if self.last_eval.get("step") == self.step else None
        return self.checkpoints.save(self.step, self.model, tensors, state, metric)

    def resume(self, path: str | Path) -> None:
        """Restore model, optimizer, scaler, RNG, data position and counters.

        Raises:
            CheckpointError: missing / truncated checkpoint, or one from another
                model config.
        """
        ckpt = load_checkpoint(path, self.model)
        s = ckpt.state
        saved_cfg, now_cfg = s.get("model_config"), getattr(self.model, "config", None)
        if saved_cfg is not None and hasattr(now_cfg, "to_dict"):
            diff = {
                k: (saved_cfg.get(k), v)
                for k, v in now_cfg.to_dict().items()
                if saved_cfg.get(k) != v and k not in ("gradient_checkpointing", "extra")
            }
            if diff:
                shown = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
                raise CheckpointError(f"checkpoint {path} is from another model config ({shown})")
        try:
            self.optimizer.load_state_dict(optimizer_state_join(ckpt.tensors, s["optimizer"]))
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"optimizer state in {path} does not fit this model: {e}") from e
        if s.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(s["scaler"])
        if s.get("data") is not None and hasattr(self.train_batches, "load_state_dict"):
            self.train_batches.load_state_dict(from_jsonable(s["data"]))
        set_rng_state(ckpt.tensors, s["rng"])
        self.step = s["step"]
        self.tokens_seen = s["tokens_seen"]
        self.elapsed_s = s["elapsed_s"]
        self.best_val_loss = s["best_val_loss"]
        self.last_eval = s.get("last_eval") or {}

    # ---- the loop ------------------------------------------------------------------

    def log_metrics(self, kind: str, **values: Any) -> None:
        """Append a record to the run's metrics (JSONL + TensorBoard), if logging."""
        if self.logger is not None:
            self.logger.log(kind, self.step, self.elapsed_s, **values)

    def run_eval(self) -> dict[str, float]:
        """Evaluate, remember the best, log; returns the metrics."""
        result = self.evaluate()
        if result:
            self.last_eval = {**result, "step": self.step}
            if self.best_val_loss is None or result["val_loss"] < self.best_val_loss:
                self.best_val_loss = result["val_loss"]
            self.log_metrics("eval", tokens=self.tokens_seen, **result)
        return result

    def run_samples(self) -> list[str]:
        """Generate samples with ``sample_fn`` (if any), log and return them."""
        if self.sample_fn is None:
            return []
        was_training = self.model.training
        self.model.eval()
        try:
            samples = self.sample_fn(self.model)
        finally:
            self.model.train(was_training)
        self.log_metrics("sample", samples=samples)
        return samples

    def fit(self) -> dict[str, Any]:
        """Train until the budget (or ``stop_at_step``) is reached; returns a summary.

        Evaluates, samples and checkpoints on the configured intervals, and
        always once more at the end.
        """
        from tqdm.auto import tqdm

        cfg = self.config
        self._session_start = time.perf_counter()
        self._session_elapsed0 = self.elapsed_s
        by_time = cfg.max_steps <= 0
        bar = tqdm(
            total=int(cfg.time_budget_s) if by_time else cfg.max_steps,
            initial=int(self.elapsed_s) if by_time else self.step,
            unit="s" if by_time else "step",
            disable=not cfg.progress,
            dynamic_ncols=True,
        )
        last_eval_t = last_ckpt_t = self.elapsed_s
        window_tokens, window_t0 = 0, time.perf_counter()
        tokens_per_s = 0.0
        interrupted = False
        # only a stop point ahead of us counts: a resumed run continues past it
        stop_at = cfg.stop_at_step if cfg.stop_at_step > self.step else 0
        stop_requested = _CtrlC()
        while not self.done():
            if (stop_at and self.step >= stop_at) or stop_requested.pressed:
                interrupted = True
                break
            result = self.train_step()
            window_tokens += result.tokens
            now = time.perf_counter()
            if now - window_t0 >= 1.0:
                tokens_per_s = window_tokens / (now - window_t0)
                window_tokens, window_t0 = 0, now
            if by_time:
                bar.update(int(self.elapsed_s) - bar.n)
            else:
                bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            if cfg.log_every_steps and self.step % cfg.log_every_steps == 0:
                self.log_metrics(
                    "train",
                    loss=result.loss,
                    lr=result.lr,
                    grad_norm=result.grad_norm,
                    tokens=self.tokens_seen,
                    tokens_per_s=round(tokens_per_s, 1),
                    **result.extra,
                )
            if self.done():
                break
            if (cfg.eval_every_steps and self.step % cfg.eval_every_steps == 0) or (
                cfg.eval_every_s and self.elapsed_s - last_eval_t >= cfg.eval_every_s
            ):
                metrics = self.run_eval()
                last_eval_t = self.elapsed_s
                if metrics:
                    bar.write(_format_eval(self.step, self.elapsed_s, metrics))
            if cfg.sample_every_steps and self.step % cfg.sample_every_steps == 0:
                for text in self.run_samples():
                    bar.write(f"--- sample @ step {self.step}\n{text}")
            if (cfg.checkpoint_every_steps and self.step % cfg.checkpoint_every_steps == 0) or (
                cfg.checkpoint_every_s and self.elapsed_s - last_ckpt_t >= cfg.checkpoint_every_s
            ):
                self.save_checkpoint()
                last_ckpt_t = self.elapsed_s
        bar.close()
        stop_requested.restore()
        if stop_requested.pressed:
            print(f"interrupted at step {self.step}: saving a checkpoint to resume from")
        metrics = {}
        if not interrupted:
            metrics = self.run_eval()
        self.save_checkpoint()
        if self.logger is not None:
            self.logger.plot()
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "elapsed_s": self.elapsed_s,
            "interrupted": interrupted,
            **metrics,
        }

    def close(self) -> None:
        """Flush logs and draw the final plot."""
        if self.logger is not None:
            self.logger.close()


class _CtrlC:
    """Turns the first Ctrl-C into a request to stop after the current step.

    Stopping between steps (not in the middle of one) leaves a consistent state
    to checkpoint, so the run can be resumed exactly. A second Ctrl-C interrupts
    at once, as usual.
    """

    def __init__(self) -> None:
        self.pressed = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def _format_eval(step: int, elapsed_s: float, metrics: dict[str, float]) -> str:
    text = f"step {step} ({elapsed_s / 60:.1f} min): val loss {metrics['val_loss']:.4f}"
    if "val_bpb" in metrics:
        text += f", bits/byte {metrics['val_bpb']:.4f}"
    return text
