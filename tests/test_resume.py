"""Resumable training: a CT job killed with kill -9 and rerun equals an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from workflow import lifeline, models, train
from workflow.artifacts import read_json, sha256_file

PROJECT = Path(__file__).resolve().parent.parent
SEQ_LEN = 64
ARCH = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_layers": 2,
    "num_heads": 4,
    "max_position_embeddings": 64,
}
TRAIN = {
    "lr": 3e-3,
    "min_lr": 1e-4,
    "warmup_ratio": 0.1,
    "batch_size": 4,
    "seq_len": SEQ_LEN,
    "epochs": 3,
    "seed": 3,
    "save_steps": 8,
}


def tiny_model(root: Path) -> Path:
    """A seeded, untrained scratch Llama with a small BPE tokenizer, saved as a model dir."""
    texts = [f"cell {i} sheet formula {i * 7} row column page style" for i in range(200)]
    tokenizer = models.train_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(models.scratch_config(ARCH, tokenizer))
    out = root / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def token_dir(root: Path, name: str, size: int, seed: int, vocab: int = 300) -> Path:
    directory = root / name
    directory.mkdir()
    rng = np.random.default_rng(seed)
    np.save(directory / "tokens.npy", rng.integers(3, vocab, size=size, dtype=np.int32))
    return directory


def ct_command(recipe: dict, model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "workflow.train",
        "ct",
        "--recipe",
        json.dumps(recipe),
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--threads",
        "1",
        *extra,
    ]


def env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(PROJECT),
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def kill_after(command: list[str], marker: Path, out: Path) -> None:
    """Run a training job and kill -9 it as soon as ``marker`` (a complete checkpoint) exists,
    before it could finish ``out``."""
    proc = subprocess.Popen(command, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the run finished before the kill: make it longer"
    assert marker.exists()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("resume")
    model = tiny_model(root)
    # 8000 targets -> 127 blocks -> 32 micro-batches of 4 -> 32 steps an epoch, 96 in all: long
    # enough (a few seconds) to be killed from outside mid-run.
    data = token_dir(root, "tokens", 8000, seed=1)
    recipe = {"stage": "ct", "version": "1", "params": {"train": TRAIN}}
    return {"root": root, "model": model, "data": data, "recipe": recipe}


def test_killed_and_resumed_run_equals_uninterrupted_run(setup):
    root, recipe = setup["root"], setup["recipe"]
    whole = root / "whole"
    subprocess.run(
        ct_command(recipe, setup["model"], setup["data"], whole), env=env(), check=True
    )

    out = root / "resumed"
    work = train.work_dir_for(out)
    # Kill once a checkpoint of the second epoch is complete: the rerun must then restore the
    # epoch position, the skipped batches, the schedule and the token count.
    wanted = work / "checkpoint-40" / train.CHECKPOINT_DONE
    kill_after(ct_command(recipe, setup["model"], setup["data"], out), wanted, out)

    rerun = subprocess.run(
        ct_command(recipe, setup["model"], setup["data"], out),
        env=env(),
        capture_output=True,
        text=True,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from" in rerun.stderr
    metrics = read_json(out / "metrics.json")
    assert metrics["resumed_from_step"] >= 40
    assert metrics["tokens_trained"] == 3 * 8000 == read_json(whole / "metrics.json")[
        "tokens_trained"
    ]
    assert metrics["steps"] == 96
    # The work dir is gone once the artifact is in place.
    assert not work.exists() and not train.work_dir_for(whole).exists()

    a, b = weights(whole), weights(out)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # Training moved the weights at all (so equality is not trivial).
    before = LlamaForCausalLM.from_pretrained(setup["model"]).state_dict()
    assert not torch.equal(before["model.embed_tokens.weight"], a["model.embed_tokens.weight"])


def test_incomplete_checkpoint_is_dropped_and_foreign_work_dir_wiped(tmp_path):
    work = tmp_path / ".x.work"
    meta = {"recipe": {"stage": "ct"}, "world_size": 1}
    assert train.prepare_work_dir(work, meta) is None
    done = work / "checkpoint-4"
    done.mkdir()
    (done / train.CHECKPOINT_DONE).touch()
    (work / "checkpoint-8").mkdir()  # killed while saving: no marker
    assert train.prepare_work_dir(work, meta) == done
    assert not (work / "checkpoint-8").exists()
    # Another recipe (or process count) cannot reuse the state; the lock this process holds
    # survives the wipe (a new file of its name would let a second trainer in).
    fd = lifeline.hold_lock(work / train.WORK_LOCK, f"work dir {work}")
    inode = (work / train.WORK_LOCK).stat().st_ino
    try:
        assert train.prepare_work_dir(work, {**meta, "world_size": 2}) is None
        assert not done.exists() and not (work / "checkpoint-4").exists()
        assert (work / train.WORK_LOCK).stat().st_ino == inode
        with pytest.raises(lifeline.LockHeld, match=f"pid {os.getpid()}"):
            lifeline.hold_lock(work / train.WORK_LOCK, f"work dir {work}")
    finally:
        os.close(fd)


def test_killed_and_resumed_sft_equals_uninterrupted(setup):
    """SFT draws length-grouped batches: a run killed mid-epoch and rerun takes the same
    batches (the order is a function of seed and epoch) and ends with the same weights."""
    root = setup["root"]
    rng = np.random.default_rng(5)
    words = "cell sheet formula row column page style".split()
    records = [
        {"prompt": " ".join(rng.choice(words, size=int(rng.integers(2, 40)))) + "\nTopic:",
         "response": " " + str(rng.choice(words))}
        for _ in range(200)
    ]
    data = root / "instructions.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    recipe = {
        "stage": "sft", "version": train.STAGE_VERSIONS["sft"],
        "params": {"examples": 200, "select": "first", "chat_template": "auto",
                   "group_by_length": True, "data": {},
                   "train": {**TRAIN, "save_steps": 10}},
        "dataset": {"sha256": sha256_file(data)},
    }

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "workflow.train", "sft", "--recipe", json.dumps(recipe),
                "--model", str(setup["model"]), "--dataset", str(data), "--out", str(out),
                "--threads", "1"]

    whole = root / "sft-whole"
    subprocess.run(command(whole), env=env(), check=True, capture_output=True)
    out = root / "sft-resumed"
    # 200 examples in micro-batches of 4: 50 steps an epoch. Step 60 is inside the second.
    kill_after(command(out), train.work_dir_for(out) / "checkpoint-60" / train.CHECKPOINT_DONE,
               out)
    rerun = subprocess.run(command(out), env=env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert read_json(out / "metrics.json")["resumed_from_step"] >= 60
    assert read_json(out / "metrics.json")["tokens_trained"] == read_json(
        whole / "metrics.json")["tokens_trained"]
    a, b = weights(whole), weights(out)
    for name in a:
        assert torch.equal(a[name], b[name]), name
