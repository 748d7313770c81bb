"""``minigpt generate MODEL --prompt TEXT``: continue a prompt, streaming the text.

MODEL is a directory written by training / ``save_model`` (with ``tokenizer.json``
beside it), a Hugging Face Llama directory, or a ``.gguf`` file. Example::

    minigpt generate runs/default/model --prompt "ROMEO:" --temperature 0.8 --top-p 0.95
"""

from __future__ import annotations

import argparse
import sys
import time

from minigpt.infer.generate import GenerationConfig


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The decoding options shared by ``generate`` and ``chat``."""
    d = GenerationConfig()
    g = parser.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=200, help="default: %(default)s")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=d.top_k, help="0 = off")
    g.add_argument("--top-p", type=float, default=0.95, help="1 = off (default 0.95)")
    g.add_argument("--min-p", type=float, default=d.min_p, help="0 = off")
    g.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty)
    g.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    g.add_argument("--tokenizer", default=None, help="tokenizer.json (default: beside the model)")


def config_from_args(args: argparse.Namespace, **extra) -> GenerationConfig:
    """A :class:`GenerationConfig` from the parsed decoding options."""
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop_strings=list(args.stop),
        **extra,
    )


class TextStreamer:
    """Turns a stream of token ids into printed text, a character at a time.

    A token can end in the middle of a multi-byte UTF-8 character, so the whole
    output is re-decoded and only the new, complete part is printed.
    """

    def __init__(self, tokenizer, skip_ids=(), out=sys.stdout) -> None:
        self.tokenizer, self.skip, self.out = tokenizer, set(skip_ids), out
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, row: int, token: int) -> None:
        if token in self.skip:
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # wait for the rest of the character
            return
        self.out.write(text[self.printed :])
        self.out.flush()
        self.printed = len(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``minigpt generate``."""
    parser.add_argument("model", help="model directory, Hugging Face directory or .gguf file")
    parser.add_argument("--prompt", default="", help="text to continue (default: from BOS)")
    parser.add_argument("--num-beams", type=int, default=1, help="> 1: beam search")
    parser.add_argument("--length-penalty", type=float, default=1.0, help="beam search only")
    parser.add_argument("--num-samples", type=int, default=1, help="independent continuations")
    parser.add_argument(
        "--truncate-left", action="store_true", help="cut a too-long prompt instead of failing"
    )
    add_sampling_arguments(parser)
    parser.add_argument(
        "--quant", choices=["int8", "int4", "nf4"], default=None, help="weight-only quantize first"
    )


def run(args: argparse.Namespace) -> int:
    """Load the model, generate, print the text (streamed when there is one sample)."""
    from minigpt.infer.generate import generate
    from minigpt.infer.loading import stop_ids

    try:
        from minigpt.quant.cli import load_for_generation  # handles quantized checkpoints

        model, tok = load_for_generation(args.model, args.tokenizer, args.dtype, args.quant)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if tok is None:
        print("error: no tokenizer found; pass --tokenizer PATH", file=sys.stderr)
        return 2
    prompt = tok.encode(args.prompt, add_bos=tok.bos_id is not None)
    if not prompt:
        print("error: empty prompt and the tokenizer has no BOS token", file=sys.stderr)
        return 2
    config = config_from_args(
        args,
        stop_tokens=stop_ids(tok),
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        truncate="left" if args.truncate_left else "error",
    )
    n = max(1, args.num_samples)
    stream = TextStreamer(tok, config.stop_tokens) if n == 1 and args.num_beams == 1 else None
    print(args.prompt, end="", flush=True)
    start = time.perf_counter()
    try:
        outs = generate(model, [prompt] * n, config, tokenizer=tok, stream=stream)
    except ValueError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    for i, out in enumerate(outs):
        if stream is None:
            print(("" if i == 0 else f"\n--- sample {i + 1}\n{args.prompt}") + (out.text or ""))
    count = sum(len(o.tokens) for o in outs)
    print(
        f"\n[{count} tokens in {seconds:.2f}s, {count / max(seconds, 1e-9):.1f} tokens/s, "
        f"stopped: {outs[0].finish_reason}]",
        file=sys.stderr,
    )
    return 0
