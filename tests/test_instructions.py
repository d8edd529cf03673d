"""Instruction data for SFT: formats, clear errors, the loss on responses only (plain and with a
chat template), truncation, and the config and plan of local and hub datasets."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_resume import tiny_model
from transformers import AutoTokenizer
from workflow_utils import PROJECT, tiny_config, with_changes

from workflow import models, train
from workflow.artifacts import read_json, sha256_file
from workflow.config import ConfigError, validate_config
from workflow.instructions import (
    IGNORE,
    Encoder,
    InstructionDataError,
    load_conversations,
    normalise,
    truncate,
    use_chat_template,
)
from workflow.plan import Plan
from workflow.prompts import topic_example

# A ChatML-like template, with one-letter role tags so that conversations fit the tiny
# model's 64 positions: each turn is "<role letter>\n<content></s>\n".
TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0] }}\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}a\n{% endif %}"
)
PARAMS = {"format": "auto", "prompt_field": "prompt", "response_field": "response",
          "messages_field": "messages", "separator": ""}
CHATS = [
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sum of a cell"},
     {"role": "assistant", "content": "formula row"}, {"role": "user", "content": "and a page"},
     {"role": "assistant", "content": "style column"}],
    [{"role": "user", "content": "which sheet"}, {"role": "assistant", "content": "cell 7"}],
]


def spec(path: Path, **changes) -> dict:
    return {"path": str(path), "hub": None, **PARAMS, **changes}


def write_jsonl(path: Path, records: list) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as handle:
        for record in records:
            handle.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"cell {i} sheet formula {i * 7} row column page style" for i in range(200)]
    return models.train_tokenizer(texts, vocab_size=300)


def label_runs(example: dict) -> list[list[int]]:
    """The contiguous runs of tokens that carry loss."""
    runs, run = [], []
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        if label != IGNORE:
            assert label == token
            run.append(token)
        elif run:
            runs, run = [*runs, run], []
    return [*runs, run] if run else runs


# --------------------------------------------------------------------------- reading


def test_formats_normalise_to_messages(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl.gz", [
        {"prompt": "2+2?", "response": " 4", "extra": 1},
        {"messages": CHATS[1]},
        "",  # blank lines are skipped
    ])
    conversations, available = load_conversations(spec(path), path, 10, "first", 0)
    assert available == 2
    assert conversations == [
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": " 4"}], CHATS[1]]
    # Alpaca: instruction and (possibly empty) input make the prompt.
    alpaca = {"instruction": "Add.", "input": "2 and 2", "output": "4"}
    fields = {**PARAMS, "prompt_field": ["instruction", "input"], "response_field": "output"}
    assert normalise(alpaca, fields, "x")[0]["content"] == "Add.\n\n2 and 2"
    assert normalise({**alpaca, "input": ""}, fields, "x")[0]["content"] == "Add."


def test_parquet_and_selection(tmp_path):
    path = tmp_path / "data.parquet"
    rows = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(20)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    fields = spec(path, prompt_field="q", response_field="a")
    first, read = load_conversations(fields, path, 5, "first", 0)
    assert read == 5 and [c[0]["content"] for c in first] == [f"question {i}" for i in range(5)]
    sample, available = load_conversations(fields, path, 5, "sample", 3)
    assert available == 20 and sample == load_conversations(fields, path, 5, "sample", 3)[0]
    assert sample != first and sample != load_conversations(fields, path, 5, "sample", 4)[0]
    picked = [int(c[0]["content"].split()[1]) for c in sample]
    assert picked == sorted(picked)  # source order kept
    pq.write_table(pa.Table.from_pylist([{"q": "fine", "a": "yes"}, {"q": "broken", "a": None}]),
                   path)
    with pytest.raises(InstructionDataError, match=r"data.parquet: row 2: key 'a' must be a str"):
        load_conversations(fields, path, 5, "first", 0)


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "p"', "not valid JSON"),
    ('["p", "r"]', "each record must be a JSON object"),
    ('{"prompt": "p"}', "missing key 'response'"),
    ('{"prompt": "p", "response": 3}', "key 'response' must be a string"),
    ('{"prompt": "  ", "response": "r"}', "key 'prompt' is empty"),
    ('{"messages": []}', "key 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "key 'messages[0].role' must be one of"),
    ('{"messages": [{"role": "user", "content": 1}]}', "key 'messages[0].content' must be a str"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "key 'messages[0].role': the last turn"),
    ('{"messages": [{"role": "assistant", "content": "a"}]}', "starts with a system or user"),
])
def test_malformed_records_name_file_line_and_key(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine", "response": "ok"}, line])
    with pytest.raises(InstructionDataError, match="bad.jsonl:2: .*" + message.replace("[", r"\[")):
        load_conversations(spec(path), path, 10, "first", 0)


# --------------------------------------------------------------------------- tokens


def test_plain_format_trains_the_answer_and_eos_of_each_turn(tokenizer):
    example = Encoder(tokenizer, 256, chat_template=False, separator="\n").encode(CHATS[0])
    runs = [tokenizer.decode(run) for run in label_runs(example)]
    assert runs == ["formula row</s>", "style column</s>"]
    assert tokenizer.decode(example["input_ids"]) == (
        "be brief\nsum of a cell\nformula row</s>\nand a page\nstyle column</s>")
    # The topic task: prompt and answer as lm-eval pairs them, no separator.
    topic = topic_example("cell sheet", "scalc")
    messages = [{"role": "user", "content": topic["prompt"]},
                {"role": "assistant", "content": topic["response"]}]
    example = Encoder(tokenizer, 64, chat_template=False).encode(messages)
    assert [tokenizer.decode(run) for run in label_runs(example)] == [" spreadsheet</s>"]
    context = tokenizer(topic["prompt"])["input_ids"]
    assert example["input_ids"][: len(context)] == context


def test_truncation_keeps_a_response_token_or_drops():
    ignore = IGNORE
    # prompt of 6, answer of 3 (positions 6-8), then a second turn
    ids = list(range(12))
    labels = [ignore] * 6 + [6, 7, 8] + [ignore, 10, 11]
    assert truncate(ids, labels, 12)["input_ids"] == ids
    assert truncate(ids, labels, 10) == {"input_ids": ids[:10], "labels": labels[:10]}
    # the first answer does not fit: the prompt loses its start, the answer stays whole
    assert truncate(ids, labels, 5) == {"input_ids": ids[4:9], "labels": [ignore, ignore, 6, 7, 8]}
    # an answer longer than seq_len after a short prompt: cut on the right
    long = {"ids": list(range(10)), "labels": [ignore, ignore] + list(range(2, 10))}
    assert truncate(long["ids"], long["labels"], 4)["labels"] == [ignore, ignore, 2, 3]
    # neither fits: dropped
    assert truncate(list(range(10)), [ignore] * 5 + list(range(5, 10)), 5) is None
    assert truncate([1, 2], [ignore, ignore], 5) is None


def test_chat_template_option(tokenizer):
    assert use_chat_template(tokenizer, "auto", "m") is False
    assert use_chat_template(tokenizer, False, "m") is False
    with pytest.raises(InstructionDataError, match="'sft.chat_template' is true but the tokenizer"):
        use_chat_template(tokenizer, True, "m")


def test_sft_on_a_chat_dataset_trains_only_the_assistant_turns(tmp_path):
    """The must-show: a messages-format jsonl, a tokenizer with a chat template, a few steps of
    the real SFT stage, and the tokens that carried the loss."""
    model = tiny_model(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(model)
    chats = CHATS * 6
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat} for chat in chats])
    out = tmp_path / "sft"
    sft_recipe = {
        "stage": "sft", "version": "3",
        "params": {"examples": len(chats), "select": "first", "chat_template": True,
                   "group_by_length": True, "data": {"format": "messages"},
                   "train": {"lr": 1e-3, "min_lr": 1e-4, "batch_size": 4, "seq_len": 64,
                             "epochs": 1, "seed": 0}},
        "dataset": {"sha256": sha256_file(data)},
    }
    train.main(["sft", "--recipe", json.dumps(sft_recipe), "--model", str(model),
                "--dataset", str(data), "--out", str(out), "--threads", "1"])

    loaded = AutoTokenizer.from_pretrained(out)
    assert loaded.chat_template == TEMPLATE
    encoder = Encoder(loaded, 64, chat_template=True)
    examples = [encoder.encode(chat) for chat in chats]
    first = examples[0]
    assert tokenizer.decode(first["input_ids"]) == (
        "s\nbe brief</s>\nu\nsum of a cell</s>\na\nformula row</s>\nu\nand a page</s>\n"
        "a\nstyle column</s>\n")
    # Only the assistant turns as the template renders them carry loss: never the system or
    # user text, nor the role tags and generation prompt before an answer.
    assert [tokenizer.decode(run) for run in label_runs(first)] == [
        "formula row</s>\n", "style column</s>\n"]
    assert [tokenizer.decode(run) for run in label_runs(examples[1])] == ["cell 7</s>\n"]
    metrics = read_json(out / "metrics.json")
    assert metrics["chat_template"] is True and metrics["examples"] == len(chats)
    # What reached the optimizer is exactly those tokens.
    assert metrics["tokens_trained"] == train.count_targets(examples) == metrics["tokens_budget"]
    assert metrics["tokens_trained"] == 6 * sum(len(r) for e in examples[:2] for r in label_runs(e))


def test_sft_stage_checks_its_data_before_loading_the_model(tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "q"}]}])
    recipe = {"stage": "sft", "version": "3",
              "params": {"examples": 1, "select": "first", "chat_template": "auto",
                         "group_by_length": True, "data": {},
                         "train": {"seq_len": 64}},
              "dataset": {"sha256": sha256_file(data)}}
    args = ["sft", "--recipe", json.dumps(recipe), "--model", str(tmp_path / "no-model"),
            "--dataset", str(data), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=r"bad.jsonl:1: key 'messages\[0\].role': the last turn"):
        train.main(args)
    with pytest.raises(SystemExit, match="pass it as --dataset PATH"):
        train.main(args[:5] + args[7:])


def test_hub_dataset_is_a_clear_error_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    if "datasets" in sys.modules:  # read at import time: set what this process already read
        monkeypatch.setattr(sys.modules["datasets"].config, "HF_HUB_OFFLINE", True)
    hub = {"path": None, "hub": "tatsu-lab/alpaca", "revision": "0" * 40, "subset": None,
           "data_files": None, "split": "train", **PARAMS}
    with pytest.raises(InstructionDataError, match=rf"tatsu-lab/alpaca@{'0' * 40} .*could not "
                       r"be loaded.*Is the hub reachable"):
        load_conversations(hub, None, 4, "first", 0)


# --------------------------------------------------------------------------- config and plan


def plan_of(config: dict, tmp_path: Path) -> Plan:
    return Plan(validate_config(config, PROJECT), workdir=tmp_path)


def test_config_checks_the_data_spec(tmp_path):
    def check(change, message):
        with pytest.raises(ConfigError, match=message):
            validate_config(with_changes(tiny_config(), change), PROJECT)

    check(lambda c: c["sft"].update(data={"hub": "org/set"}),
          r"config key 'sft.data.revision': required with 'hub'")
    check(lambda c: c["sft"].update(data={"hub": "org/set", "revision": "abc", "path": "x.jsonl"}),
          "give exactly one of 'path'")
    check(lambda c: c["sft"].update(data={"path": str(tmp_path / "none.jsonl")}),
          "config key 'sft.data.path': file not found")
    check(lambda c: c["sft"].update(data={"path": str(tmp_path / "x.csv")}),
          r"config key 'sft.data.path': .*x.csv is not a .jsonl")
    check(lambda c: c["sft"].update(chat_template="yes"), "'sft.chat_template'")
    # An SFT model from the hub and no CT-then-SFT: the data is not used, so not checked.
    validate_config(with_changes(tiny_config(), lambda c: (
        c["sft"].update(source="hf", hf={"id": "org/sft"}, data={"hub": "org/set"}),
        c.update(ct_sft={"enabled": False}))), PROJECT)


def test_plan_identifies_a_local_dataset_by_content_and_a_hub_one_by_revision(tmp_path):
    default = plan_of(tiny_config(), tmp_path)
    sft = default.sft
    assert sft.recipe["dataset"] == {
        "sha256": sha256_file(PROJECT / "data" / "topic-instructions" / "en.jsonl.gz")}
    assert sft.inputs["dataset"].endswith("data/topic-instructions/en.jsonl.gz")
    # The same bytes elsewhere plan the same SFT model; other bytes, another one.
    copy = tmp_path / "copy.jsonl.gz"
    copy.write_bytes((PROJECT / "data" / "topic-instructions" / "en.jsonl.gz").read_bytes())
    moved = plan_of(with_changes(tiny_config(), lambda c: c["sft"].update(
        data={"path": str(copy)})), tmp_path)
    assert moved.sft.path == sft.path
    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "p", "response": "r"}])
    changed = plan_of(with_changes(tiny_config(), lambda c: c["sft"].update(
        data={"path": str(other)})), tmp_path)
    assert changed.sft.path != sft.path

    hub = {"hub": "Open-Orca/FLAN", "revision": "f" * 40, "data_files": "flan_zsopt_data/*"}
    config = with_changes(tiny_config(), lambda c: c["sft"].update(data=hub))
    planned = plan_of(config, tmp_path)
    ctsfts = [a for (rule, _), a in planned.by_key.items() if rule == "ctsft"]
    assert ctsfts and all(a.recipe["dataset"] == {
        "hub": "Open-Orca/FLAN", "revision": "f" * 40, "subset": None,
        "data_files": "flan_zsopt_data/*", "split": "train"} for a in ctsfts)
    assert all("dataset" not in a.inputs for a in [planned.sft, *ctsfts])
    pinned_elsewhere = with_changes(config, lambda c: c["sft"]["data"].update(revision="e" * 40))
    assert plan_of(pinned_elsewhere, tmp_path).sft.path != planned.sft.path
