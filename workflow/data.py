"""Data stage: cut a corpus to an exact token budget, and build held-out evaluation sets.

    python -m workflow.data prepare --recipe JSON --corpus PATH --tokenizer DIR --out DIR
    python -m workflow.data evalset --recipe JSON --corpus PATH --out DIR

``prepare`` writes ``tokens.npy``: the corpus's training documents, each followed by the EOS
id, concatenated in file order and cut to exactly ``params.tokens`` tokens. Too little text is
an error that says how many tokens the corpus holds. ``evalset`` writes the held-out split as
``topic.jsonl`` (paragraphs with an English topic label, when the corpus has topics) and
``heldout.jsonl`` (text for bits-per-byte).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from workflow.artifacts import atomic_dir, parse_recipe_arg, write_json, write_recipe
from workflow.corpus import read_corpus, split_records
from workflow.prompts import TOPICS

log = logging.getLogger("workflow.data")
# Bump when a change here changes what a stage writes (see workflow/stages.py).
STAGE_VERSIONS = {"prepare": "1", "evalset": "1"}
ENCODE_BATCH = 512


def replay_tokens_for(budget: int, share: float) -> int:
    """Replay tokens that make up ``share`` of all CT tokens next to ``budget`` target tokens."""
    return round(budget * share / (1 - share))


class BudgetError(ValueError):
    """The corpus holds fewer tokens than the budget asks for."""


def cut_to_budget(documents: list[str], tokenizer: Any, budget: int, corpus: str) -> np.ndarray:
    """Tokenize documents in order, EOS after each, and return exactly ``budget`` tokens."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer has no eos token; cannot separate documents of {corpus}")
    pieces: list[np.ndarray] = []
    total = 0
    for start in range(0, len(documents), ENCODE_BATCH):
        batch = documents[start : start + ENCODE_BATCH]
        encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
        for ids in encoded:
            pieces.append(np.asarray([*ids, eos], dtype=np.int32))
            total += len(ids) + 1
        if total >= budget:
            break
    if total < budget:
        raise BudgetError(
            f"corpus {corpus} holds only {total:,} training tokens with this tokenizer, "
            f"but the budget asks for {budget:,}: lower the budget or add text"
        )
    return np.concatenate(pieces)[:budget]


def prepare(recipe: dict[str, Any], corpus: Path, tokenizer_dir: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    params = recipe["params"]
    budget = int(params["tokens"])
    records = split_records(read_corpus(corpus, params["heldout_fraction"]), "train")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    tokenizer.model_max_length = sys.maxsize  # whole documents are tokenized, then packed
    tokens = cut_to_budget([r["text"] for r in records], tokenizer, budget, str(corpus))
    with atomic_dir(out) as tmp:
        np.save(tmp / "tokens.npy", tokens, allow_pickle=False)
        write_json(
            tmp / "stats.json",
            {"tokens": int(tokens.size), "documents_available": len(records)},
        )
        write_recipe(tmp, recipe)
    log.info("wrote %s tokens of %s to %s", f"{tokens.size:,}", corpus, out)


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


def evalset(recipe: dict[str, Any], corpus: Path, out: Path) -> None:
    params = recipe["params"]
    test = split_records(read_corpus(corpus, params["heldout_fraction"]), "test")
    if not test:
        raise ValueError(f"corpus {corpus} has no held-out ('test') documents to evaluate on")
    labelled = [r for r in test if r.get("topic") in TOPICS]
    topic_rows = [
        {"text": r["text"], "label": TOPICS.index(r["topic"]), "topic": r["topic"]}
        for r in _stable_sample(labelled, params["max_topic_docs"])
    ]
    heldout_rows = [{"text": r["text"]} for r in _stable_sample(test, params["max_heldout_docs"])]
    with atomic_dir(out) as tmp:
        if topic_rows:
            _write_jsonl(tmp / "topic.jsonl", topic_rows)
        _write_jsonl(tmp / "heldout.jsonl", heldout_rows)
        write_json(tmp / "stats.json", {"topic": len(topic_rows), "heldout": len(heldout_rows)})
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
