"""Benchmark harness: our op and its competitors, timed in the same run.

Every bench calls ``compare.run(ours, competitors, ...)``. pytest-benchmark times
``ours``; the competitors (eager reference, nearest torch built-in, torch.compile
of the reference, ...) are timed in the same rounds, interleaved: each round
runs every competitor once and then ``ours`` once, so a change in machine load
during the bench hits all of them alike and cancels out of the ratios. The
results land in ``benchmark.extra_info``:

    time_ms[<name>]         median wall milliseconds of each variant
    cpu_ms[<name>]          median process CPU milliseconds (all threads) per call:
                            less sensitive to other processes than wall time
    speedup_vs_<name>       competitor time / our time (> 1 means we are faster)
    GB/s, GFLOP/s           when the bench says how many bytes / flops one call moves

This machine is noisy: look at ratios from one run, not absolute times across
runs. ``fwd_bwd(fn, inputs, grads)`` builds the usual forward+backward step.
``pytest bench/ --benchmark-only`` runs them all; ``python bench/report.py
out.json`` turns ``--benchmark-json out.json`` into a markdown table. With
``--benchmark-disable`` (as in CI) each callable runs once, as a smoke test that
every competitor still works.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import pytest
import torch


def median_seconds(fn: Callable[[], object], rounds: int, warmup: int) -> float:
    """Median wall time of ``fn()`` over ``rounds`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Comparison:
    """Times one op against named competitors and records the ratios."""

    def __init__(self, benchmark) -> None:
        self.benchmark = benchmark

    def run(
        self,
        ours: Callable[[], object],
        competitors: dict[str, Callable[[], object]],
        *,
        bytes_moved: float | None = None,
        flops: float | None = None,
        rounds: int = 20,
        warmup: int = 3,
        **info: object,
    ) -> dict[str, object]:
        """Benchmark ``ours`` and every competitor; return the extra_info dict."""
        extra = self.benchmark.extra_info
        extra.update(info)
        if getattr(self.benchmark, "disabled", False):
            ours()
            for fn in competitors.values():
                fn()
            return extra
        for _ in range(warmup):
            for fn in (*competitors.values(), ours):
                fn()
        wall: dict[str, list[float]] = {name: [] for name in competitors}
        cpu: dict[str, list[float]] = {name: [] for name in (*competitors, "minigpt")}
        cpu_start = [0.0]

        def competitors_round() -> None:
            # pytest-benchmark calls this before each timed call of `ours`, untimed
            for name, fn in competitors.items():
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
            cpu_start[0] = time.process_time()

        def after_ours() -> None:
            cpu["minigpt"].append(time.process_time() - cpu_start[0])

        gc.collect()
        self.benchmark.pedantic(
            ours,
            setup=competitors_round,
            teardown=after_ours,
            rounds=rounds,
            warmup_rounds=0,
            iterations=1,
        )
        t_ours = self.benchmark.stats.stats.median
        times = {"minigpt": t_ours} | {k: statistics.median(v) for k, v in wall.items()}
        extra["time_ms"] = {k: round(v * 1e3, 4) for k, v in times.items()}
        extra["cpu_ms"] = {k: round(statistics.median(v) * 1e3, 4) for k, v in cpu.items()}
        for name in competitors:
            extra[f"speedup_vs_{name}"] = round(times[name] / t_ours, 3)
        if bytes_moved is not None:
            extra["GB/s"] = round(bytes_moved / t_ours / 1e9, 2)
        if flops is not None:
            extra["GFLOP/s"] = round(flops / t_ours / 1e9, 2)
        return extra


@pytest.fixture
def compare(benchmark) -> Comparison:
    """The comparison helper for one bench (see module docstring)."""
    return Comparison(benchmark)


def compiled(fn: Callable) -> Callable:
    """``torch.compile`` of a function, the strongest generic competitor."""
    return torch.compile(fn, dynamic=False)


def fwd_bwd(
    fn: Callable[..., object],
    inputs: tuple[torch.Tensor, ...],
    grads: torch.Tensor | tuple[torch.Tensor, ...],
) -> Callable[[], object]:
    """One training step of ``fn``: forward on ``inputs``, then backward.

    ``fn(*inputs)`` returns a tensor or a tuple of tensors; ``grads`` are the
    incoming gradients, one per output. The gradients with respect to every
    input that requires grad are computed (and returned, not accumulated into
    ``.grad``, so repeated calls do no extra accumulate pass).
    """
    wrt = tuple(t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad)
    grads = grads if isinstance(grads, tuple) else (grads,)

    def step() -> object:
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        return torch.autograd.grad(outs, wrt, grads)

    return step
