"""Benchmark harness: our op and its competitors, timed in the same run.

Every bench calls ``compare.run(ours, competitors, ...)``. pytest-benchmark times
``ours``; the competitors (eager reference, nearest torch built-in, torch.compile
of the reference, ...) are timed right after with the same method (median of
many rounds), and the ratios land in ``benchmark.extra_info``:

    time_ms[<name>]         median milliseconds of each competitor
    speedup_vs_<name>       competitor time / our time (> 1 means we are faster)
    GB/s, GFLOP/s           when the bench says how many bytes / flops one call moves

This machine is noisy: look at ratios from one run, not absolute times across
runs. ``pytest bench/ --benchmark-only`` runs them all; ``python bench/report.py
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
        gc.collect()
        self.benchmark.pedantic(ours, rounds=rounds, warmup_rounds=warmup, iterations=1)
        t_ours = self.benchmark.stats.stats.median
        times = {"minigpt": t_ours}
        for name, fn in competitors.items():
            gc.collect()
            times[name] = median_seconds(fn, rounds, warmup)
        extra["time_ms"] = {k: round(v * 1e3, 4) for k, v in times.items()}
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
