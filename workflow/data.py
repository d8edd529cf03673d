"""Data stage: cut a corpus to an exact token budget, and build held-out evaluation sets.

    python -m workflow.data prepare --recipe JSON --corpus PATH --tokenizer DIR --out DIR
    python -m workflow.data evalset --recipe JSON --corpus PATH --out DIR

``prepare`` writes ``tokens.npy``: the corpus's training documents, each followed by the EOS
id, concatenated in file order and cut to exactly ``params.tokens`` tokens, as the smallest
unsigned integer type that holds the tokenizer's ids (uint16 up to 65,536 ids, else uint32).
It streams: documents are read one at a time, tokenized in batches by the tokenizer's Rust
batch encoding, and written through short-lived maps of the output file, so its memory does
not grow with the corpus or the budget; it stops reading once the budget is met. Readers map
the file (``np.load(path, mmap_mode="r")``). Too little text is an error that says how many
tokens the corpus holds. ``evalset`` writes the held-out split as ``topic.jsonl``
(paragraphs with their topic prompt and an English topic label, when the corpus has topics)
and ``heldout.jsonl`` (text for bits-per-byte), and a dev part of it (``dev/``, the same
files) for choosing hyperparameters.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from queue import Full, Queue
from typing import Any

import numpy as np

from workflow.artifacts import atomic_dir, parse_recipe_arg, write_json, write_recipe
from workflow.corpus import dev_or_test, iter_corpus, read_corpus
from workflow.prompts import TOPICS, topic_record

log = logging.getLogger("workflow.data")
# Bump when a change here changes what a stage writes (see workflow/stages.py).
# prepare 2: tokens.npy holds the smallest unsigned type for the vocabulary (was int32).
STAGE_VERSIONS = {"prepare": "2", "evalset": "3"}  # 2: a dev split; 3: topic prompts
ENCODE_BATCH = 512  # documents per call of the tokenizer's batch encoding
BATCH_CHARS = 2_000_000  # ...and at most this many characters, so long documents stay bounded
WRITE_WINDOW = 1 << 22  # tokens gathered, then written through one short-lived map of the file


def replay_tokens_for(budget: int, share: float) -> int:
    """Replay tokens that make up ``share`` of all CT tokens next to ``budget`` target tokens."""
    return round(budget * share / (1 - share))


class BudgetError(ValueError):
    """The corpus holds fewer tokens than the budget asks for."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds ids 0 .. ``vocab_size`` - 1."""
    if vocab_size < 1:
        raise ValueError(f"vocabulary size must be >= 1, got {vocab_size}")
    for dtype in (np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"vocabulary size {vocab_size:,} does not fit 32-bit token ids")


def vocab_size_of(tokenizer: Any) -> int:
    """One more than the largest id the tokenizer can produce (added tokens included)."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)


def _batches(texts: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if len(batch) >= ENCODE_BATCH or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _read_ahead(batches: Iterator[list[str]], depth: int = 2) -> Iterator[list[str]]:
    """``batches``, read by a thread ``depth`` batches ahead: reading and parsing the next one
    (Python, under the GIL) overlaps the Rust encoding of this one (which releases the GIL).
    An error in reading is raised here; closing this iterator early stops the thread."""
    queue: Queue[Any] = Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def fill() -> None:
        try:
            for batch in batches:
                if not put(batch):
                    return
            put(end)
        except BaseException as error:  # handed to the consumer, which raises it
            put(error)

    thread = threading.Thread(target=fill, name="prepare-reader", daemon=True)
    thread.start()
    try:
        while (item := queue.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _encoder(tokenizer: Any) -> Callable[[list[str]], list[list[int]]]:
    """The tokenizer's fastest batch encoding to ids, with what ``tokenizer(batch,
    add_special_tokens=False)`` would give: a fast tokenizer's Rust backend is called directly
    (no offsets, no BatchEncoding), set up as transformers sets it (no truncation, no padding,
    special tokens in the text matched as specials unless the tokenizer splits them)."""
    if not getattr(tokenizer, "is_fast", False):
        return lambda batch: tokenizer(batch, add_special_tokens=False)["input_ids"]
    backend = tokenizer.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return lambda batch: [e.ids for e in encode(batch, add_special_tokens=False)]


def token_chunks(
    texts: Iterable[str], tokenizer: Any, dtype: np.dtype | type = np.int64
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, ends) per batch: each document's ids followed by EOS, in order, and where in
    ``ids`` each document ends (exclusive)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos token to separate documents")
    encode = _encoder(tokenizer)
    for batch in _read_ahead(_batches(texts)):
        flat: list[int] = []
        ends: list[int] = []
        for ids in encode(batch):
            flat.extend(ids)
            flat.append(eos)
            ends.append(len(flat))
        try:
            chunk = np.array(flat, dtype=dtype)
        except OverflowError as error:  # an id past the vocabulary the dtype was chosen for
            raise ValueError(f"tokenizer produced an id that does not fit: {error}") from None
        yield chunk, np.asarray(ends)


def _too_little(corpus: str, total: int, budget: int) -> BudgetError:
    return BudgetError(
        f"corpus {corpus} holds only {total:,} training tokens with this tokenizer, "
        f"but the budget asks for {budget:,}: lower the budget or add text"
    )


def cut_to_budget(documents: list[str], tokenizer: Any, budget: int, corpus: str) -> np.ndarray:
    """Tokenize documents in order, EOS after each, and return exactly ``budget`` tokens
    (in memory: for small budgets; ``prepare`` streams the same tokens to disk)."""
    pieces: list[np.ndarray] = []
    total = 0
    for ids, _ in token_chunks(documents, tokenizer):
        pieces.append(ids)
        total += ids.size
        if total >= budget:
            return np.concatenate(pieces)[:budget]
    raise _too_little(corpus, total, budget)


def write_tokens(
    path: Path, chunks: Iterable[tuple[np.ndarray, np.ndarray]], budget: int, dtype: np.dtype,
    corpus: str,
) -> int:
    """Write the first ``budget`` tokens of ``chunks`` to the .npy ``path``; return how many
    documents they come from (the last one possibly cut).

    The file is created at full size by ``open_memmap`` and filled through maps of one window
    of tokens at a time, each unmapped once written: a map of the whole file would keep every
    written page resident in this process (its RSS) until the end.
    """
    created = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(budget,))
    offset = created.offset
    del created
    filled = documents = 0
    pending: list[np.ndarray] = []
    held = 0

    def flush() -> None:
        nonlocal filled, held
        data = np.concatenate(pending) if len(pending) > 1 else pending[0]
        window = np.memmap(path, dtype=dtype, mode="r+", shape=(data.size,),
                           offset=offset + filled * dtype.itemsize)
        window[:] = data
        del window  # unmapped; the dirty pages are the page cache's to write back
        filled += data.size
        pending.clear()
        held = 0

    for ids, ends in chunks:
        room = budget - filled - held
        if ids.size >= room:
            pending.append(ids[:room])
            # The budget ends inside document i, the first to end at or after ``room``.
            documents += int(np.searchsorted(ends, room)) + 1
            flush()
            return documents
        pending.append(ids)
        held += ids.size
        documents += ends.size
        if held >= WRITE_WINDOW:
            flush()
    raise _too_little(corpus, filled + held, budget)


# transformers' tokenizer classes that use a tokenizer.json as it is (model-specific classes may
# adjust its normalizer or pre-tokenizer on load).
GENERIC_TOKENIZER_CLASSES = frozenset({"PreTrainedTokenizerFast", "TokenizersBackend"})


class RustTokenizer:
    """A generic fast tokenizer's ``tokenizer.json``, used the way transformers uses it, but
    without importing transformers (and torch with it): 2-3 s of start-up that a ``prepare``
    job, mostly encoding, need not pay. Offers what ``token_chunks`` and ``vocab_size_of``
    use of a transformers tokenizer."""

    is_fast = True
    split_special_tokens = False

    def __init__(self, backend: Any, eos_token_id: int) -> None:
        self.backend_tokenizer = backend
        self.eos_token_id = eos_token_id

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)


def _rust_tokenizer(tokenizer_dir: Path) -> RustTokenizer | None:
    """The tokenizer of ``tokenizer_dir`` without transformers, where that is the same tokenizer:
    a generic class, its tokenizer.json, its added tokens already in that file, and an EOS
    token; else None."""
    try:
        config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if (not isinstance(config, dict) or config.get("tokenizer_class") not in
            GENERIC_TOKENIZER_CLASSES or config.get("split_special_tokens")
            or not (tokenizer_dir / "tokenizer.json").is_file()):
        return None
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    for token_id, spec in (config.get("added_tokens_decoder") or {}).items():
        content = spec.get("content") if isinstance(spec, dict) else None
        if not str(token_id).isdigit() or backend.id_to_token(int(token_id)) != content:
            return None  # transformers would add it to the backend
    eos = config.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    eos_id = backend.token_to_id(eos) if isinstance(eos, str) else None
    return RustTokenizer(backend, eos_id) if eos_id is not None else None


def load_tokenizer(tokenizer_dir: Path) -> Any:
    """The tokenizer ``prepare`` encodes with: a generic fast tokenizer straight from its
    tokenizer.json (:class:`RustTokenizer`), any other through transformers' AutoTokenizer."""
    fast = _rust_tokenizer(Path(tokenizer_dir))
    if fast is not None:
        return fast
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    tokenizer.model_max_length = sys.maxsize  # whole documents are tokenized, then packed
    return tokenizer


def prepare(recipe: dict[str, Any], corpus: Path, tokenizer_dir: Path, out: Path) -> None:
    params = recipe["params"]
    budget = int(params["tokens"])
    if budget < 1:
        raise ValueError(f"prepare params: tokens must be >= 1, got {budget}")
    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer has no eos token; cannot separate documents of {corpus}")
    dtype = token_dtype(vocab_size_of(tokenizer))
    texts = (r["text"] for r in iter_corpus(corpus, params["heldout_fraction"])
             if r["split"] == "train")
    with atomic_dir(out) as tmp:
        documents = write_tokens(
            tmp / "tokens.npy", token_chunks(texts, tokenizer, dtype), budget, dtype, str(corpus)
        )
        write_json(
            tmp / "stats.json",
            {"tokens": budget, "dtype": dtype.name, "documents_used": documents},
        )
        write_recipe(tmp, recipe)
    log.info("wrote %s %s tokens of %s to %s", f"{budget:,}", dtype.name, corpus, out)


def _stable_sample(records: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    """A deterministic subsample that does not depend on file order."""
    if limit is None or len(records) <= limit:
        return records
    keyed = sorted(records, key=lambda r: hashlib.sha256(r["text"].encode()).hexdigest())
    return keyed[:limit]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


DEV_FRACTION = 0.5  # share of held-out documents that form the dev split


def _eval_rows(records: list[dict[str, Any]], params: dict[str, Any]
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    labelled = [r for r in records if r.get("topic") in TOPICS]
    topic_rows = [
        topic_record(r["text"], r["topic"])
        for r in _stable_sample(labelled, params["max_topic_docs"])
    ]
    heldout_rows = [{"text": r["text"]} for r in _stable_sample(records,
                                                                params["max_heldout_docs"])]
    return topic_rows, heldout_rows


def evalset(recipe: dict[str, Any], corpus: Path, out: Path) -> None:
    """Held-out documents split into test (``topic.jsonl``, ``heldout.jsonl``) and dev
    (``dev/topic.jsonl``, ``dev/heldout.jsonl``: for choosing a grid's hyperparameters), each
    capped as the params say. Documents a corpus marks "dev" are dev; those it marks "test" (or
    hashed_split holds out) go to dev or test by dev_or_test, DEV_FRACTION of them to dev."""
    params = recipe["params"]
    records = read_corpus(corpus, params["heldout_fraction"])
    held = [r for r in records if r["split"] in ("dev", "test")]
    if not held:
        raise ValueError(f"corpus {corpus} has no held-out ('test') documents to evaluate on")
    parts = {"dev": [], "test": []}
    for record in held:
        part = "dev" if record["split"] == "dev" else dev_or_test(record["text"], DEV_FRACTION)
        parts[part].append(record)
    if not parts["test"]:
        raise ValueError(f"corpus {corpus}: every held-out document is in the dev split")
    topic_rows, heldout_rows = _eval_rows(parts["test"], params)
    dev_topic, dev_heldout = _eval_rows(parts["dev"], params)
    with atomic_dir(out) as tmp:
        if topic_rows:
            _write_jsonl(tmp / "topic.jsonl", topic_rows)
        _write_jsonl(tmp / "heldout.jsonl", heldout_rows)
        if dev_heldout:
            (tmp / "dev").mkdir()
            if dev_topic:
                _write_jsonl(tmp / "dev" / "topic.jsonl", dev_topic)
            _write_jsonl(tmp / "dev" / "heldout.jsonl", dev_heldout)
        write_json(tmp / "stats.json", {"topic": len(topic_rows), "heldout": len(heldout_rows),
                                        "dev_topic": len(dev_topic),
                                        "dev_heldout": len(dev_heldout)})
        write_recipe(tmp, recipe)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workflow.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="cut a corpus to an exact token budget")
    prep.add_argument("--tokenizer", type=Path, required=True)
    evals = sub.add_parser("evalset", help="write the held-out evaluation files")
    for command in (prep, evals):
        command.add_argument("--recipe", type=parse_recipe_arg, required=True)
        command.add_argument("--corpus", type=Path, required=True)
        command.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "prepare":
            prepare(args.recipe, args.corpus, args.tokenizer, args.out)
        else:
            evalset(args.recipe, args.corpus, args.out)
    except (BudgetError, ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
