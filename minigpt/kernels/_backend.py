"""Backend selection for every op in :mod:`minigpt.kernels`.

Each op exists in up to three implementations:

* ``"torch"``  -- the eager float32 reference in :mod:`minigpt.kernels.reference`.
  It is the specification, always available, and what the tests compare against.
* ``"cpp"``    -- a C++ kernel in the ``minigpt._C`` extension (``csrc/cpu``), for CPU
  tensors, reached through ``torch.ops.minigpt.*``.
* ``"triton"`` -- a Triton kernel (``minigpt/kernels/triton``), for CUDA tensors, or
  for CPU tensors when ``TRITON_INTERPRET=1`` runs Triton's interpreter (how the
  GPU kernels are tested on a machine without a GPU).

The default is the fast backend for the tensor's device (``cpp`` on CPU,
``triton`` on CUDA). ``MINIGPT_BACKEND=torch|cpp|triton`` overrides it for the
whole process and the ``backend=`` argument of each op overrides it per call.
When the chosen backend cannot run (extension not built, no Triton, wrong
device), the op warns once and falls back to the reference: never silently.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from collections.abc import Iterable, Iterator

import torch

BACKENDS = ("torch", "cpp", "triton")

# op name -> the backends that implement it (filled by register_op at import time)
_OPS: dict[str, tuple[str, ...]] = {}
_warned: set[tuple[str, str, str]] = set()
_cache: dict[str, object] = {}
# (op, backend, device type) combinations known to run (never holds a fallback)
_usable: set[tuple[str, str, str]] = set()


def register_op(name: str, backends: Iterable[str]) -> None:
    """Declare that op ``name`` has the given backends (``"torch"`` is implied)."""
    backends = tuple(backends)
    for b in backends:
        if b not in BACKENDS:
            raise ValueError(f"unknown backend {b!r} for op {name!r}")
    _OPS[name] = tuple(dict.fromkeys(("torch", *backends)))
    _usable.clear()


def registered_ops() -> dict[str, tuple[str, ...]]:
    """All registered ops and the backends each one implements."""
    return dict(_OPS)


def cpp_available() -> bool:
    """True when the ``minigpt._C`` extension imported (its ops are registered)."""
    if "cpp" not in _cache:
        try:
            importlib.import_module("minigpt._C")
            _cache["cpp"] = True
        except ImportError as e:  # not built: `pip install --no-build-isolation -e .`
            _cache["cpp"] = False
            _cache["cpp_error"] = str(e)
    return bool(_cache["cpp"])


def triton_interpreter() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    """True when the ``triton`` package imports."""
    if "triton" not in _cache:
        try:
            importlib.import_module("triton")
            _cache["triton"] = True
        except ImportError as e:
            _cache["triton"] = False
            _cache["triton_error"] = str(e)
    return bool(_cache["triton"])


def _why_unusable(op: str, backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run ``op`` on ``device``, else the reason it cannot."""
    if backend == "torch":
        return None
    if backend not in _OPS.get(op, ()):
        return f"{op} has no {backend} implementation"
    if backend == "cpp":
        if device.type != "cpu":
            return f"the C++ backend runs on CPU tensors, not {device.type}"
        if not cpp_available():
            return "the minigpt._C extension is not built (pip install --no-build-isolation -e .)"
        return None
    # triton
    if not triton_available():
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpreter():
        return None
    return f"Triton needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors), got {device.type}"


def default_backend(device: torch.device) -> str:
    """The fast backend for a device: ``cpp`` for CPU, ``triton`` for CUDA."""
    if device.type == "cpu":
        return "cpp"
    if device.type == "cuda":
        return "triton"
    return "torch"


def _requested(backend: str | None) -> str | None:
    want = backend if backend is not None else (os.environ.get("MINIGPT_BACKEND") or None)
    if want is not None and want not in BACKENDS:
        source = "backend=" if backend is not None else "MINIGPT_BACKEND="
        raise ValueError(f"{source}{want!r} is not a backend; expected one of {BACKENDS}")
    return want


def select_backend(op: str, device: torch.device, backend: str | None = None) -> str:
    """Pick the backend that will run ``op`` for a tensor on ``device``.

    ``backend`` (per call) wins over ``MINIGPT_BACKEND`` (per process), which wins
    over the device default. If the winner cannot run here, a ``RuntimeWarning``
    is issued once per (op, backend, device type) and the reference is used.
    """
    want = _requested(backend) or default_backend(device)
    key = (op, want, device.type)
    if key in _usable:  # this call runs on every op call: skip the checks once passed
        return want
    why = _why_unusable(op, want, device)
    if why is None:
        if want != "triton":  # Triton on CPU depends on TRITON_INTERPRET: always re-check
            _usable.add(key)
        return want
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"minigpt.kernels.{op}: {want} backend unavailable ({why}); "
            "falling back to the eager torch reference",
            RuntimeWarning,
            stacklevel=3,
        )
    return "torch"


def info(print_table: bool = True) -> dict[str, object]:
    """Report which backend each op uses for CPU and CUDA tensors.

    Returns a dict (``{"cpp": bool, "triton": bool, "cpu_isa": str, "ops": {op:
    {"cpu": backend, "cuda": backend}}}``) and, by default, prints it as a table.
    The choice shown is the one :func:`select_backend` makes with no per-call
    override, so it reflects ``MINIGPT_BACKEND`` and what is installed.
    """
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    ops = {}
    for op in sorted(_OPS):
        row = {}
        for name, dev in (("cpu", cpu), ("cuda", cuda)):
            want = _requested(None) or default_backend(dev)
            why = _why_unusable(op, want, dev)
            if why is None and dev.type == "cuda" and not torch.cuda.is_available():
                row[name] = f"{want} (no CUDA device here)"
            else:
                row[name] = want if why is None else f"torch (fallback: {why})"
        ops[op] = row
    report: dict[str, object] = {
        "cpp": cpp_available(),
        "triton": triton_available(),
        "triton_interpreter": triton_interpreter(),
        "cuda": torch.cuda.is_available(),
        "cpu_isa": cpu_isa() if cpp_available() else "n/a",
        "ops": ops,
    }
    if print_table:
        print(
            f"minigpt._C: {'yes' if report['cpp'] else 'no'}   triton: "
            f"{'yes' if report['triton'] else 'no'}"
            f"{' (interpreter)' if report['triton_interpreter'] else ''}   "
            f"CUDA: {'yes' if report['cuda'] else 'no'}   CPU SIMD: {report['cpu_isa']}"
        )
        width = max([len(op) for op in ops] + [2])
        print(f"{'op':<{width}}  {'CPU tensors':<24}  CUDA tensors")
        for op, row in ops.items():
            print(f"{op:<{width}}  {row['cpu']:<24}  {row['cuda']}")
    return report


def cpu_isa() -> str:
    """The SIMD instruction set the C++ kernels use now: ``avx512``, ``avx2`` or ``scalar``."""
    if not cpp_available():
        raise RuntimeError("the minigpt._C extension is not built")
    return torch.ops.minigpt.cpu_isa()


@contextlib.contextmanager
def force_cpu_isa(name: str) -> Iterator[None]:
    """Run the C++ kernels with a lower instruction set inside a ``with`` block.

    Used by the tests to check the AVX2 and scalar paths on an AVX-512 machine;
    asking for more than the CPU has (or an unknown name) raises ``ValueError``.
    """
    previous = cpu_isa()
    torch.ops.minigpt.set_cpu_isa(name)
    try:
        yield
    finally:
        torch.ops.minigpt.set_cpu_isa(previous)
