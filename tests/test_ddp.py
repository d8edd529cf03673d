"""The multi-process launch path on CPU: workflow.launch -> torchrun -> 2 gloo DDP processes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_resume import PROJECT, env, tiny_model, token_dir
from transformers import AutoModelForCausalLM

from workflow import launch
from workflow.artifacts import read_json

TRAIN = {
    "lr": 3e-3,
    "min_lr": 1e-4,
    "batch_size": 4,
    "grad_accum": 2,  # one micro-batch per process and step
    "seq_len": 32,
    "epochs": 2,
    "seed": 0,
}


def test_two_cpu_processes_train_the_exact_budget(tmp_path):
    model = tiny_model(tmp_path)
    # 997 targets -> 33 blocks; 2 processes x 4 need 40: 7 empty blocks top it up, no repeats.
    data = token_dir(tmp_path, "tokens", 997, seed=2)
    replay = token_dir(tmp_path, "replay", 400, seed=3)
    recipe = {
        "stage": "ct",
        "version": "1",
        "params": {"train": TRAIN, "replay": {"share": 0.2}},
    }
    out = tmp_path / "ct"
    command = [
        sys.executable, "-m", "workflow.launch", "--gpus", "0", "--nproc", "2", "--threads", "2",
        "--", "workflow.train", "ct", "--recipe", json.dumps(recipe), "--model", str(model),
        "--data", str(data), "--replay", str(replay), "--out", str(out), "--threads", "2",
    ]  # fmt: skip
    run = subprocess.run(command, env=env(), cwd=PROJECT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "torch.distributed.run" in run.stderr
    metrics = read_json(out / "metrics.json")
    assert metrics["world_size"] == 2
    assert metrics["tokens_budget"] == 997
    assert metrics["tokens_trained"] == 2 * 997  # exact, summed over both processes
    # 4:1 target to replay: round(997 * 0.2 / 0.8) = 249 replay tokens, recorded apart.
    assert metrics["replay_tokens_budget"] == 249
    assert metrics["replay_tokens_trained"] == 2 * 249
    # 33 + 9 = 42 blocks -> 48 with top-up -> 6 steps of 2 x 4 sequences per epoch.
    assert metrics["steps"] == 2 * 6
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
    assert loaded.num_parameters() > 0
    assert not (tmp_path / ".ct.work").exists()


def test_launch_commands():
    with pytest.raises(ValueError, match="--nproc"):
        launch.build_command("workflow.train", [], 0)
    assert launch.build_command("workflow.train", ["ct"], 1)[1:] == [
        "-m", "workflow.lifeline", "workflow.train", "ct"]
    command = launch.build_command("workflow.train", ["ct"], 3)
    assert "--nproc_per_node=3" in command and command[-2:] == ["workflow.train", "ct"]
    # Across nodes: srun starts one torchrun per node, joined on the job's first host.
    job = launch.SlurmJob("77", ("n1", "n2", "n3"), tasks=3, cpus_per_task=8, port=29999)
    command = launch.build_command("workflow.train", ["ct"], 4, nodes=3, slurm=job)
    assert command[:command.index(sys.executable)] == [
        "srun", "--nodes", "3", "--ntasks", "3", "--ntasks-per-node", "1",
        "--kill-on-bad-exit=1", "--cpus-per-task", "8"]
    torchrun = command[command.index(sys.executable):]
    assert torchrun[1:] == [
        "-m", "torch.distributed.run", "--nnodes", "3", "--nproc-per-node", "4",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "n1:29999", "--rdzv-id", "77",
        "-m", "workflow.train", "ct"]
    # Fewer nodes than agents (the test cluster's one node): the agents share it.
    one = launch.SlurmJob("78", ("n1",), tasks=2)
    command = launch.build_command("workflow.train", ["ct"], 1, nodes=2, slurm=one)
    assert command[:7] == ["srun", "--nodes", "1", "--ntasks", "2", "--ntasks-per-node", "2"]
    with pytest.raises(ValueError, match="needs 3 SLURM tasks, job 78 has 2"):
        launch.build_command("workflow.train", ["ct"], 1, nodes=3, slurm=one)
    with pytest.raises(ValueError, match="--nodes"):
        launch.build_command("workflow.train", ["ct"], 1, nodes=0)


def test_nodes_outside_slurm_fail_before_anything(tmp_path):
    """No SLURM job: --nodes 2 stops the launcher before it reads an input or starts Python
    for the stage (the input named here does not exist, and is not what the error is about)."""
    environment = {k: v for k, v in env().items() if not k.startswith("SLURM_")}
    run = subprocess.run(
        [sys.executable, "-m", "workflow.launch", "--gpus", "0", "--nodes", "2", "--verify",
         str(tmp_path / "missing"), "--", "workflow.train", "ct", "--out", str(tmp_path / "o")],
        env=environment, cwd=PROJECT, capture_output=True, text=True)
    assert run.returncode != 0
    assert "--nodes 2 (resources.<stage>.nodes)" in run.stderr and "needs a SLURM job" in run.stderr
    assert "missing" not in run.stderr and not (tmp_path / "o").exists()
