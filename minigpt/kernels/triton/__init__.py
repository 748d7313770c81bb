"""Triton GPU kernels behind :mod:`minigpt.kernels`.

Each module holds the ``@triton.jit`` kernels of one op family, Python wrappers
with the same signatures as the matching C++ ops (``torch.ops.minigpt.*``), and
``COMPILE_SPECS``: the argument types needed to compile each kernel ahead of
time for real GPUs (see :mod:`minigpt.kernels.triton.compile_check`). Importing
these modules requires the ``triton`` package; the dispatcher imports them only
when the Triton backend is chosen.
"""
