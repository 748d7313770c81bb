"""Turn a pytest-benchmark JSON file into a markdown table of speedups.

pytest bench/ --benchmark-only --benchmark-json out.json
python bench/report.py out.json
"""

from __future__ import annotations

import json
import sys


def table(path: str) -> str:
    """Markdown table: bench, our median ms, each competitor's ms and our speedup."""
    with open(path) as f:
        data = json.load(f)
    lines = ["| bench | ours (ms) | competitors: ms (speedup) | throughput |", "|---|---:|---|---|"]
    for b in data["benchmarks"]:
        extra = b.get("extra_info", {})
        times = extra.get("time_ms", {})
        comps = ", ".join(
            f"{k} {v:.3f} ({extra.get(f'speedup_vs_{k}', float('nan')):.2f}x)"
            for k, v in times.items()
            if k != "minigpt"
        )
        thr = ", ".join(f"{extra[k]} {k}" for k in ("GB/s", "GFLOP/s") if k in extra)
        lines.append(f"| {b['name']} | {b['stats']['median'] * 1e3:.3f} | {comps} | {thr} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/report.py BENCH.json")
    print(table(sys.argv[1]))
