"""minigpt.nn -- ``nn.Module`` building blocks that call :mod:`minigpt.kernels`.

Modules hold parameters and configuration; the math is in the functional ops,
so a learner can read a module in a minute and follow it into the kernel.
"""

from minigpt.nn.norm import RMSNorm

__all__ = ["RMSNorm"]
