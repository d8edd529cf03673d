"""Reading corpora: the shipped demo JSONL, a user's JSONL, or plain text.

Every format yields records ``{"text": str, "split": "train" | "dev" | "test", "topic": str |
None}``.

- ``.jsonl`` / ``.jsonl.gz``: one JSON object per line with a ``text`` field; optional
  ``split`` ("train"/"dev"/"test"; dev and test are held out) and ``topic`` fields. Records
  without ``split`` are assigned one deterministically from a hash of their text
  (``heldout_fraction`` of them go to "test").
- ``.txt`` / ``.txt.gz``: documents separated by blank lines; splits assigned the same way.

Files are UTF-8; an undecodable byte is an error naming the file and line. ``iter_corpus``
streams the records (what ``prepare`` reads); ``read_corpus`` is the same records as a list.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

# "dev": held-out documents for choosing hyperparameters (a file may mark them; otherwise the
# evalset stage carves them out of "test" with dev_or_test), never trained on.
SPLITS = ("train", "dev", "test")


class CorpusError(ValueError):
    """A corpus file that cannot be read as documented; the message names the file."""


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _open_bytes(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _utf8_error(path: Path, fallback: UnicodeDecodeError) -> str:
    """Where the first invalid UTF-8 byte of ``path`` is, as ``path:line: ...`` (a second pass
    in binary, only on the error path, so valid files are read exactly as before)."""
    with _open_bytes(path) as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return (
                    f"{path}:{number}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column "
                    f"{exc.start + 1}); re-encode the file as UTF-8"
                )
    return f"{path}: not valid UTF-8 ({fallback.reason}); re-encode the file as UTF-8"


def _lines(path: Path, error: type[Exception] = CorpusError) -> Iterator[str]:
    """The text lines of a corpus file; undecodable or corrupt files raise ``error`` naming
    the file (and the line, for invalid UTF-8)."""
    try:
        with _open_text(path) as handle:
            yield from handle
    except UnicodeDecodeError as exc:
        raise error(_utf8_error(path, exc)) from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise error(f"{path}: not a readable gzip file ({exc})") from None


def _stem_suffix(path: Path) -> str:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return Path(name).suffix


def hashed_split(text: str, heldout_fraction: float) -> str:
    bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64
    return "test" if bucket < heldout_fraction else "train"


def dev_or_test(text: str, dev_fraction: float) -> str:
    """Which part of the held-out documents a document is in: a hash of its text independent
    of hashed_split's (salted), so the train split never moves."""
    digest = hashlib.sha256(b"dev:" + text.encode("utf-8")).digest()
    return "dev" if int.from_bytes(digest[:8], "big") / 2**64 < dev_fraction else "test"


def iter_jsonl(path: Path, error: type[Exception] = CorpusError) -> Iterator[tuple[int, Any]]:
    """(line number, decoded value) of each non-blank line; bad JSON raises ``error``
    naming the file and line."""
    for number, line in enumerate(_lines(path, error), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{path}:{number}: not valid JSON ({exc.msg})") from None


def _jsonl_records(path: Path) -> Iterator[dict[str, Any]]:
    for number, record in iter_jsonl(path):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CorpusError(f"{path}:{number}: each line needs a string 'text' field")
        split = record.get("split")
        if split is not None and split not in SPLITS:
            raise CorpusError(f"{path}:{number}: split must be one of {SPLITS}, got {split!r}")
        yield record


def _text_records(path: Path) -> Iterator[dict[str, Any]]:
    block: list[str] = []
    for line in _lines(path):
        if line.strip():
            block.append(line.rstrip("\n"))
        elif block:
            yield {"text": "\n".join(block)}
            block = []
    if block:
        yield {"text": "\n".join(block)}


def iter_corpus(path: str | Path, heldout_fraction: float = 0.05) -> Iterator[dict[str, Any]]:
    """The records of a corpus file one at a time, in file order, each with ``text``, ``split``
    and ``topic``: memory does not grow with the corpus. A missing file or an unknown format is
    an error at the call, before iteration; a corpus with no non-empty document is an error
    when iteration ends."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"corpus file not found: {path}")
    suffix = _stem_suffix(path)
    if suffix == ".jsonl":
        raw = _jsonl_records(path)
    elif suffix == ".txt":
        raw = _text_records(path)
    else:
        raise CorpusError(f"{path}: unsupported corpus format (use .jsonl, .txt, optionally .gz)")
    return _clean_records(path, raw, heldout_fraction)


def _clean_records(
    path: Path, raw: Iterator[dict[str, Any]], heldout_fraction: float
) -> Iterator[dict[str, Any]]:
    seen = False
    for record in raw:
        text = record["text"].strip()
        if not text:
            continue
        seen = True
        split = record.get("split") or hashed_split(text, heldout_fraction)
        yield {"text": text, "split": split, "topic": record.get("topic")}
    if not seen:
        raise CorpusError(f"{path}: no non-empty documents")


def read_corpus(path: str | Path, heldout_fraction: float = 0.05) -> list[dict[str, Any]]:
    """All records of a corpus file, each with ``text``, ``split`` and ``topic``."""
    return list(iter_corpus(path, heldout_fraction))


def split_records(records: list[dict[str, Any]], split: str) -> list[dict[str, Any]]:
    return [record for record in records if record["split"] == split]
