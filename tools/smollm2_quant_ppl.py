"""Perplexity of SmolLM2-135M before and after each weight quantization method.

Re-measures the table of docs/quantization.md ("Accuracy"): the GGUF model
(its Q4_1 weights dequantized to float32) against int8, int4 g64 with
round-to-nearest, the searched group parameters (plain and activation-weighted)
and GPTQ, and NF4. Text: Jane Austen from ``../shared/data/en/austen.txt.gz``
beside the repo; evaluation = the first ``--eval-seqs`` x 256 tokens from
character 200,000 on, calibration = 2,048 tokens from characters
100,000-195,000 (the same slices as the slow test in tests/test_quant_hf.py).

    python tools/smollm2_quant_ppl.py                     # every method, 8 x 256 tokens
    python tools/smollm2_quant_ppl.py --methods rtn gptq  # a subset
    python tools/smollm2_quant_ppl.py --threads 2

Takes about 1-4 minutes per method on one core (GPTQ the longest).
"""

from __future__ import annotations

import argparse
import copy
import gzip
import math
import sys
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SEQ = 256


def _austen_ids(tok, start: int, length: int, n_tokens: int) -> torch.Tensor:
    with gzip.open(DATA / "en" / "austen.txt.gz", "rt", encoding="utf-8") as f:
        f.read(start)
        text = f.read(length)
    ids = torch.tensor(tok(text)["input_ids"][:n_tokens])
    if len(ids) != n_tokens:
        raise RuntimeError(f"the slice has only {len(ids)} tokens, {n_tokens} needed")
    return ids


def _ppl(model: torch.nn.Module, ids: torch.Tensor) -> float:
    x, y = ids[:-1].reshape(-1, SEQ), ids[1:].reshape(-1, SEQ)
    with torch.no_grad():
        logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    return math.exp(loss.item())


def main() -> int:
    import transformers

    from minigpt.model.hf import import_gguf, smollm2_gguf_path
    from minigpt.quant import NF4, Int4WeightOnly, Int8WeightOnly, quantize_

    cases = {
        "int8": (Int8WeightOnly(), "rtn"),
        "rtn": (Int4WeightOnly(64), "rtn"),
        "mse-plain": (Int4WeightOnly(64), "mse"),
        "mse": (Int4WeightOnly(64), "mse"),
        "gptq": (Int4WeightOnly(64), "gptq"),
        "nf4": (NF4(64), "rtn"),
        "nf4-gptq": (NF4(64), "gptq"),
    }
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", choices=list(cases), default=list(cases))
    p.add_argument("--eval-seqs", type=int, default=8, help="evaluation rows of 256 tokens")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    path = smollm2_gguf_path()
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = import_gguf(path).eval()
    ids = _austen_ids(tok, 200_000, 60_000, args.eval_seqs * SEQ + 1)
    calibration = list(_austen_ids(tok, 100_000, 95_000, 2048).reshape(-1, SEQ).split(4))
    base = _ppl(model, ids)
    print(f"SmolLM2-135M, {args.eval_seqs * SEQ} tokens of Austen: float ppl {base:.3f}")
    for name in args.methods:
        config, method = cases[name]
        t0 = time.process_time()
        cal = calibration if name in ("mse", "gptq", "nf4-gptq") else None
        q = quantize_(copy.deepcopy(model), config, method=method, calibration=cal)
        cpu = time.process_time() - t0
        ppl = _ppl(q, ids)
        print(f"{name:10s} ppl {ppl:8.3f}  {100 * (ppl / base - 1):+6.2f} %  ({cpu:.0f} CPU-s)")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
