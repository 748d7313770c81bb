"""minigpt.train -- the trainer core, checkpoints, run logging, and the stages.

    from minigpt.train import Trainer, TrainConfig, OptimConfig
    trainer = Trainer(model, TrainConfig(max_steps=100), OptimConfig(lr=1e-3), batches)
    trainer.fit()

``core`` is the loop every stage shares; ``pretrain`` is the first stage (and
``minigpt train``, the main job). See ``docs/training.md``.
"""

from minigpt.train.checkpoint import CheckpointError, CheckpointManager, load_checkpoint
from minigpt.train.config import config_to_yaml, load_config
from minigpt.train.core import (
    OptimConfig,
    TrainConfig,
    Trainer,
    build_optimizer,
    causal_lm_loss,
    param_groups,
)
from minigpt.train.schedule import warmup_cosine_lr

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "OptimConfig",
    "TrainConfig",
    "Trainer",
    "build_optimizer",
    "causal_lm_loss",
    "config_to_yaml",
    "load_checkpoint",
    "load_config",
    "param_groups",
    "warmup_cosine_lr",
]
