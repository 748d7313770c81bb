"""Compile every Triton kernel ahead of time for real GPUs, without a GPU.

``triton.compile`` with an explicit ``GPUTarget`` lowers a kernel all the way to
PTX (and a cubin via ptxas) for a given architecture without touching a driver.
This is how MiniGPT's GPU kernels are checked on a CPU-only machine: the
interpreter tests check their numerics, this checks they are valid GPU code.

Run as ``python -m minigpt.kernels.triton.compile_check [--arch 80 90]``. It must
run in a process *without* ``TRITON_INTERPRET=1`` (the interpreter replaces the
JIT functions this needs). Prints one JSON line per kernel and architecture.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
from typing import Any


def kernel_specs() -> list[dict[str, Any]]:
    """All ``COMPILE_SPECS`` entries from the modules of this package."""
    import minigpt.kernels.triton as pkg

    specs = []
    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name == "compile_check":
            continue
        module = importlib.import_module(f"{pkg.__name__}.{mod.name}")
        for spec in getattr(module, "COMPILE_SPECS", []):
            specs.append({**spec, "module": mod.name})
    return specs


def compile_spec(spec: dict[str, Any], arch: int) -> dict[str, Any]:
    """Compile one kernel spec for ``sm_<arch>``; report success and PTX facts."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result: dict[str, Any] = {"kernel": spec["name"], "module": spec["module"], "arch": arch}
    start = time.perf_counter()
    try:
        src = ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"])
        compiled = triton.compile(
            src, target=GPUTarget("cuda", arch, 32), options=spec.get("options")
        )
        ptx = compiled.asm["ptx"]
        result.update(
            ok=True,
            ptx_bytes=len(ptx),
            has_mma="mma" in ptx,
            has_wgmma="wgmma" in ptx,
            target_line=next((ln for ln in ptx.splitlines() if ln.startswith(".target")), ""),
        )
    except Exception as e:  # report, never crash the whole check
        result.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def main(argv: list[str] | None = None) -> int:
    """Compile all kernels; exit 1 if any failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--module", default=None, help="only kernels of this module")
    args = parser.parse_args(argv)
    failed = 0
    for spec in kernel_specs():
        if args.module and spec["module"] != args.module:
            continue
        for arch in args.arch:
            res = compile_spec(spec, arch)
            failed += not res["ok"]
            print(json.dumps(res), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
