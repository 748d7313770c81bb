"""minigpt.train -- the trainer core, checkpoints, run logging, and the stages.

    from minigpt.train import Trainer, TrainConfig, OptimConfig
    trainer = Trainer(model, TrainConfig(max_steps=100), OptimConfig(lr=1e-3), batches)
    trainer.fit()

``core`` is the loop every stage shares; ``pretrain`` is the first stage (and
``minigpt train``, the main job). See ``docs/training.md``.

Names are imported on first use (PEP 562), so ``minigpt train`` can set up the
OpenMP environment before torch is loaded (see ``minigpt/train/cli.py``).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CheckpointError": "minigpt.train.checkpoint",
    "CheckpointManager": "minigpt.train.checkpoint",
    "load_checkpoint": "minigpt.train.checkpoint",
    "config_to_yaml": "minigpt.train.config",
    "load_config": "minigpt.train.config",
    "OptimConfig": "minigpt.train.core",
    "TrainConfig": "minigpt.train.core",
    "Trainer": "minigpt.train.core",
    "build_optimizer": "minigpt.train.core",
    "causal_lm_loss": "minigpt.train.core",
    "param_groups": "minigpt.train.core",
    "warmup_cosine_lr": "minigpt.train.schedule",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'minigpt.train' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
