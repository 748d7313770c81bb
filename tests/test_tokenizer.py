"""Tests of the byte-level BPE tokenizer (minigpt.tokenizer) and its C++ core.

The Python reference (regex pre-split, reference.py) is the spec: the C++ core
must split, train and encode identically. GPT-2 loaded from its released files
must match tiktoken, and the Hugging Face export must match transformers.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizer_testing import (
    EN_CORPORA,
    GPT2_DIR,
    TRICKY,
    ZH_CORPORA,
    corpus_slice,
    tiktoken_gpt2,
)

from minigpt.tokenizer import DEFAULT_SPECIALS, PATTERNS, Tokenizer, split_text, train_tokenizer
from minigpt.tokenizer._native import native_available
from minigpt.tokenizer.bytes_unicode import bytes_to_unicode_str, unicode_str_to_bytes
from minigpt.tokenizer.reference import encode_piece, merge_word, train_bpe

assert native_available(), "minigpt._C has no BPE core: run tools/build_ext.sh"


def native_split(text: str, pattern: str) -> list[str]:
    data = text.encode("utf-8")
    ends = torch.ops.minigpt.bpe_pretokenize(text, pattern).tolist()
    starts = [0] + ends[:-1]
    return [data[s:e].decode("utf-8") for s, e in zip(starts, ends)]


def training_text() -> list[str]:
    return [
        corpus_slice("en", "shakespeare", 150_000),
        corpus_slice("en", "sotu", 60_000),
        corpus_slice("zh", "poetry", 30_000),
        TRICKY * 3,
    ]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """A small trained tokenizer (C++ trainer), shared by the module's tests."""
    return train_tokenizer(training_text(), 1024, progress=False)


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return Tokenizer.from_gpt2_files(GPT2_DIR / "vocab.json", GPT2_DIR / "merges.txt")


# ------------------------------------------------------------------ pre-split
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize(
    "lang,name", [("en", n) for n in EN_CORPORA] + [("zh", n) for n in ZH_CORPORA]
)
def test_pretokenize_cpp_matches_regex_on_corpora(lang, name, pattern):
    text = corpus_slice(lang, name, 60_000, start=10_000) + TRICKY
    assert native_split(text, pattern) == split_text(text, pattern)


_ALPHABET = st.sampled_from(
    list("aZ09 '\t\r\n\x0b\x0c\x1c\x85.,!?-_sStTrReEvVmMlLdD")
    + ["\u00a0", "\u2009", "\u3000", "ſ", "é", "中", "文", "😀", "👍🏽", "\u200d", "½", "١", "Ⅻ"]
    + ["\u0301", "\ufffd", "\U0001f600", "\U000e0001"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_ALPHABET, max_size=40).map("".join), st.sampled_from(sorted(PATTERNS)))
def test_pretokenize_cpp_matches_regex_fuzz(text, pattern):
    assert native_split(text, pattern) == split_text(text, pattern)


def test_pretokenize_examples():
    assert split_text("Hello world!! 1234", "gpt4") == ["Hello", " world", "!!", " ", "123", "4"]
    assert split_text("you'RE  x\n\n y", "gpt4") == ["you", "'RE", " ", " x", "\n\n", " y"]
    assert split_text("you'RE 1234", "gpt2") == ["you", "'", "RE", " 1234"]


def test_pretokenize_bad_pattern():
    with pytest.raises(ValueError, match="pattern"):
        split_text("x", "gpt3")
    with pytest.raises(ValueError, match="pattern"):
        torch.ops.minigpt.bpe_pretokenize("x", "gpt3")


# ------------------------------------------------------------------- training
def test_reference_merge_word_left_to_right():
    assert merge_word([1, 1, 1], 1, 1, 9) == [9, 1]
    assert merge_word([1, 1, 1, 1], 1, 1, 9) == [9, 9]
    assert merge_word([2, 1, 2], 1, 1, 9) == [2, 1, 2]


def test_reference_train_tiny_example():
    # "ab" occurs 5+2 times, "bc" 2 times: ab first, then (ab, c)
    merges, token_bytes = train_bpe({b"ab": 5, b"abc": 2}, 2)
    assert merges == [(97, 98, 256), (256, 99, 257)]
    assert token_bytes[256:] == [b"ab", b"abc"]


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_cpp_trainer_matches_python_reference(pattern):
    texts = training_text()
    ref = train_tokenizer(texts, 900, pattern=pattern, progress=False, use_native=False)
    fast = train_tokenizer(texts, 900, pattern=pattern, progress=False, use_native=True)
    assert len(ref.merges) == 900 - 256 - len(DEFAULT_SPECIALS)
    assert fast.merges == ref.merges
    assert fast.token_bytes == ref.token_bytes
    assert fast.fingerprint == ref.fingerprint


def test_cpp_trainer_word_counts_match_python():
    from collections import Counter

    from minigpt.tokenizer._native import new_trainer, unpack_bytes
    from minigpt.tokenizer.train import count_words

    texts = training_text()
    trainer = new_trainer("gpt4")
    trainer.add_texts(texts, 2)
    flat, offsets, counts = trainer.words()
    native = Counter(dict(zip(unpack_bytes(flat, offsets), counts.tolist())))
    assert native == count_words(texts, "gpt4")


def test_training_stops_when_pairs_run_out():
    tok = train_tokenizer(["abab"], 1000, progress=False, special_tokens=["<|bos|>"])
    assert tok.token_bytes[256:] == [b"ab", b"abab"]
    assert tok.vocab_size == 259 and tok.bos_id == 258


def test_training_progress_bar(capsys):
    train_tokenizer(["hello world " * 50], 300, progress=True)
    assert "merges" in capsys.readouterr().err


def test_train_bad_input():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["x"], 100)
    with pytest.raises(TypeError, match="iterable of documents"):
        train_tokenizer("just one string", 300)
    with pytest.raises(TypeError, match="item 1"):
        train_tokenizer(["ok", 3], 300, progress=False)
    with pytest.raises(ValueError, match="pattern"):
        train_tokenizer(["x"], 300, pattern="bert")
    with pytest.raises(ValueError, match="distinct"):
        train_tokenizer(["x"], 300, special_tokens=["<a>", "<a>"])


# ------------------------------------------------------------------- encoding
def test_encode_matches_python_reference(tok):
    ref = Tokenizer.from_dict(tok.to_dict(), use_native=False)
    assert tok.uses_native and not ref.uses_native
    for text in [
        corpus_slice("en", "austen", 20_000),
        corpus_slice("zh", "fortunes", 8_000),
        TRICKY,
        "a" * 1000 + "中" * 300 + " " * 400 + "!" * 200,  # long pieces: the heap path
        "",
    ]:
        assert tok.encode(text) == ref.encode(text)


def test_long_piece_paths_agree(tok):
    """Pieces > 128 bytes take the O(n log n) heap path; it must equal the simple one."""
    ranks = {(a, b): (r, c) for r, (a, b, c) in enumerate(tok.merges)}
    for piece in ["ab" * 200, "中文" * 100, "the" * 77, "😀" * 60]:
        assert tok.encode(piece) == encode_piece(piece.encode(), ranks, tok.byte_ids)


@pytest.mark.parametrize("lang,name", [("en", "kjv"), ("zh", "poetry"), ("en", "fortunes")])
def test_roundtrip_corpora(tok, lang, name):
    text = corpus_slice(lang, name, 50_000) + TRICKY
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_roundtrip_any_string(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    text = "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)
    assert tok.decode(ids) == text


def test_encode_batch_matches_encode(tok):
    texts = [corpus_slice("en", "brown", 3000, start=i * 3000) for i in range(9)]
    texts += ["", TRICKY]
    expected = [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts) == expected
    assert tok.encode_batch(texts, num_threads=1) == expected
    assert tok.encode_batch(texts, num_threads=3) == expected
    assert tok.encode_batch([]) == []
    with pytest.raises(TypeError):
        tok.encode_batch("one string")
    with pytest.raises(ValueError, match="num_threads"):
        tok.encode_batch(["a"], num_threads=0)


def test_byte_fallback_splits_and_joins(tok):
    # a character never seen in training still round-trips via its bytes
    ids = tok.encode("\U0001f9ea")
    assert len(ids) >= 1 and tok.decode_bytes(ids) == "\U0001f9ea".encode()
    assert tok.decode(ids[:1]) == "\ufffd" or len(ids) == 1


def test_lone_surrogate_is_replaced(tok):
    assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"


def test_encode_decode_bad_input(tok):
    with pytest.raises(TypeError, match="str"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="outside"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="outside"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="ints"):
        tok.decode([1.5])
    with pytest.raises(TypeError, match="ints"):
        tok.decode([True])
    with pytest.raises(ValueError, match="outside"):
        tok.decode([2**70])
    with pytest.raises(TypeError, match="ints"):
        tok.decode(torch.tensor([1.0]))
    assert tok.decode(torch.tensor([72, 105])) == "Hi"
    assert tok.decode(np.array([72, 105], dtype=np.uint16)) == "Hi"
    assert tok.decode(i for i in [72, 105]) == "Hi"
    assert tok.decode([]) == ""


# --------------------------------------------------------------- special tokens
def test_special_tokens_layout(tok):
    n = len(tok.token_bytes)
    assert list(tok.special_tokens) == list(DEFAULT_SPECIALS)
    assert sorted(tok.special_tokens.values()) == list(range(n, tok.vocab_size))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == tuple(range(n, n + 3))
    # never produced from text, and no merge creates them
    assert not set(tok.encode("<|bos|><|user|><|end|>")) & set(tok.special_tokens.values())
    assert all(c < n for _, _, c in tok.merges)


def test_special_tokens_opt_in_and_bos_eos(tok):
    ids = tok.encode("a<|user|>b", allowed_special=True)
    assert ids == tok.encode("a") + [tok.special_tokens["<|user|>"]] + tok.encode("b")
    ids = tok.encode("hi", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "<|bos|>hi<|eos|>"


# ------------------------------------------------------------------------ chat
def test_chat_template_and_assistant_mask(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
    ]
    ids, mask = tok.apply_chat_template(messages)
    sp = tok.special_tokens
    expected = (
        [sp["<|bos|>"], sp["<|system|>"]]
        + tok.encode("Be brief.")
        + [sp["<|end|>"], sp["<|user|>"]]
        + tok.encode("Hi there")
        + [sp["<|end|>"], sp["<|assistant|>"]]
    )
    answer = tok.encode("Hello!") + [sp["<|end|>"]]
    assert ids == expected + answer
    assert mask == [False] * len(expected) + [True] * len(answer)
    gen_ids, gen_mask = tok.apply_chat_template(messages[:2], add_generation_prompt=True)
    assert gen_ids == expected and not any(gen_mask)


def test_chat_template_bad_input(tok, gpt2):
    with pytest.raises(ValueError, match="role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="messages\\[0\\]"):
        tok.apply_chat_template([{"content": "x"}])
    with pytest.raises(TypeError):
        tok.apply_chat_template({"role": "user", "content": "x"})
    with pytest.raises(ValueError, match="chat special tokens"):
        gpt2.apply_chat_template([{"role": "user", "content": "x"}])


# ------------------------------------------------------------------ save/load
def test_save_load_roundtrip(tok, tmp_path):
    path = tmp_path / "tok.json"
    tok.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.fingerprint == tok.fingerprint
    assert loaded.merges == tok.merges and loaded.special_tokens == tok.special_tokens
    text = TRICKY + corpus_slice("en", "mobydick", 5000)
    assert loaded.encode(text) == tok.encode(text)
    d = json.loads(path.read_text())
    assert d["format"] == "minigpt-bpe" and d["tokens"][32] == "Ġ"
    assert pickle.loads(pickle.dumps(tok)).encode(text) == tok.encode(text)


def test_load_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Tokenizer.load(bad)
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="minigpt-bpe"):
        Tokenizer.load(bad)


def test_constructor_checks():
    tokens = [bytes([i]) for i in range(256)] + [b"ab"]
    with pytest.raises(ValueError, match="bytes of"):
        Tokenizer("gpt4", tokens, [(97, 99, 256)])
    with pytest.raises(ValueError, match="outside"):
        Tokenizer("gpt4", tokens, [(97, 98, 999)])
    with pytest.raises(ValueError, match="special token ids"):
        Tokenizer("gpt4", tokens, [(97, 98, 256)], special_tokens={"<|bos|>": 300})


def test_bytes_unicode_mapping_roundtrip():
    data = bytes(range(256))
    s = bytes_to_unicode_str(data)
    assert len(s) == 256 and all(c.isprintable() and not c.isspace() for c in s)
    assert unicode_str_to_bytes(s) == data
    with pytest.raises(ValueError):
        unicode_str_to_bytes("\u4e2d")


# ------------------------------------------------------------ GPT-2 parity
def test_gpt2_files_load(gpt2):
    assert gpt2.vocab_size == 50257 and len(gpt2.merges) == 50000
    assert gpt2.special_tokens == {"<|endoftext|>": 50256}
    assert gpt2.bos_id == gpt2.eos_id == 50256 and gpt2.pattern == "gpt2"


@pytest.mark.parametrize("name", EN_CORPORA)
def test_gpt2_matches_tiktoken_on_english(gpt2, name):
    enc = tiktoken_gpt2()
    text = corpus_slice("en", name, 150_000, start=5_000)
    assert gpt2.encode(text) == enc.encode_ordinary(text)


def test_gpt2_matches_tiktoken_on_chinese_and_emoji(gpt2):
    enc = tiktoken_gpt2()
    text = corpus_slice("zh", "poetry", 20_000) + TRICKY
    assert gpt2.encode(text) == enc.encode_ordinary(text)
    assert gpt2.decode(gpt2.encode(text)) == text


@pytest.mark.slow
@pytest.mark.parametrize("name", EN_CORPORA)
def test_gpt2_matches_tiktoken_full_corpora(gpt2, name):
    from tokenizer_testing import corpus_text

    enc = tiktoken_gpt2()
    text = corpus_text("en", name)
    assert gpt2.encode(text) == enc.encode_ordinary(text)


# ------------------------------------------------------------ HF export
def test_export_hf_encodes_identically(tok, tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok.export_hf(tmp_path)
    hf = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    text = corpus_slice("en", "sotu", 30_000, start=1_000_000) + corpus_slice("zh", "poetry", 5000)
    text += TRICKY
    ids = tok.encode(text)
    assert hf.encode(text, add_special_tokens=False) == ids
    assert hf.decode(ids) == text
    assert hf.bos_token_id == tok.bos_id and hf.eos_token_id == tok.eos_id
    assert hf.pad_token_id == tok.pad_id
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."}]
    hf_ids = hf.apply_chat_template(messages, tokenize=True)
    if not isinstance(hf_ids, list):  # transformers >= 5 returns a BatchEncoding
        hf_ids = hf_ids["input_ids"]
    assert hf_ids == tok.apply_chat_template(messages)[0]


def test_export_hf_gpt2_pattern(gpt2, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    gpt2.export_hf(tmp_path)
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = corpus_slice("en", "fortunes", 20_000) + TRICKY
    assert hf.encode(text, add_special_tokens=False).ids == gpt2.encode(text)


def test_max_pieces_bounds_memory_identically():
    texts = training_text()
    kwargs = dict(pattern="gpt4", progress=False, max_pieces=2000)
    ref = train_tokenizer(texts, 700, use_native=False, **kwargs)
    fast = train_tokenizer(texts, 700, use_native=True, **kwargs)
    assert fast.merges == ref.merges
    unbounded = train_tokenizer(texts, 700, progress=False)
    assert unbounded.merges != fast.merges  # pruning really happened

    from collections import Counter

    from minigpt.tokenizer.train import count_words, prune_counts

    counts = count_words(texts)
    assert len(counts) > 2000
    prune_counts(counts, 2000)
    assert len(counts) <= 1000 and min(counts.values()) >= 2
    with pytest.raises(ValueError, match="max_pieces"):
        train_tokenizer(texts, 700, max_pieces=0)
    assert isinstance(counts, Counter)


@pytest.mark.slow
@pytest.mark.parametrize(
    "lang,name", [("en", n) for n in EN_CORPORA] + [("zh", n) for n in ZH_CORPORA]
)
def test_pretokenize_cpp_matches_regex_full_corpora(lang, name):
    # the default pattern only: the gpt2 one is covered in full on English by the
    # tiktoken parity test, and on slices of every corpus by the fast tests
    from tokenizer_testing import corpus_text

    text = corpus_text(lang, name)
    assert native_split(text, "gpt4") == split_text(text, "gpt4")


# ------------------------------------------------------------ cl100k parity
def test_gpt4_pattern_reproduces_cl100k():
    """Our "gpt4" pre-split + cl100k_base's ranks give tiktoken's cl100k ids."""
    import tiktoken
    from tokenizer_testing import TIKTOKEN_CACHE

    tiktoken_gpt2()  # points tiktoken at the offline cache
    cl100k = tiktoken.get_encoding("cl100k_base")
    ranks_file = TIKTOKEN_CACHE / "9b5ad71b2ce5302211f9c61530b329a4922fc6a4"
    tok = Tokenizer.from_tiktoken_file(ranks_file)
    assert len(tok.token_bytes) == 100256 and tok.special_tokens == {}
    for lang, name in [("en", "sotu"), ("en", "fortunes"), ("zh", "poetry"), ("zh", "fortunes")]:
        text = corpus_slice(lang, name, 40_000, start=20_000) + TRICKY
        assert tok.encode(text) == cl100k.encode_ordinary(text)


def test_tiktoken_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_tiktoken_file(tmp_path / "none.tiktoken")
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("QQ== 0\nnot-a-line\n")
    with pytest.raises(ValueError, match="bad.tiktoken:2"):
        Tokenizer.from_tiktoken_file(bad)
