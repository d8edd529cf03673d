"""Training stages: exact token budgets, SFT label masking, and a pretrain -> ct -> sft chain."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, set_seed

from workflow import models, train
from workflow.artifacts import read_json, sha256_file
from workflow.data import replay_tokens_for
from workflow.instructions import Encoder
from workflow.prompts import topic_answer, topic_example

SEQ_LEN = 32
WORDS = {
    "scalc": "cell sheet formula column row sum value range pivot".split(),
    "swriter": "page paragraph style font text heading footnote margin".split(),
    "sdraw": "shape line curve arrow fill gradient object layer".split(),
}
ARCH = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "max_position_embeddings": 64,
    "tie_embeddings": False,
}
TRAIN = {
    "lr": 1e-2,
    "min_lr": 1e-3,
    "warmup_ratio": 0.1,
    "batch_size": 8,
    "seq_len": SEQ_LEN,
    "weight_decay": 0.0,
    "seed": 0,
}


def write_corpus(path: Path, seed: int, lines: int, prefix: str = "") -> Path:
    rng = random.Random(seed)
    topics = list(WORDS)
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(lines):
            topic = topics[i % len(topics)]
            text = prefix + " ".join(rng.choice(WORDS[topic]) for _ in range(10)) + "."
            handle.write(json.dumps({"text": text, "topic": topic, "split": "train"}) + "\n")
    return path


def write_tokens(directory: Path, corpus: Path, tokenizer, budget: int) -> Path:
    """A token dir in the data stage's format: documents + EOS, cut to ``budget``."""
    ids: list[int] = []
    for line in corpus.read_text().splitlines():
        ids += tokenizer(json.loads(line)["text"])["input_ids"] + [tokenizer.eos_token_id]
    assert len(ids) >= budget
    directory.mkdir(parents=True)
    np.save(directory / "tokens.npy", np.asarray(ids[:budget], dtype=np.int32))
    return directory


def write_instructions(path: Path, corpus: Path) -> Path:
    """The corpus's paragraphs as topic instructions, as the demo builder writes them."""
    with open(path, "w", encoding="utf-8") as handle:
        for line in corpus.read_text().splitlines():
            record = json.loads(line)
            handle.write(json.dumps(topic_example(record["text"], record["topic"])) + "\n")
    return path


def topic_dataset(tokenizer, corpus: Path, n: int) -> list[dict]:
    """The first ``n`` topic examples of a corpus, encoded as the SFT stage encodes them."""
    encoder = Encoder(tokenizer, SEQ_LEN, chat_template=False)
    records = [json.loads(line) for line in corpus.read_text().splitlines()[:n]]
    return [encoder.encode(topic_messages(r["text"], r["topic"])) for r in records]


def topic_messages(text: str, topic: str) -> list[dict]:
    example = topic_example(text, topic)
    return [{"role": "user", "content": example["prompt"]},
            {"role": "assistant", "content": example["response"]}]


def recipe(stage: str, **params) -> dict:
    return {"stage": stage, "version": "1", "params": params}


def mean_loss(model_dir: Path, dataset) -> float:
    """Token-weighted loss of a saved model over a dataset of train.py examples."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=False).eval()
    collator = train.CountingCollator(pad_id=0)
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(dataset), 16):
            batch = collator([dataset[i] for i in range(start, min(start + 16, len(dataset)))])
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * n
    return total / collator.label_tokens


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("chain")
    en = write_corpus(root / "en.jsonl", 1, 90)
    es = write_corpus(root / "es.jsonl", 2, 90, prefix="la hoja: ")
    tok_dir = root / "tokenizer"
    tok_recipe = recipe("tokenizer", vocab_size=300, mix={"en": 1.0, "es": 1.0}, max_chars=50_000)
    models.main(
        [
            "tokenizer",
            "--recipe",
            json.dumps(tok_recipe),
            "--corpus",
            f"en={en}",
            "--corpus",
            f"es={es}",
            "--out",
            str(tok_dir),
        ]
    )
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    # Budgets not divisible by seq_len (nor by seq_len - 1): the last block is partial.
    en_a = write_tokens(root / "tok-en-a", en, tokenizer, 1001)
    en_b = write_tokens(root / "tok-en-b", en, tokenizer, 500)
    es_tok = write_tokens(root / "tok-es", es, tokenizer, 997)

    pre = root / "pretrain"
    pre_recipe = recipe("pretrain", architecture=ARCH, train={**TRAIN, "epochs": 3})
    train.main(
        [
            "pretrain",
            "--recipe",
            json.dumps(pre_recipe),
            "--tokenizer",
            str(tok_dir),
            "--data",
            str(en_a),
            str(en_b),
            "--out",
            str(pre),
            "--threads",
            "2",
        ]
    )
    ct = root / "ct"
    ct_recipe = recipe("ct", train={**TRAIN, "epochs": 3, "grad_accum": 2})
    train.main(
        [
            "ct",
            "--recipe",
            json.dumps(ct_recipe),
            "--model",
            str(pre),
            "--data",
            str(es_tok),
            "--out",
            str(ct),
            "--threads",
            "2",
        ]
    )
    sft = root / "sft"
    instructions = write_instructions(root / "en-topic.jsonl", en)
    sft_recipe = {
        **recipe("sft", examples=60, select="first", chat_template="auto", group_by_length=True,
                 data={},
                 train={**TRAIN, "lr": 5e-3, "epochs": 2}),
        "dataset": {"sha256": sha256_file(instructions)},
    }
    train.main(
        [
            "sft",
            "--recipe",
            json.dumps(sft_recipe),
            "--model",
            str(ct),
            "--dataset",
            str(instructions),
            "--out",
            str(sft),
            "--threads",
            "2",
        ]
    )
    return {
        "root": root,
        "tokenizer": tokenizer,
        "tok_dir": tok_dir,
        "en": en,
        "en_tokens": [en_a, en_b],
        "es_tokens": es_tok,
        "pretrain": pre,
        "ct": ct,
        "sft": sft,
        "recipes": {"pretrain": pre_recipe, "ct": ct_recipe, "sft": sft_recipe},
    }


def initial_model_dir(chain) -> Path:
    """The pretrain stage's seeded initialisation, saved, to measure loss before training."""
    out = chain["root"] / "init"
    if not out.exists():
        tokenizer = chain["tokenizer"]
        set_seed(TRAIN["seed"])
        LlamaForCausalLM(models.scratch_config(ARCH, tokenizer)).save_pretrained(out)
    return out


def blocks(paths: list[Path], tokenizer) -> train.PackedBlocks:
    tokens = np.concatenate([train.load_tokens(p) for p in paths])
    return train.PackedBlocks(tokens, SEQ_LEN, tokenizer.eos_token_id)


def test_outputs_are_complete_artifacts(chain):
    for stage in ("pretrain", "ct", "sft"):
        out = chain[stage]
        names = {p.name for p in out.iterdir()}
        assert {
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "recipe.json",
            "metrics.json",
        } <= names
        assert not any(name.endswith((".bin", ".pt")) or name.startswith("_") for name in names)
        assert read_json(out / "recipe.json")["recipe"] == chain["recipes"][stage]
        metrics = read_json(out / "metrics.json")
        assert {
            "tokens_budget",
            "tokens_trained",
            "steps",
            "wall_s",
            "tokens_per_s",
            "final_loss",
            "peak_rss_mb",
        } <= set(metrics)
        assert np.isfinite(metrics["final_loss"]) and metrics["peak_rss_mb"] > 0
        tok = AutoTokenizer.from_pretrained(out)
        assert tok("cell sheet")["input_ids"] == chain["tokenizer"]("cell sheet")["input_ids"]
    # No leftovers of the atomic writes or the Trainer's output_dir beside the artifacts.
    assert not list(chain["root"].glob(".*tmp*"))


def test_token_budget_is_trained_exactly(chain):
    pre = read_json(chain["pretrain"] / "metrics.json")
    assert pre["tokens_budget"] == 1501
    assert pre["tokens_trained"] == 3 * 1501
    blocks_per_epoch = -(-1501 // (SEQ_LEN - 1))  # 49 blocks
    assert pre["steps"] == 3 * -(-blocks_per_epoch // TRAIN["batch_size"])
    ct = read_json(chain["ct"] / "metrics.json")
    assert (ct["tokens_budget"], ct["tokens_trained"]) == (997, 3 * 997)
    # 33 blocks -> 5 batches of 8 -> 3 updates per epoch with grad_accum 2 (the last partial).
    assert ct["steps"] == 3 * 3


def test_packed_blocks_target_every_token_once():
    tokens = np.arange(10, 10 + 997, dtype=np.int32)
    dataset = train.PackedBlocks(tokens, SEQ_LEN, sep_id=2)
    targets: list[int] = []
    for i in range(len(dataset)):
        item = dataset[i]
        assert len(item["input_ids"]) <= SEQ_LEN
        targets += [t for t in item["labels"][1:] if t != -100]
    assert targets == tokens.tolist()
    assert dataset[0]["input_ids"][0] == 2
    assert train.count_targets(dataset) == 997
    batch = train.CountingCollator(pad_id=0)([dataset[len(dataset) - 1], dataset[0]])
    short = len(dataset[len(dataset) - 1]["input_ids"])
    assert short < SEQ_LEN
    assert (batch["input_ids"][0, short:] == 0).all()
    assert (batch["labels"][0, short:] == -100).all()
    assert (batch["attention_mask"][0, short:] == 0).all()


def test_pretrain_lowers_loss_on_its_data(chain):
    data = blocks(chain["en_tokens"], chain["tokenizer"])
    before = mean_loss(initial_model_dir(chain), data)
    after = mean_loss(chain["pretrain"], data)
    assert before > 5.0  # about ln(300) for an untrained model
    assert after < before - 1.0


def test_ct_lowers_loss_on_its_data(chain):
    data = blocks([chain["es_tokens"]], chain["tokenizer"])
    assert mean_loss(chain["ct"], data) < mean_loss(chain["pretrain"], data) - 0.3


def test_sft_lowers_answer_loss(chain):
    data = topic_dataset(chain["tokenizer"], chain["en"], 60)
    assert mean_loss(chain["sft"], data) < mean_loss(chain["ct"], data) - 0.5
    metrics = read_json(chain["sft"] / "metrics.json")
    assert metrics["examples"] == 60 and metrics["examples_dropped"] == 0
    assert metrics["chat_template"] is False  # the scratch tokenizer has none: plain format
    assert metrics["tokens_budget"] == train.count_targets(data)
    assert metrics["tokens_trained"] == 2 * metrics["tokens_budget"]


def test_sft_example_masks_prompt_and_keeps_answer(chain):
    tokenizer = chain["tokenizer"]
    encoder = Encoder(tokenizer, SEQ_LEN, chat_template=False)
    long_text = " ".join(["formula cell value"] * 40)
    example = encoder.encode(topic_messages(long_text, "scalc"))
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels) == SEQ_LEN  # truncated to fit
    answer = [label for label in labels if label != -100]
    assert answer[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer[:-1]) == topic_answer("scalc") == " spreadsheet"
    n_prompt = len(ids) - len(answer)
    assert labels[:n_prompt] == [-100] * n_prompt and ids[n_prompt:] == answer
    # Left truncation keeps the cue next to the answer.
    assert tokenizer.decode(ids[:n_prompt]).endswith("\nTopic:")
    short = encoder.encode(topic_messages("cell", "swriter"))
    assert tokenizer.decode(short["input_ids"]) == "Paragraph: cell\nTopic: text document</s>"


def test_sft_rejects_a_dataset_that_changed_after_planning(chain, tmp_path):
    changed = tmp_path / "changed.jsonl"
    changed.write_text(chain["root"].joinpath("en-topic.jsonl").read_text()[:-200] + "\n")
    args = ["sft", "--recipe", json.dumps(chain["recipes"]["sft"]), "--model", str(chain["ct"]),
            "--dataset", str(changed), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="does not have the sha256 the recipe names"):
        train.main(args)
    assert not (tmp_path / "out").exists()


def test_bad_train_params_are_named():
    with pytest.raises(ValueError, match="lrr"):
        train.train_params({"train": {**TRAIN, "lrr": 1.0}})
    with pytest.raises(ValueError, match="'params.train.seq_len'"):
        train.train_params({"train": {**TRAIN, "seq_len": 4}})
    with pytest.raises(ValueError, match="'params.train.warmup_ratio'"):
        train.train_params({"train": {**TRAIN, "warmup_ratio": 1.5}})
    with pytest.raises(ValueError, match="'params.train.min_lr'"):
        train.train_params({"train": {**TRAIN, "min_lr": 1.0}})
    with pytest.raises(ValueError, match="'params.train'"):
        train.train_params({})
    # Missing keys take the schema's defaults, as the config does at parse time.
    assert train.train_params({"train": {}})["seq_len"] == 2048


def test_token_ids_outside_vocab_are_rejected(chain, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    np.save(bad / "tokens.npy", np.asarray([1, 2, 5000], dtype=np.int32))
    with pytest.raises(SystemExit, match="5000"):
        train.main(
            [
                "ct",
                "--recipe",
                json.dumps(recipe("ct", train=TRAIN)),
                "--model",
                str(chain["pretrain"]),
                "--data",
                str(bad),
                "--out",
                str(tmp_path / "out"),
            ]
        )
    assert not (tmp_path / "out").exists()


def run_ct(chain, out: Path, train_overrides: dict, *extra: str, **params) -> dict:
    ct_recipe = recipe("ct", train={**TRAIN, "epochs": 3, "grad_accum": 2, **train_overrides})
    ct_recipe["params"].update(params)
    train.main(
        [
            "ct",
            "--recipe",
            json.dumps(ct_recipe),
            "--model",
            str(chain["pretrain"]),
            "--data",
            str(chain["es_tokens"]),
            "--out",
            str(out),
            "--threads",
            "2",
            *extra,
        ]
    )
    return read_json(out / "metrics.json")


def test_gradient_checkpointing_gives_the_same_weights(chain, tmp_path):
    run_ct(chain, tmp_path / "gc", {"gradient_checkpointing": True})
    plain = load_file(chain["ct"] / "model.safetensors")
    checkpointed = load_file(tmp_path / "gc" / "model.safetensors")
    for name, tensor in plain.items():
        torch.testing.assert_close(checkpointed[name], tensor, rtol=0, atol=1e-6)


def test_lora_is_folded_into_full_weights(chain, tmp_path):
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    metrics = run_ct(chain, tmp_path / "lora", {"lora": lora, "lr": 2e-2, "epochs": 1})
    assert metrics["tokens_trained"] == 997
    base = load_file(chain["pretrain"] / "model.safetensors")
    tuned = load_file(tmp_path / "lora" / "model.safetensors")
    assert tuned.keys() == base.keys()  # plain Llama weights: no adapter tensors left
    changed = {name for name in base if not torch.equal(base[name], tuned[name])}
    assert changed and all(name.endswith(("q_proj.weight", "v_proj.weight")) for name in changed)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lora", trust_remote_code=False)
    data = blocks([chain["es_tokens"]], chain["tokenizer"])
    assert mean_loss(tmp_path / "lora", data) < mean_loss(chain["pretrain"], data)
    assert model.num_parameters() == LlamaForCausalLM.from_pretrained(
        chain["pretrain"]
    ).num_parameters()


def test_replay_is_interleaved_and_counted_apart(chain, tmp_path):
    replay_dir = chain["en_tokens"][0]  # 1001 English tokens
    flags = ("--replay", str(replay_dir))
    metrics = run_ct(chain, tmp_path / "replay", {"epochs": 1}, *flags, replay={"share": 0.2})
    assert metrics["tokens_budget"] == 997 and metrics["tokens_trained"] == 997
    assert metrics["replay_tokens_budget"] == replay_tokens_for(997, 0.2) == 249
    assert metrics["replay_tokens_trained"] == 249
    mixed = train.Interleaved([{"x": "t"}] * 8, [{"x": "r"}] * 2)
    order = [mixed[i] for i in range(len(mixed))]
    assert "".join(item["x"] for item in order) == "ttttrttttr"
    assert [item.get("source", 0) for item in order] == [0, 0, 0, 0, 1] * 2
    with pytest.raises(SystemExit, match="needs 1,495"):
        run_ct(chain, tmp_path / "short", {}, "--replay", str(replay_dir), replay={"share": 0.6})
    with pytest.raises(SystemExit, match="go together"):
        run_ct(chain, tmp_path / "none", {}, replay={"share": 0.2})


def test_new_train_params_are_checked():
    assert train.train_params({"train": TRAIN})["bf16"] == "auto"
    with pytest.raises(ValueError, match="save_steps"):
        train.train_params({"train": {**TRAIN, "save_steps": 0}})
    with pytest.raises(ValueError, match="bf16"):
        train.train_params({"train": {**TRAIN, "bf16": "yes"}})
    with pytest.raises(ValueError, match="'params.train.lora.*rank"):
        train.train_params({"train": {**TRAIN, "lora": {"rank": 4}}})
    with pytest.raises(ValueError, match="'params.train.fsdp'.*lora"):
        train.train_params({"train": {**TRAIN, "lora": {}, "fsdp": "full_shard auto_wrap"}})
    with pytest.raises(ValueError, match="share"):
        train.replay_params({"replay": {"share": 1.0}})


def test_sft_logits_at_targets_only_give_the_full_loss_and_gradients(chain, tmp_path):
    """The SFT trainer's LM head sees only the rows whose next token is a target: the loss and
    every gradient match the full-vocabulary forward."""
    from transformers import TrainingArguments

    data = topic_dataset(chain["tokenizer"], chain["en"], 16)
    collator = train.CountingCollator(chain["tokenizer"].pad_token_id)
    batch = collator(data)
    targets = int((batch["labels"][:, 1:] != -100).sum())
    assert targets < batch["labels"][:, 1:].numel() / 2  # most positions are prompt or padding
    trainer_cls, _ = train._trainer_classes()
    results = []
    for only in (False, True):
        model = AutoModelForCausalLM.from_pretrained(chain["ct"])
        trainer = trainer_cls(model=model, args=TrainingArguments(
            output_dir=str(tmp_path / str(only)), use_cpu=True, report_to="none"))
        trainer.target_logits_only = only
        seen = []
        head = model.get_output_embeddings()
        hook = head.register_forward_hook(lambda _m, _args, out, seen=seen: seen.append(out.shape))
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(targets))
        hook.remove()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        # The head computed every position, or exactly the target rows.
        assert seen[0][:-1] == ((targets,) if only else batch["input_ids"].shape)
    (full, full_grads), (only, only_grads) = results
    torch.testing.assert_close(only, full, rtol=1e-5, atol=1e-6)
    for name, grad in full_grads.items():
        torch.testing.assert_close(only_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_length_grouped_batches_are_a_function_of_seed_and_epoch():
    lengths = [random.Random(i).randint(3, 120) for i in range(400)]
    sampler = train.LengthGroupedEpochs(lengths, 8, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(400)) and list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert list(train.LengthGroupedEpochs(lengths, 8, seed=3)) == first  # no global RNG state

    def padded(order: list[int]) -> int:
        return sum(8 * max(lengths[i] for i in order[k:k + 8]) for k in range(0, 400, 8))

    shuffled = random.Random(0).sample(range(400), 400)
    assert padded(first) < 0.7 * padded(shuffled)
