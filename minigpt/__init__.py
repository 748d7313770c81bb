"""MiniGPT: a small-LLM library you can read end to end, built on fused kernels.

Layers, bottom up (each imports only the ones below it):

* ``minigpt.kernels`` -- functional ops (RMSNorm, RoPE, SwiGLU, fused linear +
  cross-entropy, ...), each with an eager float32 reference, a C++ CPU kernel and
  a Triton GPU kernel. Usable on their own in any PyTorch model.
* ``minigpt.nn`` -- ``nn.Module`` wrappers around those ops.

See ``README.md`` for the tour and ``docs/`` for the chapters.
"""

__version__ = "0.1.0"
