"""Training stages, all on transformers' Trainer: pretraining from scratch, CT and SFT.

    python -m workflow.train pretrain --recipe JSON --tokenizer DIR --data DIR [DIR ...] --out DIR
    python -m workflow.train ct --recipe JSON --model DIR --data DIR [--replay DIR]
                                [--resume DIR] --out DIR
    python -m workflow.train sft --recipe JSON --model DIR [--dataset PATH] --out DIR
    (each takes --threads N, and --allow-nonfinite to write weights that hold NaN or Inf)

Several processes (DDP, or FSDP with params.train.fsdp) are started by workflow.launch, which
also leases GPU ids; the rules call it, and by hand it reads:

    python -m workflow.launch --gpus 4 -- workflow.train ct --recipe JSON ...   # 4 GPUs
    python -m workflow.launch --gpus 0 --nproc 2 -- workflow.train ct ...       # 2 CPU procs

recipe["params"]["train"] is checked against the config schema's $defs/train, whose defaults
fill missing keys (workflow.config.validate_fragment: the same contract as the config, so a
recipe means the same thing at parse time and here); unknown keys are rejected:
    lr, min_lr          peak and floor of the cosine schedule ("cosine_with_min_lr")
    warmup_ratio        fraction of the steps spent warming up linearly
    batch_size          sequences per micro-batch and process
    grad_accum          micro-batches per optimizer step, summed over all processes (default 1):
                        with N processes each accumulates grad_accum / N, so the tokens per
                        step (batch_size * grad_accum * seq_len) and the result do not depend
                        on the GPU count; grad_accum must be a multiple of N
    seq_len             tokens per sequence
    weight_decay        AdamW weight decay (default 0)
    epochs              passes over the data (default 1)
    seed                model init, data order (default 0)
    save_steps          checkpoint every this many optimizer steps (default null: ~10% of them)
    gradient_checkpointing  recompute activations in backward to save memory (default false)
    bf16                "auto" (bf16 autocast on a CUDA device that supports it), true, false
    lora                null (full fine-tuning) or {r, alpha, dropout, target_modules}: LoRA
                        via peft; the deltas are folded into the full weights before saving
    fsdp                null (DDP) or a TrainingArguments.fsdp string, e.g. "full_shard
                        auto_wrap" for 7B-class models on several GPUs
recipe["params"]["replay"] (ct only, optional): {"share": s}, the share of replay (English)
tokens among all CT tokens, 0 < s < 1 (the paper's 4:1 mix is 0.2). The target-language budget
stays exact; round(budget * s / (1 - s)) tokens are taken from the front of --replay's
tokens.npy (it must hold at least that many) and packed into blocks of their own, which are
interleaved evenly with the target blocks. Both counts are recorded.

SFT (sft only): recipe["params"] holds examples, select (first | sample), chat_template (auto |
true | false), group_by_length (bool) and data (how records read), and recipe["dataset"] the
data: {"sha256"} of the local file given as --dataset (checked), or the hub dataset {hub,
revision, subset, data_files, split}. Reading, chat templates, response-only labels and
truncation: workflow/instructions.py. The LM head runs on the response positions only (a forward
pre-hook hands it those rows; the model's own loss function takes the matching targets as
``shift_labels``): the same loss, without the full-vocabulary logits of every prompt token. With
group_by_length (the default) micro-batches hold examples of similar lengths, in an order fixed
by the seed and the epoch (so a resumed run takes the same batches): far less padding.

Token budgets are exact. tokens.npy is read as one stream (documents already end in EOS) and
cut into blocks of seq_len tokens that overlap by one token: block k is
stream[k*(seq_len-1) : k*(seq_len-1)+seq_len]. Because a causal LM predicts token i+1 from
tokens <= i, every token of tokens.npy is a prediction target exactly once per epoch; an EOS is
put in front of the stream so that its first token is a target too. The final, partial block is
padded with the pad id and label -100. With N processes the block list is topped up with empty
blocks (no targets) so that every process gets the same number of micro-batches: the default
"even batches" would instead repeat blocks. metrics.json's tokens_trained counts the targets
that reached training_step, summed over processes, so it is measured, not derived.

Resuming. The Trainer checkpoints every save_steps into a work directory beside the output,
<parent>/.<name>.work/, which is no Snakemake output (so a failed job's state survives) and is
removed once the artifact is in place. A rerun of a killed job resumes from the newest complete
checkpoint (one whose marker file was written after the Trainer finished saving it); on CPU the
result is bit-identical to an uninterrupted run (tests/test_resume.py).

One CT run per language (recipe["params"]["schedule"] = {"mode": "one_run", "steps": S}, with
params["tokens"] the budget; workflow/ladder.py). The blocks are read in order, unshuffled (with
replay, interleaved in a fixed order, RunStream), the learning-rate schedule spans S steps
whatever the budget, and the job stops at its budget, which must end an optimizer step. The
artifact keeps the final Trainer checkpoint in resume/ (no TrainingArguments pickle) with
lrmerge-run.json (step, token counts, sha256 of the tokens trained); --resume DIR, the lower
budget's artifact, continues the run from there instead of the base, after checking that DIR
is the same run and that its tokens are the start of --data and --replay. metrics.json adds
tokens_trained_this_job and resumed_from_tokens (tokens_trained counts the whole run so far).

One trainer per work dir: rank 0 holds an exclusive flock on <work dir>/lrmerge.lock for its
whole life, so a second trainer of the same output fails at once, naming the work dir and the
holder's pid. Under workflow.launch the trainer also dies with its job (workflow/lifeline.py):
a killed Snakemake or job shell leaves no orphan to race a rerun.

Weights are trained in float32 (bf16 autocast where enabled) and saved in the dtype the input
model was stored in. NaN or Inf in the weights to be written is an error (nothing is written;
the checkpoints stay) unless --allow-nonfinite is given.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import hashlib
import logging
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workflow import lifeline
from workflow.artifacts import (
    atomic_dir,
    parse_recipe_arg,
    read_json,
    sha256_file,
    write_json,
    write_recipe,
)
from workflow.config import ConfigError, validate_fragment
from workflow.data import replay_tokens_for
from workflow.instructions import HUB_KEYS, Encoder, load_conversations, use_chat_template
from workflow.ladder import RunShape, check_budget, replay_ratio, schedule_spec, schedule_steps

log = logging.getLogger("workflow.train")

# Bump when a change here changes what a stage writes (see workflow/stages.py).
STAGE_VERSIONS = {"pretrain": "1", "sft": "3", "ct": "1"}
IGNORE = -100
CHECKPOINT_DONE = "lrmerge-complete"  # written after the Trainer finished a checkpoint
WORK_META = "work.json"
WORK_LOCK = "lrmerge.lock"  # held by rank 0 for its whole life: one trainer per work dir


class NonFiniteWeights(ValueError):
    """Trained weights hold NaN or Inf; the message names the output and the first tensor."""


def train_params(params: dict[str, Any]) -> dict[str, Any]:
    """recipe["params"]["train"], validated as the config validates it: the schema's
    ``$defs/train`` with its defaults filled in and its cross-key rules (min_lr <= lr, no LoRA
    with FSDP; workflow.config), plus what only a running job knows: its process count."""
    if "train" not in params:
        raise ConfigError("'params.train': missing; the recipe must carry the training settings")
    train = validate_fragment("train", params["train"], "params.train")
    world = _world()[1]
    if train["grad_accum"] % world:
        raise ConfigError(
            f"'params.train.grad_accum': {train['grad_accum']} must be a multiple of the {world} "
            "training processes (it counts micro-batches over all of them)"
        )
    return train


def replay_params(params: dict[str, Any]) -> float | None:
    """params["replay"]["share"], validated; None without replay."""
    raw = params.get("replay")
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != {"share"}:
        raise ValueError(f"ct params: 'replay' must be an object {{\"share\": s}}, got {raw!r}")
    share = raw["share"]
    if not isinstance(share, (int, float)) or not 0 < share < 1:
        raise ValueError(f"ct params: replay 'share' must be in (0, 1), got {share!r}")
    return float(share)


# --------------------------------------------------------------------------- data


def load_tokens(data_dir: str | Path) -> np.ndarray:
    """tokens.npy of a prepare output, memory-mapped read-only: nothing is read until a block
    is (uint16/uint32 from prepare 2, int32 from older outputs)."""
    path = Path(data_dir) / "tokens.npy"
    if not path.is_file():
        raise FileNotFoundError(f"token data directory {data_dir} has no tokens.npy")
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as error:
        raise ValueError(f"{path}: not a token array ({error})") from None
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer) or tokens.size == 0:
        raise ValueError(
            f"{path}: expected a non-empty 1-D integer array, got {tokens.dtype} {tokens.shape}"
        )
    return tokens


def replay_prefix(replay_dir: str | Path, wanted: int, vocab_size: int, need: str
                  ) -> np.ndarray:
    """The first ``wanted`` tokens of the replay data (a map, no copy), checked against the
    vocabulary; ``need`` says why that many (the error when the data holds fewer)."""
    replay = load_tokens(replay_dir)
    if replay.size < wanted:
        raise ValueError(f"--replay {replay_dir} holds {replay.size:,} tokens; {need}")
    replay = replay[:wanted]
    check_vocab(replay, vocab_size, str(replay_dir))
    return replay


def check_vocab(tokens: np.ndarray, vocab_size: int, where: str, chunk: int = 1 << 24) -> None:
    # Chunk by chunk: a pass over a memory map that never holds more than a chunk in memory.
    if tokens.size == 0:
        return
    parts = [tokens[start : start + chunk] for start in range(0, tokens.size, chunk)]
    low, high = min(int(p.min()) for p in parts), max(int(p.max()) for p in parts)
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"{where}: token ids span [{low}, {high}], "
            f"outside the model's vocabulary of {vocab_size}"
        )


class PackedBlocks(torch.utils.data.Dataset):
    """Blocks of ``seq_len`` overlapping by one token: each token a target once (module doc)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, sep_id: int) -> None:
        # The stream is [sep_id, *tokens], never built: tokens may be a memory map of billions.
        self.tokens, self.sep_id = tokens, sep_id
        self.seq_len = seq_len
        self.stride = seq_len - 1
        self.targets = int(tokens.size)

    def __len__(self) -> int:
        return math.ceil(self.targets / self.stride)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.stride  # in the stream, whose position 0 is sep_id
        if start == 0:
            head, block = [self.sep_id], self.tokens[: self.seq_len - 1]
        else:
            head, block = [], self.tokens[start - 1 : start - 1 + self.seq_len]
        ids = head + block.astype(np.int64).tolist()
        # Position 0 is never a target of a shifted causal-LM loss; mark it so counts are honest.
        return {"input_ids": ids, "labels": [IGNORE, *ids[1:]]}


class Interleaved(torch.utils.data.Dataset):
    """Target and replay blocks, spread evenly: item order is fixed by the two lengths alone.

    Block k of a source of n blocks gets the key (k + 1) / n; merging the two sources by that
    key (target first on ties) gives a 4:1 mix as t t t t r t t t t r ... Replay
    items carry ``source`` 1 so that their tokens are counted apart.
    """

    def __init__(self, target: Any, replay: Any) -> None:
        self.target, self.replay = target, replay
        self.targets, self.replays = len(target), len(replay)

    def _target_position(self, k: int) -> int:
        """Where target block k lands: after k targets and the replay blocks j whose key
        (j + 1) / replays is below (k + 1) / targets, counted in integers (no order list:
        millions of blocks would make it gigabytes)."""
        return k + max(0, ((k + 1) * self.replays - 1) // self.targets)

    def __len__(self) -> int:
        return self.targets + self.replays

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        # Target blocks at or before ``index``; positions grow with k, so bisect on them.
        before = bisect.bisect_right(range(self.targets), index, key=self._target_position)
        if before and self._target_position(before - 1) == index:
            return self.target[before - 1]
        return {**self.replay[index - before], "source": 1}


class TopUp(torch.utils.data.Dataset):
    """``dataset`` followed by empty blocks (no targets) up to ``length`` items.

    Under DDP every process must step through the same number of micro-batches; accelerate's
    default would repeat real blocks to get there, training some tokens twice.
    """

    def __init__(self, dataset: Any, length: int, pad_id: int) -> None:
        self.dataset, self.length, self.pad_id = dataset, max(length, len(dataset)), pad_id

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < len(self.dataset):
            return self.dataset[index]
        if not 0 <= index < self.length:
            raise IndexError(index)
        return {"input_ids": [self.pad_id, self.pad_id], "labels": [IGNORE, IGNORE]}


class CountingCollator:
    """Right-pads a batch and counts the label tokens handed to training (shifted, as the loss).

    With ``with_counts`` the batch also carries ``token_counts`` = [target, replay] label tokens
    and the input tokens (padding excluded), which the training step takes out (and counts)
    before the model sees the batch.
    """

    def __init__(self, pad_id: int, with_counts: bool = False) -> None:
        self.pad_id = pad_id
        self.with_counts = with_counts
        self.label_tokens = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        counts = torch.zeros(3, dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[row, :n] = torch.tensor(feature["input_ids"])
            labels[row, :n] = torch.tensor(feature["labels"])
            mask[row, :n] = 1
            counts[feature.get("source", 0)] += int((labels[row, 1:] != IGNORE).sum())
            counts[2] += n
        self.label_tokens += int(counts[:2].sum())
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        if self.with_counts:
            batch["token_counts"] = counts
        return batch


def count_targets(dataset: Any) -> int:
    """Label tokens a shifted causal-LM loss sees (position 0 is never a target)."""
    return sum(
        sum(label != IGNORE for label in dataset[i]["labels"][1:]) for i in range(len(dataset))
    )


# --------------------------------------------------------------------------- training


def _checkpoint_counts(checkpoint: Path, rank: int) -> tuple[int, int, int]:
    """A rank's token counts saved with a checkpoint (older checkpoints lack the inputs)."""
    counts = read_json(checkpoint / f"lrmerge-counts-{rank}.json")["token_counts"]
    return tuple([*counts, 0, 0, 0][:3])  # type: ignore[return-value]


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


def work_dir_for(out: Path) -> Path:
    """Checkpoints of the job that builds ``out``: a stable sibling, not a Snakemake output."""
    out = Path(out)
    return out.parent / f".{out.name}.work"


def claim_work_dir(out: Path) -> int:
    """Lock the work dir of ``out`` for this process's life; return the lock's fd.

    Rank 0 alone takes it: it is the only rank that creates, wipes or deletes the work dir,
    and torchrun ends the other ranks of a job whose rank 0 failed. A second trainer fails here
    at once (lifeline.LockHeld naming the work dir and the holder's pid), before any model is
    loaded, instead of racing the first on the same checkpoints.
    """
    out = Path(out)
    workdir = work_dir_for(out)
    fd = lifeline.hold_lock(workdir / WORK_LOCK, f"work dir {workdir}")
    if out.is_dir() and any(out.iterdir()):
        release_work_dir(out, fd)
        raise FileExistsError(
            f"output {out} already exists (another run finished it); a finished artifact is "
            "never overwritten: move it away to train it again"
        )
    return fd


def release_work_dir(out: Path, fd: int) -> None:
    """Let go of the lock; a work dir that holds nothing else (the job failed before
    training) is removed, so failed starts leave nothing behind."""
    workdir = work_dir_for(out)
    with contextlib.suppress(OSError):
        if [p.name for p in workdir.iterdir()] == [WORK_LOCK]:
            (workdir / WORK_LOCK).unlink()
            workdir.rmdir()
    os.close(fd)


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or Inf."""
    return [
        name
        for name, tensor in tensors.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def _world() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _all_reduce(values: list[float], op: str = "sum") -> list[float]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    # gloo and nccl both take float64 on the device the process group uses.
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    reduce_op = torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX
    torch.distributed.all_reduce(tensor, op=reduce_op)
    return tensor.tolist()


def _complete_checkpoints(workdir: Path) -> list[Path]:
    found = []
    for path in workdir.glob("checkpoint-*"):
        if path.is_dir() and path.name.removeprefix("checkpoint-").isdigit():
            found.append(path)
    return sorted(found, key=lambda p: int(p.name.removeprefix("checkpoint-")))


def prepare_work_dir(workdir: Path, meta: dict[str, Any]) -> Path | None:
    """Make ``workdir`` ready; return the newest complete checkpoint to resume from, if any.

    A work dir left by a different recipe or process count is wiped (its state would not fit);
    checkpoints without the completion marker (killed while saving) are deleted.
    """
    if workdir.is_dir():
        meta_file = workdir / WORK_META
        old = read_json(meta_file) if meta_file.is_file() else None
        # The lock alone is this process's own (claim_work_dir): nothing to start afresh from.
        if old != meta and any(path.name != WORK_LOCK for path in workdir.iterdir()):
            log.warning("work dir %s belongs to another run (%s); starting afresh", workdir, old)
            # Everything but the lock: deleting the file this process holds locked would let a
            # second trainer lock a new file of the same name.
            for path in workdir.iterdir():
                if path.name == WORK_LOCK:
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
    workdir.mkdir(parents=True, exist_ok=True)
    write_json(workdir / WORK_META, meta)
    resume = None
    for path in _complete_checkpoints(workdir):
        if (path / CHECKPOINT_DONE).is_file():
            resume = path
        else:
            log.warning("deleting incomplete checkpoint %s", path)
            shutil.rmtree(path)
    return resume


# --------------------------------------------------------------------------- one-run CT


RESUME_DIR = "resume"  # in a one-run CT artifact: the Trainer state to continue the run from
RUN_FILE = "lrmerge-run.json"  # in it: where in the run the state is, and what it trained on


class RunStream(torch.utils.data.Dataset):
    """The one run's blocks in their fixed order (workflow/ladder.py): after target block j
    (counting from 1), replay blocks until floor(j * ratio) of them are placed.

    Positions are computed, not merged, so the order of a shorter run is a prefix of a longer
    one's: target block j sits at j + floor(j * ratio), replay block k after target block
    ceil((k + 1) / ratio). Replay items carry ``source`` 1, as in Interleaved.
    """

    def __init__(self, target: Any, replay: Any, ratio: Fraction) -> None:
        self.target, self.replay = target, replay
        n_target = len(target)
        n_replay = math.floor(n_target * ratio) if replay is not None else 0
        if replay is not None and len(replay) != n_replay:
            raise ValueError(f"{len(replay)} replay blocks next to {n_target} target blocks; "
                             f"the run's ratio {ratio} places {n_replay}")
        # Item i: target block order[i] when >= 0, else replay block -order[i] - 1.
        self.order = np.empty(n_target + n_replay, dtype=np.int64)
        j = np.arange(n_target, dtype=np.int64)
        self.order[j + j * ratio.numerator // ratio.denominator] = j
        if n_replay:
            k = np.arange(n_replay, dtype=np.int64)
            after = -((-(k + 1) * ratio.denominator) // ratio.numerator)  # ceil((k + 1) / ratio)
            self.order[after + k] = -k - 1

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = int(self.order[index])
        if item >= 0:
            return self.target[item]
        return {**self.replay[-item - 1], "source": 1}


def stream_sha256(tokens: np.ndarray, count: int) -> str:
    """sha256 of the first ``count`` token ids as little-endian uint32, whatever the array's
    own dtype: a lower checkpoint's record of what it trained on, checked on resume."""
    hasher = hashlib.sha256()
    chunk = 1 << 24
    for start in range(0, count, chunk):
        part = tokens[start : min(count, start + chunk)]
        hasher.update(np.ascontiguousarray(part, dtype="<u4").tobytes())
    return hasher.hexdigest()


@dataclass
class OneRun:
    """A one-run CT job: the run's schedule, the state this checkpoint records, and the lower
    checkpoint (artifact dir and its RUN_FILE) it continues from, if any."""

    schedule_steps: int
    state: dict[str, Any]
    lower: Path | None = None
    start: dict[str, Any] | None = None


def _link_tree(source: Path, dest: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy a checkpoint folder by hard links where the filesystem allows (gigabytes of
    optimizer state; nothing ever writes into a finished checkpoint), else by copying."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, dest, copy_function=link, ignore=shutil.ignore_patterns(*skip))


def seed_work_dir(workdir: Path, lower: Path, world: int) -> Path:
    """Put a lower checkpoint's resume state into ``workdir`` as the checkpoint to resume from.

    Its token counts are the run's totals; they go to rank 0 (the ranks' counts are summed).
    """
    state_dir = Path(lower) / RESUME_DIR
    run = read_json(state_dir / RUN_FILE)
    dest = workdir / f"checkpoint-{run['step']}"
    if dest.exists():  # a copy interrupted before its marker
        shutil.rmtree(dest)
    _link_tree(state_dir, dest, skip=(CHECKPOINT_DONE, RUN_FILE, "lrmerge-counts-*"))
    for rank in range(world):
        counts = run["token_counts"] if rank == 0 else [0, 0, 0]
        write_json(dest / f"lrmerge-counts-{rank}.json", {"token_counts": counts})
    (dest / CHECKPOINT_DONE).touch()
    log.info("continuing the run from %s (step %d, %d target tokens)", lower, run["step"],
             run["tokens"])
    return dest


def _run_identity(recipe: dict[str, Any]) -> dict[str, Any]:
    """A one-run CT recipe without what names its budget: the same for every checkpoint."""
    params = {k: v for k, v in recipe["params"].items() if k != "tokens"}
    return {**{k: v for k, v in recipe.items() if k not in ("data", "replay")}, "params": params}


def _check_lower(
    lower: Path, recipe: dict[str, Any], tokens: np.ndarray, replay: np.ndarray | None, world: int
) -> dict[str, Any]:
    """The lower checkpoint's run state, once it is shown to be an earlier point of this run:
    same recipe but for the budget, fewer tokens, and a prefix of this job's data."""
    if not (lower / RESUME_DIR / RUN_FILE).is_file():
        raise FileNotFoundError(f"--resume {lower} holds no one-run resume state "
                                f"({RESUME_DIR}/{RUN_FILE})")
    if _run_identity(read_json(lower / "recipe.json")["recipe"]) != _run_identity(recipe):
        raise ValueError(f"--resume {lower} is a checkpoint of another CT run (its recipe "
                         "differs in more than its budget)")
    run = read_json(lower / RESUME_DIR / RUN_FILE)
    if not run["tokens"] < tokens.size:
        raise ValueError(f"--resume {lower} is at {run['tokens']:,} target tokens, not below "
                         f"this budget of {tokens.size:,}")
    if stream_sha256(tokens, run["tokens"]) != run["target_sha256"]:
        raise ValueError(f"--resume {lower} trained on {run['tokens']:,} tokens that are not the "
                         "start of this job's --data: prepare's cut at a smaller budget must be "
                         "a prefix of a larger one")
    if run["replay_tokens"] and (
        replay is None or stream_sha256(replay, run["replay_tokens"]) != run["replay_sha256"]
    ):
        raise ValueError(f"--resume {lower} trained on {run['replay_tokens']:,} replay tokens "
                         "that are not the start of this job's --replay")
    if run["fsdp"] and run["world_size"] != world:
        raise ValueError(f"--resume {lower} holds FSDP state of {run['world_size']} processes; "
                         f"this job has {world}: run it on as many")
    return run


def _one_run_data(
    recipe: dict[str, Any],
    train: dict[str, Any],
    share: float | None,
    tokens: np.ndarray,
    eos: int,
    vocab: int,
    replay_dir: Path | None,
    lower: Path | None,
) -> tuple[Any, dict[str, Any], OneRun]:
    """The blocks of a one-run CT job up to its budget, in the run's order, and its OneRun."""
    params = recipe["params"]
    schedule = schedule_spec(params.get("schedule"), "params.schedule")
    if schedule is None:
        raise ValueError("ct params: 'schedule' is not a one_run schedule")
    budget = int(tokens.size)
    if params.get("tokens") != budget:
        raise ValueError(f"ct params: 'tokens' is {params.get('tokens')!r} but --data holds "
                         f"{budget:,} tokens")
    if train["epochs"] != 1:
        raise ValueError(f"'params.train.epochs': a one-run CT reads its stream once, so epochs "
                         f"must be 1, got {train['epochs']}")
    shape = RunShape.of(train, share)
    total = schedule_steps(schedule, shape)
    steps = check_budget(budget, shape, total, "params.tokens")
    world = _world()[1]
    target = PackedBlocks(tokens, train["seq_len"], eos)
    replay = replay_blocks = None
    wanted = shape.replay_tokens(budget)
    extra: dict[str, Any] = {"tokens_budget": budget, "epochs": 1, "schedule_steps": total}
    if share is not None and replay_dir is not None:
        if wanted:
            replay = replay_prefix(replay_dir, wanted, vocab, f"the one CT run at {budget:,} "
                                   f"target tokens has trained {wanted:,} replay tokens")
            replay_blocks = PackedBlocks(replay, train["seq_len"], eos)
        else:
            replay_blocks = []
        extra.update(replay_share=share, replay_tokens_budget=wanted)
    dataset = RunStream(target, replay_blocks, replay_ratio(share))
    if len(dataset) != steps * shape.blocks_per_step:  # ladder.py and the blocks disagree
        raise RuntimeError(f"{len(dataset)} blocks for {steps} steps of {shape.describe()}")
    state = {
        "tokens": budget,
        "step": steps,
        "target_sha256": stream_sha256(tokens, budget),
        "replay_tokens": wanted if share is not None else 0,
        "replay_sha256": stream_sha256(replay, wanted) if replay is not None else None,
        "world_size": world,
        "fsdp": bool(train["fsdp"]),
    }
    start = _check_lower(lower, recipe, tokens, replay, world) if lower is not None else None
    return dataset, extra, OneRun(total, state, lower, start)


def keep_resume_state(checkpoint: Path, dest: Path, state: dict[str, Any]) -> None:
    """Keep the run's final Trainer checkpoint in the artifact (``dest``), so a higher budget
    continues the run from here. The pickled TrainingArguments are left out: nothing reads
    them on resume."""
    _link_tree(checkpoint, dest, skip=("training_args.bin",))
    write_json(dest / RUN_FILE, state)


def _resolve_bf16(setting: Any, cuda: bool) -> bool:
    if setting == "auto":
        return cuda and torch.cuda.is_bf16_supported()
    if setting and cuda and not torch.cuda.is_bf16_supported():
        raise ValueError("train params: bf16 is true but this GPU does not support bfloat16")
    return bool(setting)


def apply_lora(model: Any, lora: dict[str, Any]) -> Any:
    try:
        from peft import LoraConfig, get_peft_model
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "train params: 'lora' needs the peft package: pip install peft"
        ) from error
    config = LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _target_rows(keep: torch.Tensor, head: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook of the LM head: the hidden states of the positions whose next token is
    a target (``keep``: batch × (width - 1)), as rows; a full-vocabulary logit for a prompt
    token is never used by an answer-only loss, and is most of a small model's step."""
    return (args[0][:, :-1][keep], *args[1:])


class LengthGroupedEpochs(torch.utils.data.Sampler):
    """transformers' length grouping (shuffle, sort within mega-batches of 50 micro-batches,
    longest first), drawn from a generator seeded by (seed, epoch) alone: a resumed run takes
    the same batches as one never stopped (the Trainer's own sampler draws from the global
    generator, whose state at an epoch's start a resume does not restore)."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int) -> None:
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Any:
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size,
                                               generator=generator))


def _trainer_classes() -> tuple[type, type]:
    """The Trainer subclass and checkpoint callback (imported late: transformers is slow)."""
    from transformers import Trainer, TrainerCallback

    class CountingTrainer(Trainer):
        """Counts the tokens of every micro-batch that reaches the optimizer: [target labels,
        replay labels, inputs]."""

        token_counts = (0, 0, 0)
        # One-run CT (workflow/ladder.py): blocks in stream order, and a learning-rate schedule
        # as long as the run, not as this job.
        sequential = False
        schedule_steps: int | None = None

        # SFT: micro-batches of similar lengths (less padding), in an order fixed per epoch.
        group_by_length = False

        def _get_train_sampler(self, train_dataset=None):  # noqa: ANN001, ANN202
            dataset = self.train_dataset if train_dataset is None else train_dataset
            if self.group_by_length:
                return LengthGroupedEpochs(
                    [len(dataset[i]["input_ids"]) for i in range(len(dataset))],
                    self.args.per_device_train_batch_size, self.args.seed,
                )
            if self.sequential:
                return torch.utils.data.SequentialSampler(dataset)
            return super()._get_train_sampler(train_dataset)

        def create_scheduler(self, num_training_steps, optimizer=None):  # noqa: ANN001, ANN202
            return super().create_scheduler(self.schedule_steps or num_training_steps, optimizer)

        # SFT: the LM head runs on the positions that have a target (the responses) only.
        target_logits_only = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001, ANN202
            if not self.target_logits_only:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            head = self.accelerator.unwrap_model(model).get_output_embeddings()
            targets = inputs["labels"][:, 1:]
            keep = targets != IGNORE
            hook = head.register_forward_pre_hook(partial(_target_rows, keep))
            try:
                # The model's own loss, over the kept rows (shift_labels: already shifted).
                return super().compute_loss(model, {**inputs, "shift_labels": targets[keep]},
                                            return_outputs, num_items_in_batch)
            finally:
                hook.remove()

        def training_step(self, model, inputs, num_items_in_batch=None):  # noqa: ANN001
            counts = inputs.pop("token_counts").tolist()
            self.token_counts = tuple(a + b for a, b in zip(self.token_counts, counts, strict=True))
            return super().training_step(model, inputs, num_items_in_batch)

    class CheckpointMarks(TrainerCallback):
        """After the Trainer saved a checkpoint: each rank's token counts, then a done marker."""

        def __init__(self) -> None:
            self.trainer: Any = None

        def on_save(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            _barrier()  # every rank has written its part of the checkpoint
            write_json(
                folder / f"lrmerge-counts-{args.process_index}.json",
                {"token_counts": list(self.trainer.token_counts)},
            )
            _barrier()
            if args.process_index == 0:
                (folder / CHECKPOINT_DONE).touch()
            return control

    return CountingTrainer, CheckpointMarks


def run_training(
    model: Any,
    dataset: Any,
    collator: CountingCollator,
    train: dict[str, Any],
    workdir: Path,
    meta: dict[str, Any],
    schedule_steps: int | None = None,
    seed_from: Path | None = None,
    target_logits_only: bool = False,
    group_by_length: bool = False,
) -> tuple[Any, Any, dict[str, Any]]:
    """Train ``model`` with the Trainer, resuming from ``workdir``'s checkpoints.

    With ``schedule_steps`` (one-run CT) the blocks are taken in order and the learning-rate
    schedule spans that many steps, of which this job runs its dataset's; without a checkpoint
    of its own the job starts from ``seed_from``, a lower checkpoint's resume state. With
    ``target_logits_only`` (SFT) the LM head computes logits only where the loss has a target;
    with ``group_by_length`` micro-batches hold examples of similar lengths.

    Returns the trained model (LoRA folded in), the Trainer (for a sharded state dict), and the
    metrics that go in metrics.json.
    """
    from transformers import TrainingArguments

    rank, world = _world()
    accum = train["grad_accum"] // world
    per_round = train["batch_size"] * world
    if world > 1:
        dataset = TopUp(dataset, math.ceil(len(dataset) / per_round) * per_round, collator.pad_id)
    collator.with_counts = True
    batches = math.ceil(len(dataset) / per_round)  # micro-batches per process and epoch
    steps = train["epochs"] * math.ceil(batches / accum)
    save_steps = train["save_steps"] or max(1, math.ceil(steps / 10))
    cuda = torch.cuda.is_available()
    if train["lora"] is not None:
        model = apply_lora(model, train["lora"])
    args = TrainingArguments(
        output_dir=str(workdir),
        per_device_train_batch_size=train["batch_size"],
        gradient_accumulation_steps=accum,
        num_train_epochs=train["epochs"],
        learning_rate=train["lr"],
        weight_decay=train["weight_decay"],
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": train["min_lr"]},
        # An explicit step count: a float would be read as a ratio only below 1.
        warmup_steps=math.ceil((schedule_steps or steps) * train["warmup_ratio"]),
        logging_steps=max(1, min(50, steps // 20)),
        logging_first_step=True,
        save_strategy="steps",
        save_steps=save_steps,
        # Two, so that a kill while writing the newest still leaves a complete one.
        save_total_limit=2,
        report_to="none",
        use_cpu=not cuda,
        bf16=_resolve_bf16(train["bf16"], cuda),
        activation_checkpointing=train["gradient_checkpointing"],
        activation_checkpointing_kwargs={"use_reentrant": False},
        ddp_backend=None if cuda or world == 1 else "gloo",
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        remove_unused_columns=False,
        seed=train["seed"],
        data_seed=train["seed"],
        disable_tqdm=rank != 0,
        **({"fsdp": train["fsdp"]} if train["fsdp"] else {}),
    )
    # Rank 0 tidies the work dir before the others look for a checkpoint in it.
    with args.main_process_first(local=False, desc="work dir"):
        resume = prepare_work_dir(workdir, meta) if args.process_index == 0 else None
        if args.process_index == 0 and resume is None and seed_from is not None:
            resume = seed_work_dir(workdir, seed_from, world)
        if args.process_index != 0:
            done = [p for p in _complete_checkpoints(workdir) if (p / CHECKPOINT_DONE).is_file()]
            resume = done[-1] if done else None
    trainer_cls, marks_cls = _trainer_classes()
    marks = marks_cls()
    trainer = trainer_cls(
        model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[marks]
    )
    marks.trainer = trainer
    if schedule_steps is not None:
        trainer.sequential, trainer.schedule_steps = True, schedule_steps
    # Needs a forward that passes loss kwargs (shift_labels) on to the model's loss function.
    trainer.target_logits_only = target_logits_only and trainer.model_accepts_loss_kwargs
    trainer.group_by_length = group_by_length
    resumed_step = 0
    resumed_tokens = resumed_inputs = 0  # over all processes; the checkpoint is rotated away later
    if resume is not None:
        trainer.token_counts = _checkpoint_counts(resume, args.process_index)
        resumed = [_checkpoint_counts(resume, r) for r in range(world)]
        resumed_tokens = sum(c[0] + c[1] for c in resumed)
        resumed_inputs = sum(c[2] for c in resumed)
        resumed_step = int(resume.name.removeprefix("checkpoint-"))
        log.info("resuming from %s (step %d of %d)", resume, resumed_step, steps)
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    wall = time.perf_counter() - start
    if trainer.state.global_step != steps:
        raise RuntimeError(f"Trainer ran {trainer.state.global_step} steps, expected {steps}")
    target, replay, inputs = (int(v) for v in _all_reduce([float(c) for c in trainer.token_counts]))
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0
    rss_mb, peak_gpu = _all_reduce([rss_mb, peak_gpu], op="max")
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    trained_now = target + replay - resumed_tokens
    metrics = {
        "steps": steps,
        "tokens_trained": target,
        "tokens_per_step": train["batch_size"] * train["grad_accum"] * train["seq_len"],
        "wall_s": round(wall, 3),
        # Tokens of this process's run only: a resumed job did not retrain the earlier ones.
        "tokens_per_s": round(trained_now / wall, 1) if wall > 0 else None,
        # Throughput in input tokens: for SFT (answer-only loss) far more than the label tokens.
        "input_tokens_per_s": round((inputs - resumed_inputs) / wall, 1) if wall > 0 else None,
        "final_loss": losses[-1] if losses else output.training_loss,
        "mean_loss": output.training_loss,
        "peak_rss_mb": round(rss_mb, 1),
        "world_size": world,
        "device": "cuda" if cuda else "cpu",
        "bf16": args.bf16,
        "resumed_from_step": resumed_step,
    }
    if replay:
        metrics["replay_tokens_trained"] = replay
    if cuda:
        metrics["peak_gpu_mb"] = round(peak_gpu, 1)
    if train["lora"] is not None:
        model = trainer.model.merge_and_unload()
    return model, trainer, metrics


def _finish(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    collator: CountingCollator,
    recipe: dict[str, Any],
    out: Path,
    save_dtype: torch.dtype,
    extra: dict[str, Any],
    allow_nonfinite: bool = False,
    run: OneRun | None = None,
    target_logits_only: bool = False,
    group_by_length: bool = False,
) -> None:
    train = train_params(recipe["params"])
    _check_seq_len(model, train["seq_len"])
    workdir = work_dir_for(out)
    world = _world()[1]
    meta = {"recipe": recipe, "world_size": world}
    model, trainer, metrics = run_training(
        model, dataset, collator, train, workdir, meta,
        schedule_steps=run.schedule_steps if run else None,
        seed_from=run.lower if run else None,
        target_logits_only=target_logits_only,
        group_by_length=group_by_length,
    )
    final = workdir / f"checkpoint-{trainer.state.global_step}"
    if run is not None:
        # The run so far against this job's own share of it: a ladder trains max(budgets).
        start = run.start["token_counts"] if run.start else [0, 0, 0]
        metrics["tokens_trained_this_job"] = metrics["tokens_trained"] - start[0]
        if "replay_share" in extra:
            replay_total = metrics.get("replay_tokens_trained", 0)
            metrics["replay_tokens_trained_this_job"] = replay_total - start[1]
        metrics["resumed_from_tokens"] = run.start["tokens"] if run.start else 0
        if not (final / CHECKPOINT_DONE).is_file():
            raise RuntimeError(f"the Trainer left no complete final checkpoint {final}")
    state_dict = None
    if trainer.is_fsdp_enabled:  # a collective: every rank takes part
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if trainer.args.process_index == 0:
        # Checked in the dtype written: a cast to float16 can overflow to Inf on its own.
        if state_dict is not None:
            state_dict = {k: v.to(save_dtype) for k, v in state_dict.items()}
            bad = nonfinite_tensors(state_dict)
        else:
            model = model.to(save_dtype)
            bad = nonfinite_tensors(model.state_dict())
        if bad and not allow_nonfinite:
            raise NonFiniteWeights(
                f"trained weights of {out} hold NaN or Inf in {len(bad)} tensor(s), first "
                f"{bad[0]!r}; nothing was written and the checkpoints stay in {workdir}: lower "
                "lr, or pass --allow-nonfinite (config integrity.allow_nonfinite) to write them"
            )
        if bad:
            log.warning("writing %d tensor(s) with NaN or Inf (--allow-nonfinite)", len(bad))
            metrics["nonfinite_tensors"] = len(bad)
        with atomic_dir(out) as tmp:
            if state_dict is not None:
                trainer.accelerator.unwrap_model(trainer.model).save_pretrained(
                    tmp, state_dict=state_dict
                )
            else:
                model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_json(tmp / "metrics.json", {**extra, **metrics})
            if run is not None:
                ranks = [_checkpoint_counts(final, rank) for rank in range(world)]
                counts = [sum(column) for column in zip(*ranks, strict=True)]
                keep_resume_state(final, tmp / RESUME_DIR, {**run.state, "token_counts": counts})
            write_recipe(tmp, recipe)
        # Only now is the state safe to drop: the artifact is in place.
        shutil.rmtree(workdir, ignore_errors=True)
        log.info("wrote %s: %s", out, metrics)
    _barrier()


def _load_model(model_dir: Path) -> tuple[Any, Any, torch.dtype]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"model directory {model_dir} has no config.json")
    stored = getattr(AutoConfig.from_pretrained(model_dir, trust_remote_code=False), "dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored)
    # Models enter the workflow as safetensors: a pickle is never loaded.
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, trust_remote_code=False, use_safetensors=True
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    return model, tokenizer, stored if isinstance(stored, torch.dtype) else torch.float32


def pretrain(
    recipe: dict[str, Any],
    tokenizer_dir: Path,
    data_dirs: list[Path],
    out: Path,
    allow_nonfinite: bool = False,
) -> None:
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
    _finish(model, tokenizer, dataset, collator, recipe, out, torch.float32, extra, allow_nonfinite)


def continual(
    recipe: dict[str, Any],
    model_dir: Path,
    data_dir: Path,
    out: Path,
    replay_dir: Path | None = None,
    allow_nonfinite: bool = False,
    resume_dir: Path | None = None,
) -> None:
    """CT of ``model_dir`` on ``data_dir``: an independent run over its budget, or with
    params.schedule (one_run) the run's checkpoint at that budget, continued from the lower
    checkpoint ``resume_dir`` when given (workflow/ladder.py)."""
    params = recipe["params"]
    train = train_params(params)
    share = replay_params(params)
    if (share is None) != (replay_dir is None):
        raise ValueError(
            "ct: params.replay and --replay go together: "
            f"replay share {share!r}, --replay {replay_dir!s}"
        )
    one_run = schedule_spec(params.get("schedule"), "params.schedule") is not None
    if resume_dir is not None and not one_run:
        raise ValueError(f"ct: --resume {resume_dir} continues a one-run schedule, and this "
                         "recipe has none (params.schedule)")
    model, tokenizer, stored = _load_model(model_dir)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer of {model_dir} has no eos token to separate documents")
    vocab = model.get_input_embeddings().num_embeddings
    tokens = load_tokens(data_dir)
    check_vocab(tokens, vocab, str(data_dir))
    if one_run:
        dataset, extra, run = _one_run_data(
            recipe, train, share, tokens, tokenizer.eos_token_id, vocab, replay_dir, resume_dir
        )
        collator = CountingCollator(_pad_id(tokenizer))
        _finish(model, tokenizer, dataset, collator, recipe, out, stored, extra,
                allow_nonfinite, run=run)
        return
    dataset: Any = PackedBlocks(tokens, train["seq_len"], tokenizer.eos_token_id)
    extra: dict[str, Any] = {"tokens_budget": int(tokens.size), "epochs": train["epochs"]}
    if share is not None and replay_dir is not None:
        wanted = replay_tokens_for(int(tokens.size), share)
        replay = replay_prefix(replay_dir, wanted, vocab, f"a replay share of {share} next to "
                               f"{tokens.size:,} target tokens needs {wanted:,}")
        if wanted:
            blocks = PackedBlocks(replay, train["seq_len"], tokenizer.eos_token_id)
            dataset = Interleaved(dataset, blocks)
        extra.update(replay_share=share, replay_tokens_budget=wanted)
    collator = CountingCollator(_pad_id(tokenizer))
    _finish(model, tokenizer, dataset, collator, recipe, out, stored, extra, allow_nonfinite)


def sft_params(recipe: dict[str, Any], dataset: Path | None) -> dict[str, Any]:
    """The SFT recipe's settings, checked before anything is loaded, and the data spec of
    workflow.instructions: the local file (--dataset, checked against the recipe's sha256) or
    the hub dataset the recipe names."""
    params = recipe["params"]
    examples = params.get("examples")
    if not isinstance(examples, int) or isinstance(examples, bool) or examples < 1:
        raise ValueError(f"sft params: 'examples' must be an integer >= 1, got {examples!r}")
    if params.get("select") not in ("first", "sample"):
        raise ValueError(
            f"sft params: 'select' must be first or sample, got {params.get('select')!r}"
        )
    if params.get("chat_template") not in ("auto", True, False):
        raise ValueError(
            "sft params: 'chat_template' must be auto, true or false, got "
            f"{params.get('chat_template')!r}"
        )
    if not isinstance(params.get("group_by_length"), bool):
        raise ValueError(
            "sft params: 'group_by_length' must be true or false, got "
            f"{params.get('group_by_length')!r}"
        )
    spec = validate_fragment("instruction_data", params.get("data", {}), "params.data")
    ref = recipe.get("dataset")
    if isinstance(ref, dict) and set(ref) == set(HUB_KEYS):
        if dataset is not None:
            raise ValueError(f"sft: the recipe names hub dataset {ref['hub']}; drop --dataset")
        return {**spec, **ref}
    if not (isinstance(ref, dict) and set(ref) == {"sha256"}):
        raise ValueError(
            "sft recipe: 'dataset' must be {sha256} (a local file, given as --dataset) or "
            f"{{{', '.join(HUB_KEYS)}}} (a hub dataset), got {ref!r}"
        )
    if dataset is None:
        raise ValueError("sft: the recipe names a local dataset file; pass it as --dataset PATH")
    if not dataset.is_file():
        raise FileNotFoundError(f"sft: --dataset {dataset}: file not found")
    if sha256_file(dataset) != ref["sha256"]:
        raise ValueError(
            f"sft: --dataset {dataset} does not have the sha256 the recipe names "
            f"({ref['sha256']}): the file changed after the workflow was planned"
        )
    return {**spec, "path": str(dataset)}


def sft(
    recipe: dict[str, Any],
    model_dir: Path,
    dataset: Path | None,
    out: Path,
    allow_nonfinite: bool = False,
) -> None:
    """Fine-tune on an instruction dataset (workflow/instructions.py), the loss on the
    responses only."""
    params = recipe["params"]
    train = train_params(params)
    spec = sft_params(recipe, dataset)
    # Malformed records fail here, before the model is loaded.
    conversations, available = load_conversations(
        spec, dataset, params["examples"], params["select"], train["seed"]
    )
    if len(conversations) < params["examples"]:
        log.warning(
            "asked for %d SFT examples, the data holds %d", params["examples"], len(conversations)
        )
    model, tokenizer, stored = _load_model(model_dir)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer of {model_dir} has no eos token to end answers with")
    templated = use_chat_template(tokenizer, params["chat_template"], str(model_dir))
    encoder = Encoder(tokenizer, train["seq_len"], templated, spec["separator"])
    examples = [encoder.encode(messages, f"example {i + 1}") for i, messages in
                enumerate(conversations)]
    kept = [example for example in examples if example is not None]
    if not kept:
        raise ValueError(
            f"sft: none of {len(examples)} examples keeps a response token within seq_len "
            f"{train['seq_len']}: raise seq_len"
        )
    if len(kept) < len(examples):
        log.warning("dropped %d of %d SFT examples: no response token fits in seq_len %d",
                    len(examples) - len(kept), len(examples), train["seq_len"])
    collator = CountingCollator(_pad_id(tokenizer))
    extra = {
        "tokens_budget": count_targets(kept),
        "epochs": train["epochs"],
        "examples": len(kept),
        "examples_dropped": len(examples) - len(kept),
        "records_read": available,
        "chat_template": templated,
    }
    _finish(model, tokenizer, kept, collator, recipe, out, stored, extra, allow_nonfinite,
            target_logits_only=True, group_by_length=params["group_by_length"])


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
    ct.add_argument("--replay", type=Path, default=None, help="English replay token dir")
    ct.add_argument("--resume", type=Path, default=None,
                    help="one-run CT: the lower budget's checkpoint to continue the run from")
    tune = sub.add_parser("sft", help="supervised fine-tuning on an instruction dataset")
    tune.add_argument("--model", type=Path, required=True)
    tune.add_argument(
        "--dataset", type=Path, default=None, help="the local instruction file the recipe names"
    )
    for command in (pre, ct, tune):
        command.add_argument("--recipe", type=parse_recipe_arg, required=True)
        command.add_argument("--out", type=Path, required=True)
        command.add_argument("--threads", type=int, default=None, help="torch CPU threads")
        command.add_argument(
            "--allow-nonfinite",
            action="store_true",
            help="write the model even if training left NaN or Inf in its weights",
        )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    lifeline.arm()  # under workflow.launch: die with the job, never run on as an orphan
    if args.threads is not None:
        # The job's threads are shared by the processes of a multi-process launch.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, args.threads // local))
    held = None
    allow = args.allow_nonfinite
    try:
        if _world()[0] == 0:
            held = claim_work_dir(args.out)
        if args.command == "pretrain":
            pretrain(args.recipe, args.tokenizer, args.data, args.out, allow)
        elif args.command == "ct":
            continual(args.recipe, args.model, args.data, args.out, args.replay, allow,
                      args.resume)
        else:
            sft(args.recipe, args.model, args.dataset, args.out, allow)
    except (
        ValueError,
        FileNotFoundError,
        FileExistsError,
        ModuleNotFoundError,
        lifeline.LockHeld,
    ) as error:
        sys.exit(f"error: {error}")
    finally:
        if held is not None:
            release_work_dir(args.out, held)


if __name__ == "__main__":
    main()
