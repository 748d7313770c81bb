"""Build script for MiniGPT's C++ extension, ``minigpt._C``.

Everything in ``csrc/cpu/*.cpp`` is compiled into one shared library. Importing
``minigpt._C`` runs the static ``TORCH_LIBRARY`` registrations, which makes the
kernels callable as ``torch.ops.minigpt.<name>``.

Why the flags look the way they do:

* ``-O3`` and no ``-march=native``: the wheel must run on any x86-64 (or ARM) CPU.
  The SIMD kernels live in ``csrc/cpu/isa_*.cpp``; each of those files turns on its
  instruction set with ``#pragma GCC target`` and is only called after a run-time
  CPU check (see ``csrc/cpu/isa.cpp``).
* ``-fopenmp`` at compile time only: ``at::parallel_for`` is an inline OpenMP loop in
  the ATen headers. We do not link our own libgomp; the symbols resolve to the one
  torch already loaded, so there is a single OpenMP thread pool.
* CUDA sources (``csrc/cuda/*.cu``) are added only when torch is a CUDA build and a
  CUDA toolkit is found, so a CPU-only machine never needs nvcc.

Install with ``pip install --no-build-isolation -e .`` so the build uses the torch
already in the environment.
"""

from __future__ import annotations

import glob
import os
import platform

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions() -> tuple[list, dict]:
    import torch
    from torch.utils import cpp_extension

    cpu_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    is_x86 = platform.machine().lower() in ("x86_64", "amd64")

    cxx_flags = [
        "-O3",
        "-fopenmp",
        "-Wall",
        "-Wno-unknown-pragmas",
        "-fno-math-errno",
        # GCC 12 false positive on the _mm512_undefined_* idiom in its own headers
        "-Wno-maybe-uninitialized",
    ]
    if not is_x86:
        cxx_flags.append("-DMINIGPT_NO_X86_SIMD")
    include_dirs = [os.path.join(ROOT, "csrc")]

    use_cuda = (
        bool(cuda_sources)
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("MINIGPT_BUILD_CUDA", "1") != "0"
    )
    if use_cuda:
        ext = cpp_extension.CUDAExtension(
            "minigpt._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags + ["-DMINIGPT_WITH_CUDA"], "nvcc": ["-O3"]},
        )
    else:
        ext = cpp_extension.CppExtension(
            "minigpt._C",
            cpu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
        )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
