"""Where a run's numbers go: JSONL metrics, TensorBoard events, and a PNG plot.

Every record is one JSON object per line in ``<run>/metrics.jsonl`` with a
``kind`` ("train", "eval", "sample", "info"), the optimizer ``step`` and the
wall ``time_s`` since the run began; numeric fields also go to TensorBoard as
``<kind>/<field>``. ``close()`` draws ``<run>/curves.png``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from minigpt.train.plot import plot_curves
from minigpt.train.tensorboard import EventWriter

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "curves.png"


class RunLogger:
    """Logs metrics of one run directory (append-only, so a resumed run continues it).

    Args:
        run_dir: the run's directory (created if needed).
        tensorboard: also write TensorBoard event files.
    """

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_NAME
        self._file = open(self.metrics_path, "a")  # noqa: SIM115 -- kept open for the run
        self._events = EventWriter(self.run_dir) if tensorboard else None

    def log(self, kind: str, step: int, time_s: float, **values: Any) -> None:
        """Append one record; numeric values also become TensorBoard scalars."""
        record = {"kind": kind, "step": int(step), "time_s": round(float(time_s), 3), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._events is not None:
            scalars = {
                f"{kind}/{k}": float(v)
                for k, v in values.items()
                if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            }
            self._events.add_scalars(scalars, step)

    def plot(self) -> Path | None:
        """Redraw ``curves.png`` from everything logged so far."""
        self._file.flush()
        return plot_curves(self.metrics_path, self.run_dir / PLOT_NAME)

    def close(self) -> None:
        """Draw the plot and close the files."""
        if not self._file.closed:
            self.plot()
            self._file.close()
        if self._events is not None:
            self._events.close()
