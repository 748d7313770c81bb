"""The learning-rate schedule: linear warmup, then cosine decay to a floor.

::

    lr
    max_lr |      ______
           |     /      ``--..
           |    /             `-.
           |   /                 `-.
    min_lr |  /                     `--.___
           +--|-----------------------------|--> progress
              warmup                        end

Why warmup: at step 0 Adam's second-moment estimates are built from one
gradient, so its steps are large and noisy; growing the LR from ~0 over the
first few hundred steps keeps the freshly initialised network from being
knocked into a bad region. Why cosine: a high LR makes fast progress but leaves
the loss "bouncing" at a noise floor set by the LR; decaying it lets the model
settle into the basin it found. Cosine spends most of the run near the high LR
and decays smoothly at the end.

The decay is driven by a *progress* fraction in [0, 1] rather than a step
count, so the same function serves step-budgeted runs (progress = step / total)
and wall-time-budgeted runs (progress = elapsed seconds / budget seconds).
"""

from __future__ import annotations

import math


def warmup_cosine_lr(
    step: int,
    progress: float,
    *,
    max_lr: float,
    min_lr: float,
    warmup_steps: int,
) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Args:
        step: number of optimizer steps already taken.
        progress: fraction of the decay phase completed, in [0, 1] (clamped).
            For a step budget of ``total`` steps use
            ``(step - warmup_steps) / (total - warmup_steps)``.
        max_lr: peak learning rate, reached at the end of warmup.
        min_lr: the floor the cosine decays to (often max_lr / 10).
        warmup_steps: steps of linear warmup from max_lr / warmup_steps to max_lr.

    Returns:
        the learning rate (a Python float).
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if min_lr > max_lr:
        raise ValueError(f"min_lr ({min_lr}) must not exceed max_lr ({max_lr})")
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    p = min(max(progress, 0.0), 1.0)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * p)) * (max_lr - min_lr)


def step_progress(step: int, warmup_steps: int, total_steps: int) -> float:
    """Progress of the cosine phase for a run of ``total_steps`` optimizer steps."""
    span = max(total_steps - warmup_steps, 1)
    return (step - warmup_steps) / span
