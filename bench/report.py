"""Turn a pytest-benchmark JSON file into a markdown table of speedups.

pytest bench/ --benchmark-only --benchmark-json out.json
python bench/report.py out.json
"""

from __future__ import annotations

import json
import sys


def table(path: str) -> str:
    """Markdown table: bench, our median ms, each competitor's ms and our speedup.

    When the bench recorded CPU time (``cpu_ms``, see bench/conftest.py), the last
    column gives our speedup in CPU time as well: with other processes competing
    for the cores it is steadier than the wall-time ratio.
    """
    with open(path) as f:
        data = json.load(f)
    lines = [
        "| bench | ours (ms) | competitors: ms (speedup) | throughput | CPU-time speedup |",
        "|---|---:|---|---|---|",
    ]
    for b in data["benchmarks"]:
        extra = b.get("extra_info", {})
        times = extra.get("time_ms", {})
        comps = ", ".join(
            f"{k} {v:.3f} ({extra.get(f'speedup_vs_{k}', float('nan')):.2f}x)"
            for k, v in times.items()
            if k != "minigpt"
        )
        thr = ", ".join(f"{extra[k]} {k}" for k in ("GB/s", "GFLOP/s") if k in extra)
        cpu = extra.get("cpu_ms", {})
        ours_cpu = cpu.get("minigpt")
        cpu_ratios = ", ".join(
            f"{k} {v / ours_cpu:.2f}x" for k, v in cpu.items() if k != "minigpt" and ours_cpu
        )
        median_ms = b["stats"]["median"] * 1e3
        lines.append(f"| {b['name']} | {median_ms:.3f} | {comps} | {thr} | {cpu_ratios} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/report.py BENCH.json")
    print(table(sys.argv[1]))
