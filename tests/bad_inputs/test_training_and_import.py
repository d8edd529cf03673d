"""Training and import under bad conditions: a killed job's trainer, two trainers on one work
dir, diverging weights, file modes of a trained model, a pickle-only model directory, and the
one validation contract of training settings.

Everything runs for real: trainers are separate processes started as Snakemake starts them
(`bash -c "set -euo pipefail; python -m workflow.launch ... > log 2>&1"`) and killed with
kill -9; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_resume import PROJECT, ct_command, env, tiny_model, token_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from workflow import lifeline, models, train
from workflow.artifacts import read_json
from workflow.config import load_schema

LONG = {  # ~500 optimizer steps on 8000 tokens: runs far longer than any check below waits
    "lr": 3e-3,
    "min_lr": 1e-4,
    "batch_size": 4,
    "grad_accum": 2,  # a multiple of the process count, 1 or 2
    "seq_len": 64,
    "epochs": 30,
}
SHORT = {"lr": 3e-3, "min_lr": 1e-4, "batch_size": 4, "seq_len": 64}
# A stand-in for Snakemake: starts the job's shell and waits for it, as the local executor does.
SNAKEMAKE = "import subprocess, sys; subprocess.Popen(['bash', '-c', sys.argv[1]]).wait()"


def ct_recipe(train_params: dict) -> dict:
    return {"stage": "ct", "version": "1", "params": {"train": train_params}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny")
    return {
        "root": root,
        "model": tiny_model(root),
        "long": token_dir(root, "long", 8000, seed=1),
        "short": token_dir(root, "short", 600, seed=2),
    }


def job_pids(marker: str) -> list[int]:
    """Live processes (zombies have ended) whose command line mentions ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if marker in cmdline and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def wait_for(path: Path, proc: subprocess.Popen, log: Path | None = None, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
        assert proc.poll() is None, f"the job ended before {path} appeared\n{tail}"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.05)


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize(
    ("victim", "nproc"), [("snakemake", 1), ("shell", 1), ("snakemake", 2)]
)
def test_trainer_dies_with_its_job(tiny, tmp_path, victim, nproc):
    out = tmp_path / "ct"
    stage = ct_command(ct_recipe(LONG), tiny["model"], tiny["long"], out)[2:]  # workflow.train ...
    launch = [
        sys.executable, "-m", "workflow.launch", "--gpus", "0", "--nproc", str(nproc),
        "--threads", str(nproc), "--", *stage,
    ]  # fmt: skip
    job = f"set -euo pipefail; {shlex.join(launch)} > {shlex.quote(str(tmp_path / 'log'))} 2>&1"
    snakemake = subprocess.Popen([sys.executable, "-c", SNAKEMAKE, job], env=env(), cwd=PROJECT)
    marker = str(out)
    try:
        # work.json is written once the trainer is set up and about to train.
        wait_for(train.work_dir_for(out) / train.WORK_META, snakemake, tmp_path / "log")
        before = job_pids(marker)
        assert len(before) >= 2 + nproc  # Snakemake, its shell, the trainer (torchrun + workers)
        if victim == "snakemake":
            os.kill(snakemake.pid, signal.SIGKILL)
        else:
            shell = [p for p in before if Path(f"/proc/{p}/comm").read_text().strip() == "bash"]
            assert len(shell) == 1
            os.kill(shell[0], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while (left := job_pids(marker)) and time.monotonic() < deadline:
            time.sleep(0.1)
        log = (tmp_path / "log").read_text()
        assert not left, f"still running after the job was killed: {left}\n{log[-3000:]}"
    finally:
        kill_all(job_pids(marker))
        snakemake.kill()
        snakemake.wait()
    assert not out.exists()
    # Whatever was finished is kept: the work dir holds the run's state for a rerun to resume.
    assert (train.work_dir_for(out) / train.WORK_META).is_file()


def test_second_trainer_on_the_same_work_dir_fails_at_once(tiny, tmp_path):
    out = tmp_path / "ct"
    work = train.work_dir_for(out)
    command = ct_command(ct_recipe(LONG), tiny["model"], tiny["long"], out)
    first = subprocess.Popen(command, env=env(), cwd=PROJECT, stderr=subprocess.DEVNULL)
    try:
        wait_for(work / train.WORK_META, first)
        meta = (work / train.WORK_META).read_bytes()
        # The second comes through the launcher with two processes: its rank 0 meets the lock,
        # and torchrun ends its other rank.
        launch = [
            sys.executable, "-m", "workflow.launch", "--gpus", "0", "--nproc", "2", "--",
            *command[2:],
        ]  # fmt: skip
        second = subprocess.run(
            launch, env=env(), cwd=PROJECT, capture_output=True, text=True, timeout=300
        )
        assert second.returncode != 0
        message = f"work dir {work} is in use by another process (pid {first.pid}"
        assert message in second.stderr, second.stderr[-3000:]
        assert "resuming from" not in second.stderr and "starting afresh" not in second.stderr
        assert first.poll() is None, "the first trainer must run on undisturbed"
        assert (work / train.WORK_META).read_bytes() == meta
        assert not out.exists()
    finally:
        first.kill()
        first.wait()
    # The kernel drops the lock of a killed holder: a rerun can take over (and resume).
    fd = lifeline.hold_lock(work / train.WORK_LOCK, f"work dir {work}")
    os.close(fd)


def test_diverged_weights_are_an_error_unless_allowed(tiny, tmp_path):
    out = tmp_path / "ct"
    diverging = ct_recipe({**SHORT, "lr": 1e30, "warmup_ratio": 0.0})
    args = [
        "ct", "--recipe", json.dumps(diverging), "--model", str(tiny["model"]),
        "--data", str(tiny["short"]), "--out", str(out), "--threads", "1",
    ]  # fmt: skip
    with pytest.raises(SystemExit, match=r"NaN or Inf .*--allow-nonfinite") as error:
        train.main(args)
    assert str(out) in str(error.value)
    assert not out.exists() and not list(tmp_path.glob(".ct.tmp-*"))
    work = train.work_dir_for(out)
    assert any(p.name.startswith("checkpoint-") for p in work.iterdir())  # nothing lost
    # The explicit opt-out writes them, from the finished run's last checkpoint.
    train.main([*args, "--allow-nonfinite"])
    metrics = read_json(out / "metrics.json")
    assert metrics["nonfinite_tensors"] > 0
    assert metrics["resumed_from_step"] == metrics["steps"]
    weights = load_file(out / "model.safetensors")
    assert not all(torch.isfinite(t).all() for t in weights.values())


def test_trained_model_files_are_world_readable(tiny, tmp_path):
    out = tmp_path / "ct"
    command = ct_command(ct_recipe(SHORT), tiny["model"], tiny["short"], out)
    run = subprocess.run(
        command,
        env=env(),
        cwd=PROJECT,
        capture_output=True,
        text=True,
        preexec_fn=lambda: os.umask(0o022),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert set(modes.values()) == {0o644}, modes


def test_pickle_only_model_dir_is_refused(tiny, tmp_path):
    source = tmp_path / "pickled"
    model = AutoModelForCausalLM.from_pretrained(tiny["model"])
    model.config.save_pretrained(source)
    AutoTokenizer.from_pretrained(tiny["model"]).save_pretrained(source)
    # What save_pretrained(safe_serialization=False) wrote before transformers 5.
    torch.save(model.state_dict(), source / "pytorch_model.bin")
    # The directory is a real, loadable model: transformers alone would unpickle it.
    assert AutoModelForCausalLM.from_pretrained(source).num_parameters() == model.num_parameters()

    out = tmp_path / "imported"
    recipe = {"stage": "import_hf", "version": "1", "params": {"id": str(source)}}
    with pytest.raises(SystemExit) as error:
        models.main(["hf", "--recipe", json.dumps(recipe), "--out", str(out)])
    message = str(error.value)
    assert f"model directory {source} holds only pickled weights (pytorch_model.bin)" in message
    assert "save_pretrained(NEW_DIR, safe_serialization=True)" in message
    assert not out.exists()
    # A hub id goes straight to the loader, which takes safetensors only: the same directory
    # through it fails instead of being unpickled.
    with pytest.raises(FileNotFoundError, match="could not be loaded from safetensors.*no file"):
        models.load_hf(str(source), None, torch.float32)


def test_training_defaults_are_the_schemas():
    schema = load_schema()["$defs"]
    fragment = schema["train"]["properties"]
    defaults = {key: spec["default"] for key, spec in fragment.items()}
    assert train.train_params({"train": {}}) == defaults
    lora_spec = next(s for s in fragment["lora"]["oneOf"] if s.get("type") == "object")
    lora_defaults = {key: spec["default"] for key, spec in lora_spec["properties"].items()}
    assert set(lora_defaults) == {"r", "alpha", "dropout", "target_modules"}
    assert train.train_params({"train": {"lora": {}}})["lora"] == lora_defaults
    # The trainer rejects what the schema rejects, naming the recipe key.
    with pytest.raises(ValueError, match="'params.train.lora.dropout'"):
        train.train_params({"train": {"lora": {"dropout": 1}}})
    with pytest.raises(ValueError, match="'params.train.min_lr'"):
        train.train_params({"train": {"lr": 1e-5, "min_lr": 1e-4}})
    hub = schema["hub_model"]["properties"]
    filled = models.hf_params({"id": "org/model", "content_sha256": "ab"})
    assert filled == {
        "id": "org/model",
        "content_sha256": "ab",
        **{key: spec["default"] for key, spec in hub.items() if "default" in spec},
    }
    with pytest.raises(ValueError, match="'params.dtype'"):
        models.hf_params({"id": "org/model", "dtype": "float64"})
