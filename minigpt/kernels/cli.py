"""``minigpt info``: print which backend each kernel uses on this machine."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options: the report reflects MINIGPT_BACKEND and what is installed."""


def run(args: argparse.Namespace) -> int:
    """Print the backend table of :func:`minigpt.kernels.info`."""
    from minigpt.kernels import info

    info()
    return 0
