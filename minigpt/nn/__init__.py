"""minigpt.nn -- ``nn.Module`` building blocks that call :mod:`minigpt.kernels`.

Modules hold parameters and configuration; the math is in the functional ops,
so a learner can read a module in a minute and follow it into the kernel.
"""

from minigpt.nn.attention import CausalSelfAttention
from minigpt.nn.loss import LinearCrossEntropyLoss
from minigpt.nn.mlp import SwiGLUMLP
from minigpt.nn.moe import MoEMLP
from minigpt.nn.norm import RMSNorm
from minigpt.nn.rope import RotaryEmbedding

__all__ = [
    "CausalSelfAttention",
    "LinearCrossEntropyLoss",
    "MoEMLP",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLUMLP",
]
