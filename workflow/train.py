"""Training stages, all on transformers' Trainer: pretraining from scratch, CT and SFT.

    python -m workflow.train pretrain --recipe JSON --tokenizer DIR --data DIR [DIR ...] --out DIR
    python -m workflow.train ct --recipe JSON --model DIR --data DIR --out DIR
    python -m workflow.train sft --recipe JSON --model DIR --corpus PATH --out DIR
    (each takes --threads N; on a CUDA machine the Trainer uses the visible GPU)

recipe["params"]["train"] (unknown keys are rejected):
    lr, min_lr          peak and floor of the cosine schedule ("cosine_with_min_lr")
    warmup_ratio        fraction of the steps spent warming up linearly (default 0)
    batch_size          sequences per device step; grad_accum steps make one update (default 1)
    seq_len             tokens per sequence
    weight_decay        AdamW weight decay (default 0)
    epochs              passes over the data (default 1)
    seed                model init, data order (default 0)

Token budgets are exact. tokens.npy is read as one stream (documents already end in EOS) and
cut into blocks of seq_len tokens that overlap by one token: block k is
stream[k*(seq_len-1) : k*(seq_len-1)+seq_len]. Because a causal LM predicts token i+1 from
tokens <= i, every token of tokens.npy is a prediction target exactly once per epoch; an EOS is
put in front of the stream so that its first token is a target too. The final, partial block is
padded with the pad id and label -100. metrics.json's tokens_trained counts the targets the
collator actually handed to the Trainer, so it is measured, not derived.

Weights are trained in float32 (bf16 autocast on a CUDA device that supports it) and saved in
the dtype the input model was stored in.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workflow.artifacts import atomic_dir, parse_recipe_arg, write_json, write_recipe
from workflow.corpus import read_corpus, split_records
from workflow.prompts import TOPIC_LABELS, topic_answer, topic_prompt

log = logging.getLogger("workflow.train")

IGNORE = -100
TRAIN_REQUIRED = ("lr", "min_lr", "batch_size", "seq_len")
TRAIN_DEFAULTS: dict[str, Any] = {
    "warmup_ratio": 0.0,
    "weight_decay": 0.0,
    "epochs": 1,
    "seed": 0,
    "grad_accum": 1,
}


def train_params(params: dict[str, Any]) -> dict[str, Any]:
    """recipe["params"]["train"], validated, with defaults filled in."""
    raw = params.get("train")
    if not isinstance(raw, dict):
        raise ValueError("params: 'train' must be an object of training settings")  # noqa: TRY004
    unknown = sorted(set(raw) - set(TRAIN_REQUIRED) - set(TRAIN_DEFAULTS))
    if unknown:
        raise ValueError(f"train params: unknown key(s) {unknown}")
    missing = [key for key in TRAIN_REQUIRED if key not in raw]
    if missing:
        raise ValueError(f"train params: missing required key(s) {missing}")
    train = {**TRAIN_DEFAULTS, **raw}
    for key in ("batch_size", "epochs", "grad_accum"):
        if not isinstance(train[key], int) or train[key] < 1:
            raise ValueError(f"train params: '{key}' must be an integer >= 1, got {train[key]!r}")
    if not isinstance(train["seq_len"], int) or train["seq_len"] < 2:
        raise ValueError(
            f"train params: 'seq_len' must be an integer >= 2, got {train['seq_len']!r}"
        )
    if not 0 < train["lr"] or not 0 <= train["min_lr"] <= train["lr"]:
        raise ValueError(
            f"train params: need 0 <= min_lr <= lr and lr > 0, got {train['min_lr']}, {train['lr']}"
        )
    if not 0 <= train["warmup_ratio"] < 1:
        raise ValueError(
            f"train params: 'warmup_ratio' must be in [0, 1), got {train['warmup_ratio']}"
        )
    return train


# --------------------------------------------------------------------------- data


def load_tokens(data_dir: str | Path) -> np.ndarray:
    path = Path(data_dir) / "tokens.npy"
    if not path.is_file():
        raise FileNotFoundError(f"token data directory {data_dir} has no tokens.npy")
    tokens = np.load(path, allow_pickle=False)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer) or tokens.size == 0:
        raise ValueError(
            f"{path}: expected a non-empty 1-D integer array, got {tokens.dtype} {tokens.shape}"
        )
    return tokens


def check_vocab(tokens: np.ndarray, vocab_size: int, where: str) -> None:
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"{where}: token ids span [{low}, {high}], "
            f"outside the model's vocabulary of {vocab_size}"
        )


class PackedBlocks(torch.utils.data.Dataset):
    """Blocks of ``seq_len`` overlapping by one token: each token a target once (module doc)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, sep_id: int) -> None:
        self.stream = torch.from_numpy(np.concatenate([[sep_id], tokens]).astype(np.int64))
        self.seq_len = seq_len
        self.stride = seq_len - 1
        self.targets = int(tokens.size)

    def __len__(self) -> int:
        return math.ceil(self.targets / self.stride)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.stride
        ids = self.stream[start : start + self.seq_len].tolist()
        # Position 0 is never a target of a shifted causal-LM loss; mark it so counts are honest.
        return {"input_ids": ids, "labels": [IGNORE, *ids[1:]]}


def build_sft_example(tokenizer: Any, text: str, topic: str, seq_len: int) -> dict[str, list[int]]:
    """One SFT example: loss only on the answer (and its EOS).

    The split into prompt and answer ids follows lm-eval's ``_encode_pair`` (encode prompt+answer,
    the answer is what follows the prompt's ids), with the tokenizer's default special tokens as
    lm-eval's HFLM uses them, so training and the topic task score the same tokens. A prompt too
    long for ``seq_len`` loses tokens on the left, as lm-eval's ``left_truncate_len`` does: the
    "Topic:" cue next to the answer is always kept.
    """
    if topic not in TOPIC_LABELS:
        raise ValueError(f"unknown topic {topic!r}; known topics: {sorted(TOPIC_LABELS)}")
    prompt, answer = topic_prompt(text), topic_answer(topic)
    context = tokenizer(prompt)["input_ids"]
    whole = tokenizer(prompt + answer)["input_ids"]
    if whole[: len(context)] == context and len(whole) > len(context):
        answer_ids = whole[len(context) :]
    else:  # a merge across the boundary: encode the answer on its own
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    answer_ids = [*answer_ids, tokenizer.eos_token_id]
    room = seq_len - len(answer_ids)
    if room < 1:
        raise ValueError(
            f"seq_len {seq_len} leaves no room for a prompt before the answer {answer!r}"
        )
    context = context[-room:]
    return {"input_ids": context + answer_ids, "labels": [IGNORE] * len(context) + answer_ids}


def select_sft_records(
    records: list[dict[str, Any]], examples: int, seed: int
) -> list[dict[str, Any]]:
    """``examples`` training records with a topic, balanced over topics as far as data allows.

    Round robin over topics (each topic's records shuffled with ``seed``), so a topic only gets
    more than its share once the smaller topics run out.
    """
    by_topic: dict[str, list[dict[str, Any]]] = {}
    for record in split_records(records, "train"):
        topic = record.get("topic")
        if topic is None:
            continue
        if topic not in TOPIC_LABELS:
            raise ValueError(
                f"corpus record has unknown topic {topic!r}; known: {sorted(TOPIC_LABELS)}"
            )
        by_topic.setdefault(topic, []).append(record)
    if not by_topic:
        raise ValueError("corpus has no training records with a topic to build SFT examples from")
    rng = random.Random(seed)
    pools = [rng.sample(by_topic[topic], len(by_topic[topic])) for topic in sorted(by_topic)]
    chosen: list[dict[str, Any]] = []
    depth = 0
    while len(chosen) < examples and any(depth < len(pool) for pool in pools):
        for pool in pools:
            if depth < len(pool) and len(chosen) < examples:
                chosen.append(pool[depth])
        depth += 1
    if len(chosen) < examples:
        log.warning("asked for %d SFT examples, the corpus has only %d", examples, len(chosen))
    rng.shuffle(chosen)
    return chosen


class CountingCollator:
    """Right-pads a batch and counts the label tokens handed to training (shifted, as the loss)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id
        self.label_tokens = 0

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[row, :n] = torch.tensor(feature["input_ids"])
            labels[row, :n] = torch.tensor(feature["labels"])
            mask[row, :n] = 1
        self.label_tokens += int((labels[:, 1:] != IGNORE).sum())
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def count_targets(dataset: Any) -> int:
    return sum(
        sum(label != IGNORE for label in dataset[i]["labels"][1:]) for i in range(len(dataset))
    )


# --------------------------------------------------------------------------- training


def _pad_id(tokenizer: Any) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has neither a pad nor an eos token to pad with")
    return tokenizer.eos_token_id


def _check_seq_len(model: Any, seq_len: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise ValueError(
            f"train params: seq_len {seq_len} exceeds the model's max_position_embeddings {limit}"
        )


def run_training(
    model: Any, dataset: Any, collator: CountingCollator, train: dict[str, Any], workdir: Path
) -> dict[str, Any]:
    """Train ``model`` in place with the Trainer; return the metrics that go in metrics.json."""
    from transformers import Trainer, TrainingArguments

    cuda = torch.cuda.is_available()
    batches = math.ceil(len(dataset) / train["batch_size"])
    steps = train["epochs"] * math.ceil(batches / train["grad_accum"])
    args = TrainingArguments(
        output_dir=str(workdir),
        per_device_train_batch_size=train["batch_size"],
        gradient_accumulation_steps=train["grad_accum"],
        num_train_epochs=train["epochs"],
        learning_rate=train["lr"],
        weight_decay=train["weight_decay"],
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": train["min_lr"]},
        # An explicit step count: a float would be read as a ratio only below 1.
        warmup_steps=math.ceil(steps * train["warmup_ratio"]),
        logging_steps=max(1, min(50, steps // 20)),
        logging_first_step=True,
        save_strategy="no",
        report_to="none",
        use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        remove_unused_columns=False,
        seed=train["seed"],
        data_seed=train["seed"],
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    start = time.perf_counter()
    output = trainer.train()
    wall = time.perf_counter() - start
    if trainer.state.global_step != steps:
        raise RuntimeError(f"Trainer ran {trainer.state.global_step} steps, expected {steps}")
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    metrics = {
        "steps": steps,
        "tokens_trained": collator.label_tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(collator.label_tokens / wall, 1) if wall > 0 else None,
        "final_loss": losses[-1] if losses else output.training_loss,
        "mean_loss": output.training_loss,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if cuda:
        metrics["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return metrics


def _finish(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    collator: CountingCollator,
    recipe: dict[str, Any],
    out: Path,
    save_dtype: torch.dtype,
    extra: dict[str, Any],
) -> None:
    train = train_params(recipe["params"])
    _check_seq_len(model, train["seq_len"])
    with atomic_dir(out) as tmp:
        workdir = tmp / "_trainer"
        metrics = run_training(model, dataset, collator, train, workdir)
        shutil.rmtree(workdir, ignore_errors=True)
        model.to(save_dtype).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "metrics.json", {**extra, **metrics})
        write_recipe(tmp, recipe)
    log.info("wrote %s: %s", out, metrics)


def _load_model(model_dir: Path) -> tuple[Any, Any, torch.dtype]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"model directory {model_dir} has no config.json")
    stored = getattr(AutoConfig.from_pretrained(model_dir, trust_remote_code=False), "dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, trust_remote_code=False
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    return model, tokenizer, stored if isinstance(stored, torch.dtype) else torch.float32


def pretrain(recipe: dict[str, Any], tokenizer_dir: Path, data_dirs: list[Path], out: Path) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM, set_seed

    from workflow.models import scratch_config

    params = recipe["params"]
    if "architecture" not in params:
        raise ValueError("pretrain params: missing 'architecture'")
    train = train_params(params)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    config = scratch_config(params["architecture"], tokenizer)
    set_seed(train["seed"])
    model = LlamaForCausalLM(config)
    tokens = np.concatenate([load_tokens(d) for d in data_dirs])
    check_vocab(tokens, config.vocab_size, ", ".join(map(str, data_dirs)))
    dataset = PackedBlocks(tokens, train["seq_len"], tokenizer.eos_token_id)
    collator = CountingCollator(_pad_id(tokenizer))
    extra = {
        "tokens_budget": int(tokens.size),
        "epochs": train["epochs"],
        "parameters": model.num_parameters(),
    }
    _finish(model, tokenizer, dataset, collator, recipe, out, torch.float32, extra)


def continual(recipe: dict[str, Any], model_dir: Path, data_dir: Path, out: Path) -> None:
    train = train_params(recipe["params"])
    model, tokenizer, stored = _load_model(model_dir)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer of {model_dir} has no eos token to separate documents")
    tokens = load_tokens(data_dir)
    check_vocab(tokens, model.get_input_embeddings().num_embeddings, str(data_dir))
    dataset = PackedBlocks(tokens, train["seq_len"], tokenizer.eos_token_id)
    collator = CountingCollator(_pad_id(tokenizer))
    extra = {"tokens_budget": int(tokens.size), "epochs": train["epochs"]}
    _finish(model, tokenizer, dataset, collator, recipe, out, stored, extra)


def sft(recipe: dict[str, Any], model_dir: Path, corpus: Path, out: Path) -> None:
    params = recipe["params"]
    train = train_params(params)
    examples = params.get("examples")
    if not isinstance(examples, int) or examples < 1:
        raise ValueError(f"sft params: 'examples' must be an integer >= 1, got {examples!r}")
    model, tokenizer, stored = _load_model(model_dir)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer of {model_dir} has no eos token to end answers with")
    records = select_sft_records(read_corpus(corpus), examples, train["seed"])
    dataset = [
        build_sft_example(tokenizer, r["text"], r["topic"], train["seq_len"]) for r in records
    ]
    collator = CountingCollator(_pad_id(tokenizer))
    extra = {
        "tokens_budget": count_targets(dataset),
        "epochs": train["epochs"],
        "examples": len(dataset),
        "examples_per_topic": {
            t: sum(r["topic"] == t for r in records) for t in sorted({r["topic"] for r in records})
        },
    }
    _finish(model, tokenizer, dataset, collator, recipe, out, stored, extra)


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m workflow.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("pretrain", help="train a from-scratch Llama on token dirs")
    pre.add_argument("--tokenizer", type=Path, required=True)
    pre.add_argument("--data", type=Path, nargs="+", required=True)
    ct = sub.add_parser("ct", help="continual pre-training of a model dir on a token dir")
    ct.add_argument("--model", type=Path, required=True)
    ct.add_argument("--data", type=Path, required=True)
    tune = sub.add_parser("sft", help="supervised fine-tuning on topic classification")
    tune.add_argument("--model", type=Path, required=True)
    tune.add_argument("--corpus", type=Path, required=True)
    for command in (pre, ct, tune):
        command.add_argument("--recipe", type=parse_recipe_arg, required=True)
        command.add_argument("--out", type=Path, required=True)
        command.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    try:
        if args.command == "pretrain":
            pretrain(args.recipe, args.tokenizer, args.data, args.out)
        elif args.command == "ct":
            continual(args.recipe, args.model, args.data, args.out)
        else:
            sft(args.recipe, args.model, args.corpus, args.out)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
