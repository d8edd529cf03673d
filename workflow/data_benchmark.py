"""Benchmark: ``prepare``'s peak memory and tokens/s on a synthetic corpus, against the
tokenizer's own batch encoding of the same text, measured in the same run.

    python -m workflow.data_benchmark [--sizes 20000000 200000000] [--workdir DIR] [--keep]

The tokenizer is the demo's: a 4,000-token byte-level BPE trained on the English demo corpus
(``config.yaml``'s ``model.scratch.tokenizer``, built by :func:`workflow.models.train_tokenizer`).
For each size N (tokens), it

- writes ``corpus-N.jsonl``: the paragraphs of all five shipped demo corpora
  (data/libreoffice-help), each pass over them in a new seeded shuffle, joined
  ``--paragraphs`` at a time (default 16, about 900 tokens: a web document's length; a demo
  paragraph alone is about 55 tokens, which makes reading the file, not tokenizing, the cost)
  into ``{"text": ...}`` lines without a split (so ``prepare`` hashes each document for its
  split, as for a user's corpus), until the training split holds N tokens and a little more;
- runs ``python -m workflow.data prepare`` on it with a budget of N tokens, in a subprocess,
  and reads that child's peak RSS (``ru_maxrss`` from ``os.wait4``: resident pages of every
  kind, the strictest figure) and its wall and CPU time, start-up included;
- times the tokenizer's own batch encoding (the Rust backend's ``encode_batch_fast``, ids
  taken out as Python lists, batches of ``workflow.data.ENCODE_BATCH`` documents) on the same
  training documents in this process, up to the same N tokens counting one EOS per document.
  Only the encoding calls are timed; reading the text is not.

It prints, per size, prepare's peak RSS (target: at most 1.5 GB, and flat across sizes) and the
ratio of prepare's tokens/s to the peer's (target: at least 0.8), by wall clock and by CPU time
(user + sys of every thread; on a machine shared with other jobs the CPU ratio is the steadier).
A fresh process's start-up (importing transformers and torch, loading the tokenizer, hashing
the output for its manifest) is a fixed cost that weighs on small budgets; it is measured as a
prepare with a 1-token budget (which also reads and encodes one batch) and the wall ratio is
printed again without it.
Both use every core: ``TOKENIZERS_PARALLELISM`` is set to true for this process and the child.
The work directory is deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parents[1]
DEMO = PROJECT_DIR / "data" / "libreoffice-help"
LANGS = ("en", "es", "eu", "ca", "gl")
HELDOUT_FRACTION = 0.05
SLACK = 1.01  # the synthetic corpus holds this much more than the budget


def build_tokenizer(out: Path) -> Any:
    from workflow.models import tokenizer_texts, train_tokenizer

    texts = tokenizer_texts({"en": DEMO / "en.jsonl.gz"}, {"en": 1.0}, 5_000_000)
    tokenizer = train_tokenizer(texts, 4000)
    tokenizer.save_pretrained(out)
    return tokenizer


def source_documents() -> list[str]:
    from workflow.corpus import read_corpus

    return [r["text"] for lang in LANGS for r in read_corpus(DEMO / f"{lang}.jsonl.gz")]


def write_corpus(
    path: Path, paragraphs: list[str], tokens: list[int], size: int, per_doc: int
) -> int:
    """Documents of ``per_doc`` paragraphs, from passes over ``paragraphs`` (each a new
    shuffle), until the training split holds about ``size`` tokens (times SLACK; a document's
    tokens are estimated as its paragraphs' plus one per join); returns the documents written."""
    from workflow.corpus import hashed_split

    total = written = 0
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as handle:
        while total < size * SLACK:
            order = list(range(len(paragraphs)))
            rng.shuffle(order)
            for start in range(0, len(order), per_doc):
                group = order[start : start + per_doc]
                text = "\n\n".join(paragraphs[i] for i in group)
                handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                written += 1
                if hashed_split(text, HELDOUT_FRACTION) == "train":
                    total += sum(tokens[i] for i in group)
                if total >= size * SLACK:
                    break
    return written


def training_batches(path: Path, batch: int) -> Iterator[list[str]]:
    from workflow.corpus import iter_corpus

    texts: list[str] = []
    for record in iter_corpus(path, HELDOUT_FRACTION):
        if record["split"] == "train":
            texts.append(record["text"])
            if len(texts) == batch:
                yield texts
                texts = []
    if texts:
        yield texts


def peer(tokenizer: Any, path: Path, size: int, batch: int) -> tuple[float, float]:
    """Seconds of wall and CPU time the tokenizer's batch encoding takes for ``size`` tokens
    of the corpus's training documents (one EOS counted per document, as prepare writes)."""
    backend = tokenizer.backend_tokenizer
    done = 0
    wall = cpu = 0.0
    for texts in training_batches(path, batch):
        w0, c0 = time.perf_counter(), time.process_time()
        ids = [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        wall += time.perf_counter() - w0
        cpu += time.process_time() - c0
        done += sum(map(len, ids)) + len(ids)
        if done >= size:
            return wall, cpu
    raise RuntimeError(f"{path} holds only {done:,} training tokens, fewer than {size:,}")


def run_prepare(corpus: Path, tokenizer_dir: Path, out: Path, size: int, log: Path,
                env: dict[str, str]) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak RSS (GB) of one prepare subprocess."""
    recipe = {"stage": "prepare", "version": "2",
              "params": {"tokens": size, "heldout_fraction": HELDOUT_FRACTION}}
    cmd = [sys.executable, "-m", "workflow.data", "prepare", "--recipe", json.dumps(recipe),
           "--corpus", str(corpus), "--tokenizer", str(tokenizer_dir), "--out", str(out)]
    start = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                cwd=PROJECT_DIR)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"prepare failed (rc {proc.returncode}); see {log}")
    # ru_maxrss is in kB on Linux.
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workflow.data_benchmark",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000_000, 200_000_000],
                        help="budgets in tokens (default: %(default)s)")
    parser.add_argument("--paragraphs", type=int, default=16,
                        help="demo paragraphs per synthetic document (default: %(default)s)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lrmerge-data-bench"))
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_DIR)}
    root = args.workdir
    root.mkdir(parents=True, exist_ok=True)
    from workflow.data import ENCODE_BATCH

    try:
        t0 = time.perf_counter()
        tokenizer = build_tokenizer(root / "tokenizer")
        docs = source_documents()
        backend = tokenizer.backend_tokenizer
        train_tokens = [len(e.ids) + 1 for e in backend.encode_batch_fast(
            docs, add_special_tokens=False)]
        print(f"tokenizer ({len(tokenizer)} tokens) and {len(docs):,} source documents "
              f"({sum(train_tokens):,} tokens with EOS) in {time.perf_counter() - t0:.0f} s; "
              f"{os.cpu_count()} CPUs", flush=True)
        for size in args.sizes:
            corpus = root / f"corpus-{size}.jsonl"
            t0 = time.perf_counter()
            written = write_corpus(corpus, docs, train_tokens, size, args.paragraphs)
            print(f"[{size:,}] corpus: {written:,} documents of {args.paragraphs} paragraphs, "
                  f"{corpus.stat().st_size / 1e9:.2f} GB, in {time.perf_counter() - t0:.0f} s",
                  flush=True)
            out = root / f"prepared-{size}"
            startup = run_prepare(corpus, root / "tokenizer", out, 1, root / "startup.log", env)
            shutil.rmtree(out)
            wall, cpu, peak = run_prepare(corpus, root / "tokenizer", out, size,
                                          root / f"prepare-{size}.log", env)
            shutil.rmtree(out)
            peer_wall, peer_cpu = peer(tokenizer, corpus, size, ENCODE_BATCH)
            corpus.unlink()
            print(f"[{size:,}] prepare: {wall:7.1f} s wall ({size / wall / 1e6:.3f} M tokens/s), "
                  f"{cpu:7.1f} s CPU, peak RSS {peak:.2f} GB | tokenizer batch encoding: "
                  f"{peer_wall:7.1f} s wall ({size / peer_wall / 1e6:.3f} M tokens/s), "
                  f"{peer_cpu:7.1f} s CPU | prepare / tokenizer tokens/s: "
                  f"wall {peer_wall / wall:.2f}, CPU {peer_cpu / cpu:.2f}; start-up "
                  f"{startup[0]:.1f} s wall, {startup[2]:.2f} GB, wall ratio without it "
                  f"{peer_wall / (wall - startup[0]):.2f}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"(this process, holding the source documents: peak RSS {own:.2f} GB)")


if __name__ == "__main__":
    main()
