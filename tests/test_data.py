"""Data stage: exact token budgets, clear errors on too little text, held-out eval sets."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from workflow.artifacts import read_json
from workflow.data import BudgetError, cut_to_budget

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
    assert tokens.shape == (157,) and tokens.dtype == np.int32
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
    topic = [json.loads(line) for line in (out / "topic.jsonl").read_text().splitlines()]
    heldout = (out / "heldout.jsonl").read_text().splitlines()
    assert len(topic) == 4 and len(heldout) == 6  # every 10th of 60 documents is held out
    assert all(row["label"] == 0 and row["topic"] == "scalc" for row in topic)
    held_texts = {json.loads(line)["text"] for line in heldout}
    assert held_texts == {TEXTS[i] for i in range(0, 60, 10)}
