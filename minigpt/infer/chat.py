"""``minigpt chat MODEL``: talk to a model in the terminal, with streaming replies.

Lines starting with ``/`` are commands (``/help`` lists them): change a
sampling setting (``/temperature 0.7``, ``/top_k 40``, ``/top_p 0.9``,
``/min_p 0.05``, ``/max_new_tokens 300``, ``/repetition_penalty 1.1``,
``/seed 1``), set the system prompt (``/system You are terse.``), show the
settings (``/settings``), forget the conversation (``/reset``) or leave (``/quit``).

The conversation is rendered with the tokenizer's chat template each turn; the
KV cache is kept between turns (:class:`~minigpt.infer.session.ChatSession`), so
only the new message is run through the model. When the conversation outgrows
the model's context, the oldest tokens are dropped (and the cache rebuilt).
"""

from __future__ import annotations

import argparse
import sys

from minigpt.infer.cli import TextStreamer, add_sampling_arguments, config_from_args
from minigpt.infer.generate import GenerationConfig

HELP = """commands:
  /temperature X  /top_k N  /top_p X  /min_p X  /max_new_tokens N
  /repetition_penalty X  /seed N     change a sampling setting
  /system TEXT     set the system prompt (and reset)
  /settings        show the current settings
  /reset           forget the conversation
  /quit            leave (also Ctrl-D)"""

_SETTINGS = {
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "min_p": float,
    "max_new_tokens": int,
    "repetition_penalty": float,
    "seed": int,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``minigpt chat``."""
    parser.add_argument("model", help="model directory, Hugging Face directory or .gguf file")
    parser.add_argument("--system", default=None, help="system prompt")
    add_sampling_arguments(parser)


def handle_command(
    line: str, config: GenerationConfig, state: dict
) -> tuple[GenerationConfig, str]:
    """Apply one ``/command``; returns the new config and a message to print.

    ``state`` holds the conversation (``messages``) and ``system``; the message
    ``"quit"`` asks the loop to end.
    """
    name, _, value = line[1:].strip().partition(" ")
    value = value.strip()
    name = {"temp": "temperature", "max": "max_new_tokens", "exit": "quit"}.get(name, name)
    if name in ("quit", "q"):
        return config, "quit"
    if name == "help":
        return config, HELP
    if name == "reset":
        state["messages"] = []
        return config, "(conversation cleared)"
    if name == "system":
        state["system"] = value or None
        state["messages"] = []
        return config, f"(system prompt {'set' if value else 'cleared'}; conversation cleared)"
    if name == "settings":
        shown = {k: getattr(config, k) for k in _SETTINGS}
        return config, " ".join(f"{k}={v}" for k, v in shown.items())
    if name in _SETTINGS:
        try:
            new = config.replace(**{name: _SETTINGS[name](value)})
        except ValueError as e:
            return config, f"(bad value: {e})"
        return new, f"({name} = {getattr(new, name)})"
    return config, f"(unknown command /{name}; /help lists them)"


def run(args: argparse.Namespace) -> int:
    """The read-eval-print loop."""
    from minigpt.infer.loading import load_for_inference, stop_ids
    from minigpt.infer.session import ChatSession

    try:
        model, tok = load_for_inference(args.model, args.tokenizer, args.dtype)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if tok is None:
        print("error: no tokenizer found; pass --tokenizer PATH", file=sys.stderr)
        return 2
    config = config_from_args(args, stop_tokens=stop_ids(tok), truncate="left")
    state = {"messages": [], "system": args.system}
    session = ChatSession(model)
    print(f"chatting with {args.model} ({model.num_parameters() / 1e6:.2f}M parameters). /help")
    while True:
        try:
            line = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line.startswith("/"):
            config, message = handle_command(line, config, state)
            if message == "quit":
                return 0
            print(message)
            continue
        system = [{"role": "system", "content": state["system"]}] if state["system"] else []
        state["messages"].append({"role": "user", "content": line})
        try:
            ids, _ = tok.apply_chat_template(system + state["messages"], add_generation_prompt=True)
        except ValueError as e:  # e.g. a tokenizer without chat tokens
            print(f"error: {e}", file=sys.stderr)
            return 2
        print("bot> ", end="", flush=True)
        streamer = TextStreamer(tok, config.stop_tokens)
        try:
            out = session.generate(ids, config, tokenizer=tok, stream=streamer)
        except KeyboardInterrupt:  # stop this reply, keep chatting
            print(" [interrupted]")
            state["messages"].pop()
            continue
        print()
        state["messages"].append({"role": "assistant", "content": out.text or ""})
