"""Tokenizer: training and encoding speed vs tiktoken and Hugging Face `tokenizers`.

Goals (issue 3), each a ratio measured in the same run:

* training an 8,192-token vocabulary on 10 MB of English takes at most 2x the
  time of Hugging Face's BPE trainer on the same text and pattern;
* single-thread encoding with GPT-2's vocabulary reaches at least 0.5x
  tiktoken's throughput and beats Hugging Face `tokenizers`.

Our encoder keeps a cache of encoded pre-tokens across calls; every timed call
here starts from an empty cache (``clear_cache``), so repeated rounds do not
flatter us. ``extra_info`` also reports MB/s of each contestant and the
compression (UTF-8 bytes per token) of our trained vocabulary vs GPT-2's on
held-out text.
"""

from __future__ import annotations

import gzip
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt.tokenizer import PATTERNS, Tokenizer, train_tokenizer  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
GPT2 = SHARED / "tokenizers" / "gpt2"


def english(n_chars: int, names=("sotu", "austen", "brown", "kjv", "mobydick")) -> list[str]:
    """About ``n_chars`` characters of English documents, mixed from several corpora."""
    docs: list[str] = []
    per = n_chars // len(names)
    for name in names:
        with gzip.open(SHARED / "en" / f"{name}.txt.gz", "rt", encoding="utf-8") as f:
            text = f.read(per)
        docs += [d for d in text.split("\n\n\n") if d.strip()]
    return docs


def english_stream(n_chars: int, names=("sotu", "austen", "brown", "kjv", "mobydick")):
    """Like :func:`english` but lazy: read in 1 MB chunks, never the whole text at once."""
    per = n_chars // len(names)
    for name in names:
        with gzip.open(SHARED / "en" / f"{name}.txt.gz", "rt", encoding="utf-8") as f:
            left, rest = per, ""
            while left > 0:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)
                *docs, rest = (rest + chunk).split("\n\n\n")
                yield from (d for d in docs if d.strip())
            if rest.strip():
                yield rest


def peak_rss_mb_of_training(n_chars: int, vocab_size: int = 8192) -> float:
    """Peak resident memory (MB) of a fresh process that trains on ``n_chars`` streamed."""
    import subprocess

    code = (
        "import resource, bench_tokenizer as b\n"
        f"b.train_tokenizer(b.english_stream({n_chars}), {vocab_size}, progress=False)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        check=True,
    )
    return round(float(out.stdout.strip().splitlines()[-1]), 1)


def _mb_per_s(extra: dict, n_bytes: int) -> None:
    if "time_ms" in extra:
        extra["MB/s"] = {
            k: round(n_bytes / (v / 1e3) / 1e6, 2) for k, v in extra["time_ms"].items()
        }


def _hf_trainer(docs: list[str], vocab_size: int):
    from tokenizers import Regex, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    def run():
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PATTERNS["gpt4"]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        hf.train_from_iterator(docs, trainer)
        return hf

    return run


def test_train_8192_on_10mb(compare):
    # smoke runs (--benchmark-disable) use 1 MB to stay quick; real runs the goal's 10 MB
    docs = english(1_000_000 if compare.benchmark.disabled else 10_000_000)
    n_bytes = sum(len(d.encode()) for d in docs)
    held_out = english(1_000_000, names=("shakespeare", "fortunes"))
    result = {}

    def ours():
        result["tok"] = train_tokenizer(docs, 8192, progress=False)

    extra = compare.run(ours, {"hf_tokenizers": _hf_trainer(docs, 8192)}, rounds=3, warmup=0)
    extra["corpus_MB"] = round(n_bytes / 1e6, 2)
    ours()
    tok = result["tok"]
    gpt2 = Tokenizer.from_gpt2_files(GPT2 / "vocab.json", GPT2 / "merges.txt")
    held_bytes = sum(len(d.encode()) for d in held_out)
    extra["bytes_per_token_ours_8192"] = round(
        held_bytes / sum(map(len, tok.encode_batch(held_out))), 3
    )
    extra["bytes_per_token_gpt2_50257"] = round(
        held_bytes / sum(map(len, gpt2.encode_batch(held_out))), 3
    )
    if not compare.benchmark.disabled:
        # bounded memory: peak RSS barely moves from 1 MB to 10 MB of streamed text
        extra["peak_rss_MB_train_1MB"] = peak_rss_mb_of_training(1_000_000)
        extra["peak_rss_MB_train_10MB"] = peak_rss_mb_of_training(10_000_000)
    if "speedup_vs_hf_tokenizers" in extra:
        # goal: at most 2x HF's time, i.e. speedup >= 0.5
        extra["goal_met"] = extra["speedup_vs_hf_tokenizers"] >= 0.5


@pytest.fixture(scope="module")
def encode_setup(request):
    import tiktoken
    from tokenizers import Tokenizer as HFTokenizer

    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tokenizers" / "tiktoken_cache")
    smoke = request.config.getoption("benchmark_disable", False)
    # encode paragraph by paragraph, the way documents and chat turns are encoded
    docs = [p for d in english(300_000 if smoke else 3_000_000) for p in d.split("\n\n")]
    ours = Tokenizer.from_gpt2_files(GPT2 / "vocab.json", GPT2 / "merges.txt")
    tik = tiktoken.get_encoding("gpt2")
    hf_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "minigpt_bench_gpt2_hf"
    ours.export_hf(hf_dir)
    hf = HFTokenizer.from_file(str(hf_dir / "tokenizer.json"))
    assert ours.encode(docs[0]) == tik.encode_ordinary(docs[0]) == hf.encode(docs[0]).ids
    return docs, ours, tik, hf


def test_encode_gpt2_single_thread(compare, encode_setup):
    docs, ours, tik, hf = encode_setup
    n_bytes = sum(len(d.encode()) for d in docs)

    def run_ours():
        ours._core.clear_cache()
        return [ours.encode(d) for d in docs]

    extra = compare.run(
        run_ours,
        {
            "tiktoken": lambda: [tik.encode_ordinary(d) for d in docs],
            "hf_tokenizers": lambda: [hf.encode(d, add_special_tokens=False).ids for d in docs],
        },
        rounds=5,
        warmup=1,
    )
    _mb_per_s(extra, n_bytes)
    extra["text_MB"] = round(n_bytes / 1e6, 2)
    extra["bytes_per_token"] = round(n_bytes / sum(map(len, run_ours())), 3)
    if "speedup_vs_tiktoken" in extra:
        extra["goal_met"] = (
            extra["speedup_vs_tiktoken"] >= 0.5 and extra["speedup_vs_hf_tokenizers"] > 1.0
        )


def test_encode_gpt2_batch_threads(compare, encode_setup):
    docs, ours, tik, hf = encode_setup
    n_bytes = sum(len(d.encode()) for d in docs)
    threads = os.cpu_count() or 1
    extra = compare.run(
        lambda: ours.encode_batch(docs, num_threads=threads),
        {
            "tiktoken": lambda: tik.encode_ordinary_batch(docs, num_threads=threads),
            "hf_tokenizers": lambda: [e.ids for e in hf.encode_batch(docs)],
        },
        rounds=5,
        warmup=1,
        threads=threads,
    )
    _mb_per_s(extra, n_bytes)
