"""Data stage: exact token budgets, clear errors on too little text, held-out eval sets; the
streamed, memory-mapped tokens.npy and the trainer reading it through the map."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from workflow import data, train
from workflow.artifacts import read_json
from workflow.corpus import CorpusError, iter_corpus, read_corpus, split_records
from workflow.data import BudgetError, cut_to_budget, token_dtype

TEXTS = [f"document number {i} says hello to the world {i % 7}" for i in range(60)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.train_from_iterator(
        TEXTS,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<unk>", "</s>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(path)
    return path


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    rows = [
        {"text": t, "split": "test" if i % 10 == 0 else "train", "topic": "scalc"}
        for i, t in enumerate(TEXTS)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_stage(*args):
    return subprocess.run(
        [sys.executable, "-m", "workflow.data", *args], capture_output=True, text=True, check=False
    )


def recipe(**params):
    return json.dumps(
        {"stage": "prepare", "version": "1", "params": {"heldout_fraction": 0.05, **params}}
    )


def run_prepare(tokens, corpus, tokenizer_dir, out):
    return run_stage("prepare", "--recipe", recipe(tokens=tokens), "--corpus", str(corpus),
                     "--tokenizer", str(tokenizer_dir), "--out", str(out))


def test_prepare_cuts_exactly_to_the_budget(tmp_path, corpus, tokenizer_dir):
    out = tmp_path / "prepared"
    result = run_prepare(157, corpus, tokenizer_dir, out)
    assert result.returncode == 0, result.stderr
    tokens = np.load(out / "tokens.npy", allow_pickle=False)
    assert tokens.shape == (157,) and tokens.dtype == np.uint16  # a 300-token vocabulary
    eos = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir).eos_token_id
    assert (tokens == eos).sum() >= 3  # documents are separated by EOS
    assert read_json(out / "recipe.json")["recipe"]["params"]["tokens"] == 157


def test_too_little_text_is_a_clear_error_and_writes_nothing(tmp_path, corpus, tokenizer_dir):
    out = tmp_path / "prepared"
    result = run_prepare(10**7, corpus, tokenizer_dir, out)
    assert result.returncode != 0
    assert "holds only" in result.stderr and "10,000,000" in result.stderr
    assert str(corpus) in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".prepared.tmp-*"))


def test_cut_to_budget_needs_an_eos_token(tokenizer_dir):
    tok = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    assert cut_to_budget(TEXTS, tok, 10, "c").size == 10
    with pytest.raises(BudgetError):
        cut_to_budget(TEXTS[:2], tok, 10**6, "c")


def test_evalset_writes_held_out_topic_and_text_files(tmp_path, corpus):
    out = tmp_path / "evalset"
    evalset_recipe = json.dumps(
        {
            "stage": "evalset",
            "version": "1",
            "params": {"heldout_fraction": 0.05, "max_topic_docs": 4, "max_heldout_docs": None},
        }
    )
    result = run_stage(
        "evalset", "--recipe", evalset_recipe, "--corpus", str(corpus), "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    # every 10th of 60 documents is held out, and split between test and dev/ (evalset@2)
    topic, heldout = [], []
    for part in (out, out / "dev"):
        topic += [json.loads(line) for line in (part / "topic.jsonl").read_text().splitlines()]
        heldout += (part / "heldout.jsonl").read_text().splitlines()
    assert len(topic) <= 8 and len(heldout) == 6
    assert all(row["label"] == 0 and row["topic"] == "scalc" for row in topic)
    held_texts = {json.loads(line)["text"] for line in heldout}
    assert held_texts == {TEXTS[i] for i in range(0, 60, 10)}


# --------------------------------------------------------------------------- streamed tokens


def old_cut_to_budget(documents, tokenizer, budget):
    """The in-memory path before streaming (prepare@1), kept verbatim as the reference."""
    eos = tokenizer.eos_token_id
    pieces, total = [], 0
    for start in range(0, len(documents), 512):
        encoded = tokenizer(documents[start : start + 512], add_special_tokens=False)["input_ids"]
        for ids in encoded:
            pieces.append(np.asarray([*ids, eos], dtype=np.int32))
            total += len(ids) + 1
        if total >= budget:
            break
    assert total >= budget
    return np.concatenate(pieces)[:budget]


def prepare_here(corpus, tokenizer_dir, out, tokens):
    data.prepare({"stage": "prepare", "version": "2",
                  "params": {"heldout_fraction": 0.2, "tokens": tokens}},
                 corpus, tokenizer_dir, out)
    return np.load(out / "tokens.npy", allow_pickle=False), read_json(out / "stats.json")


def test_token_dtype_is_the_smallest_unsigned_type_for_the_vocabulary():
    assert token_dtype(300) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535
    assert token_dtype(65537) == np.uint32
    assert token_dtype(2**32) == np.uint32
    for bad in (0, 2**32 + 1):
        with pytest.raises(ValueError, match="vocabulary size"):
            token_dtype(bad)


def test_prepare_streams_the_same_tokens_as_the_in_memory_path(
        tmp_path, tokenizer_dir, monkeypatch):
    # Plain text without splits: the hashed split decides, as before. Small batches and write
    # windows, so documents straddle both and the budget ends inside a window and a document.
    texts = [f"{t} and more words {i}" * (1 + i % 4) for i, t in enumerate(TEXTS * 3)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(texts) + "\n")
    monkeypatch.setattr(data, "ENCODE_BATCH", 7)
    monkeypatch.setattr(data, "BATCH_CHARS", 300)
    monkeypatch.setattr(data, "WRITE_WINDOW", 50)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    train_docs = [r["text"] for r in split_records(read_corpus(corpus, 0.2), "train")]
    assert 0 < len(train_docs) < len(texts)
    lengths = [len(tok(d, add_special_tokens=False)["input_ids"]) + 1 for d in train_docs]
    for budget in (1, 49, 50, 51, 733, sum(lengths)):
        tokens, stats = prepare_here(corpus, tokenizer_dir, tmp_path / f"b{budget}", budget)
        whole = old_cut_to_budget(train_docs, tok, budget)
        assert tokens.dtype == np.uint16 and tokens.shape == (budget,)
        np.testing.assert_array_equal(tokens, whole)
        assert stats["documents_used"] == int(np.searchsorted(np.cumsum(lengths), budget)) + 1
    with pytest.raises(BudgetError, match=f"holds only {sum(lengths):,}"):
        prepare_here(corpus, tokenizer_dir, tmp_path / "over", sum(lengths) + 1)
    assert not (tmp_path / "over").exists()


def test_a_bad_line_read_ahead_is_the_reader_s_error(tmp_path, corpus, tokenizer_dir,
                                                    monkeypatch):
    # The corpus is read by a thread, batches ahead: its error must still reach the caller.
    monkeypatch.setattr(data, "ENCODE_BATCH", 4)
    with open(corpus, "a") as handle:
        handle.write("{not json\n")
    with pytest.raises(CorpusError, match=r"corpus.jsonl:61: not valid JSON"):
        prepare_here(corpus, tokenizer_dir, tmp_path / "out", 10**6)
    assert not (tmp_path / "out").exists()
    # Met before the bad line: the reader is stopped, not waited out to the end.
    tokens, _ = prepare_here(corpus, tokenizer_dir, tmp_path / "ok", 20)
    assert tokens.size == 20


def test_prepare_writes_uint32_past_65536_ids(tmp_path):
    # A word-level tokenizer whose words sit at ids past uint16: built in a second, no training.
    words = [f"w{i}" for i in range(70_000)]
    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok_dir = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>",
                            unk_token="<unk>").save_pretrained(tok_dir)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": "w0 w65535 w69999", "split": "train"}) + "\n")
    tokens, stats = prepare_here(corpus, tok_dir, tmp_path / "out", 4)
    assert tokens.dtype == np.uint32 and stats["dtype"] == "uint32"
    assert tokens.tolist() == [2, 65537, 70001, 1]


def test_iter_corpus_streams_in_file_order_and_checks_eagerly(tmp_path, corpus):
    assert list(iter_corpus(corpus)) == read_corpus(corpus)
    assert [r["text"] for r in iter_corpus(corpus)] == TEXTS
    with pytest.raises(CorpusError, match="not found"):
        iter_corpus(tmp_path / "missing.jsonl")  # at the call, before any iteration
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n   \n")
    records = iter_corpus(blank)
    with pytest.raises(CorpusError, match="no non-empty documents"):
        next(records)


def old_blocks(tokens, seq_len, sep_id):
    """PackedBlocks before the memory map: the whole stream as int64 in memory."""
    stream = np.concatenate([[sep_id], tokens]).astype(np.int64)
    stride = seq_len - 1
    for start in range(0, tokens.size, stride):
        ids = stream[start : start + seq_len].tolist()
        yield {"input_ids": ids, "labels": [-100, *ids[1:]]}


def test_trainer_reads_a_uint16_memmap_into_the_same_blocks(tmp_path, corpus, tokenizer_dir):
    tokens, _ = prepare_here(corpus, tokenizer_dir, tmp_path / "prep", 501)
    mapped = train.load_tokens(tmp_path / "prep")
    assert isinstance(mapped, np.memmap) and mapped.dtype == np.uint16
    eos = AutoTokenizer.from_pretrained(tokenizer_dir).eos_token_id
    for seq_len in (2, 16, 501, 600):
        blocks = train.PackedBlocks(mapped, seq_len, eos)
        expected = list(old_blocks(tokens.astype(np.int32), seq_len, eos))
        assert [blocks[i] for i in range(len(blocks))] == expected
        assert all(type(t) is int for t in blocks[len(blocks) - 1]["input_ids"])
    train.check_vocab(mapped, 300, "prep", chunk=64)
    bad = tmp_path / "bad"
    bad.mkdir()
    np.save(bad / "tokens.npy", np.asarray([5] * 100 + [7, 300], dtype=np.uint16))
    with pytest.raises(ValueError, match=r"span \[5, 300\], outside .* of 300"):
        train.check_vocab(train.load_tokens(bad), 300, "bad", chunk=64)  # 300 is in chunk 2


def test_interleaved_order_matches_the_sorted_keys():
    def sorted_order(targets, replays):  # the definition: merge by key (k + 1) / n
        keyed = [((k + 1) / targets, 0, k) for k in range(targets)]
        keyed += [((k + 1) / replays, 1, k) for k in range(replays)]
        return [(source, k) for _, source, k in sorted(keyed)]

    for targets in range(0, 23):
        for replays in range(0, 23):
            mixed = train.Interleaved([{"k": k} for k in range(targets)],
                                      [{"k": k} for k in range(replays)])
            got = [(item.get("source", 0), item["k"]) for item in map(mixed.__getitem__,
                                                                      range(len(mixed)))]
            assert got == sorted_order(targets, replays), (targets, replays)
            with pytest.raises(IndexError):
                mixed[len(mixed)]


def test_prepare_reads_a_generic_tokenizer_without_transformers_and_the_same_ids(
        tmp_path, corpus, tokenizer_dir):
    """A generic fast tokenizer is used straight from its tokenizer.json (no transformers, no
    torch at start-up) and gives the ids transformers gives; a model-specific class goes
    through transformers."""
    fast = data.load_tokenizer(tokenizer_dir)
    assert isinstance(fast, data.RustTokenizer)
    slow = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert fast.eos_token_id == slow.eos_token_id and len(fast) == len(slow)
    assert data.vocab_size_of(fast) == data.vocab_size_of(slow)
    docs = [r["text"] for r in read_corpus(corpus)] + ["</s> special <pad> in text"]
    ids_fast = np.concatenate([ids for ids, _ in data.token_chunks(docs, fast)])
    ids_slow = np.concatenate([ids for ids, _ in data.token_chunks(docs, slow)])
    np.testing.assert_array_equal(ids_fast, ids_slow)
    assert ids_fast.tolist()[:-1] == [
        i for d in docs for i in [*slow(d, add_special_tokens=False)["input_ids"],
                                  slow.eos_token_id]][:-1]
    # the stage itself imports neither
    out = tmp_path / "out"
    probe = ("import json, sys; from pathlib import Path; from workflow import data; "
             f"data.prepare(json.loads({recipe(tokens=50)!r}), Path({str(corpus)!r}), "
             f"Path({str(tokenizer_dir)!r}), Path({str(out)!r})); "
             "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            cwd=Path(data.__file__).parent.parent, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert np.load(out / "tokens.npy").size == 50

    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    specific = tmp_path / "specific"
    specific.mkdir()
    (specific / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    (specific / "tokenizer_config.json").write_text(
        json.dumps({**config, "tokenizer_class": "LlamaTokenizerFast"}))
    assert not isinstance(data.load_tokenizer(specific), data.RustTokenizer)
