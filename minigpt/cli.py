"""The ``minigpt`` command line: ``minigpt <command> [options]``.

This file only routes. Each command lives with the layer it belongs to, in a
module that exposes ``add_arguments(parser)`` and ``run(args) -> int``; the
module is imported only when its command is used, so ``minigpt --help`` stays
fast. To add a command, add one line to ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module path, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("minigpt.kernels.cli", "show which kernel backend each op uses here"),
    "tokenizer": ("minigpt.tokenizer.cli", "train a BPE tokenizer; encode/decode text"),
    "data": ("minigpt.data.cli", "prepare token shards from a corpus source"),
    "train": ("minigpt.train.cli", "pretrain a GPT; no arguments = the 10-minute main job"),
    "generate": ("minigpt.infer.cli", "continue a prompt with a trained model (streaming)"),
    "chat": ("minigpt.infer.chat", "talk to a model in the terminal (/help for commands)"),
    "export": ("minigpt.model.cli", "export a model as a Hugging Face Llama checkpoint"),
    "quantize": ("minigpt.quant.cli", "write an int8/int4/nf4 weight-only quantized model"),
    "sft": ("minigpt.train.sft", "supervised chat fine-tuning (full or LoRA) of a model"),
    "dpo": ("minigpt.train.dpo", "preference-tune a model with DPO (frozen reference)"),
    "eval": ("minigpt.train.evaluate", "held-out task accuracy and text perplexity of models"),
    "pipeline": ("minigpt.train.chat_pipeline", "demo: pretrain -> SFT -> DPO on CPU (~30 min)"),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="minigpt", description="Train, tune, and talk to small GPT models."
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``minigpt`` script; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # parse the command name first, then let its module add its own options
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    name = argv[0]
    if name not in COMMANDS:
        parser.error(f"unknown command {name!r}; choose from {', '.join(COMMANDS)}")
    module = importlib.import_module(COMMANDS[name][0])
    sub = argparse.ArgumentParser(prog=f"minigpt {name}", description=COMMANDS[name][1])
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
