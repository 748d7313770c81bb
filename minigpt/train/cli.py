"""``minigpt train``: pretrain a GPT (no arguments = the 10-minute main job).

Examples::

    minigpt train                                   # tokenizer + model on Shakespeare, 10 min
    minigpt train --config configs/pretrain_nano.yaml --out runs/nano
    minigpt train --set optim.lr=1e-3 --set model.n_layer=6 --time-budget 5
    minigpt train --out runs/nano --resume          # continue the newest checkpoint
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def _calm_openmp_on_a_busy_machine() -> None:
    """Let idle OpenMP threads sleep instead of spin when the CPUs are oversubscribed.

    By default torch's OpenMP workers busy-wait between parallel regions. On a
    machine whose load exceeds its cores, a spinning worker steals the time slice
    of the thread doing real work, and training can get several times slower
    (measured here: 6x at load 11 on 2 cores). ``OMP_WAIT_POLICY=PASSIVE`` fixes
    that; it is read when torch loads, which is why this module is imported
    before torch. An idle machine keeps the default (spinning reacts faster).
    """
    try:
        busy = os.getloadavg()[0] > (os.cpu_count() or 1)
    except OSError:
        busy = False
    if busy and "torch" not in __import__("sys").modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


_STARTED: float | None = time.perf_counter()  # before torch loads (see _job_start)
_calm_openmp_on_a_busy_machine()

from minigpt.train.checkpoint import CheckpointError  # noqa: E402  (after the OpenMP set-up)


def _job_start() -> float:
    """When this job began: the module's import for the first run of a process
    (so the budget includes loading torch), the call itself after that."""
    global _STARTED
    started, _STARTED = _STARTED, None
    return started if started is not None else time.perf_counter()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``minigpt train``."""
    from minigpt.train.config import add_override_argument

    parser.add_argument("--config", type=Path, help="YAML config (sections: data, model, ...)")
    add_override_argument(parser)
    parser.add_argument("--out", type=Path, help="run directory (default runs/train-<time>)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="",
        metavar="CHECKPOINT",
        help="continue from a checkpoint (default: the newest one in --out)",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        metavar="MINUTES",
        help="wall-time budget of the whole job (same as --set budget_minutes=...)",
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        help="stop after this many optimizer steps (0 = no limit; same as train.max_steps)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_config(args: argparse.Namespace):
    """The resolved :class:`PretrainConfig` of the command line."""
    from minigpt.train.config import load_config
    from minigpt.train.pretrain import PretrainConfig, build_model_config

    config_path = args.config
    if config_path is None and args.resume is not None and args.out is not None:
        saved = args.out / "config.yaml"  # a resumed run keeps its own config
        config_path = saved if saved.is_file() else None
    overrides = list(args.overrides)
    if args.time_budget is not None:
        overrides.append(f"budget_minutes={args.time_budget}")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.no_progress:
        overrides.append("train.progress=false")
    cfg = load_config(PretrainConfig, config_path, overrides)
    build_model_config(cfg.model, cfg.data.vocab_size)  # unknown model keys fail here, early
    return cfg


def run(args: argparse.Namespace) -> int:
    """Entry point of ``minigpt train``; returns the exit code."""
    from minigpt.train.pretrain import pretrain

    try:
        cfg = build_config(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"minigpt train: error: {e}")
        return 2
    if args.resume is not None and args.out is None and not args.resume:
        print("minigpt train: error: --resume without a path needs --out RUN_DIR")
        return 2
    out = args.out or Path("runs") / time.strftime("train-%Y%m%d-%H%M%S")
    resume = None
    if args.resume is not None:
        resume = Path(args.resume) if args.resume else out
    try:
        pretrain(cfg, out, resume=resume, started=_job_start())
    except CheckpointError as e:
        print(f"minigpt train: error: {e}")
        return 2
    return 0
