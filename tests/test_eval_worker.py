"""Evaluation jobs through workflow.launch run in a warm worker (workflow/eval_worker/):
real launcher processes, real workers, the tiny model of workflow.evaluate_benchmark."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from workflow_utils import eval_worker_pids, snakemake

from workflow import eval_worker, evaluate, evaluate_benchmark, launch, lifeline

REPO = Path(__file__).resolve().parents[1]
WORKER_PID = re.compile(r"job runs in worker pid (\d+)")
OWNER_SHIM = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


def job_command(fixture: dict, job: int, out: Path, model: Path | None = None,
                suite: tuple[Path, str] | None = None) -> list[str]:
    suite = suite or (fixture["suite"], fixture["suite_digest"])
    recipe = evaluate_benchmark.job_recipe(fixture["model_digest"], suite[1], job)
    return [sys.executable, "-m", "workflow.launch", "--gpus", "0", "--threads", "1", "--",
            "workflow.evaluate", "--recipe", json.dumps(recipe),
            "--model", str(model or fixture["model"]),
            "--suite", f"eu={suite[0]}", "--out", str(out), "--threads", "1"]


def job_env(mode: str = "", **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), launch.MODE_ENV: mode,
           eval_worker.IDLE_ENV: "120", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop(lifeline.SWITCH_ENV, None)
    env.pop(eval_worker.TAG_ENV, None)
    env.update(extra)
    return env


def run_job(cwd: Path, command: list[str], env: dict[str, str],
            owner_shim: bool = False) -> subprocess.CompletedProcess:
    """One job, its owner this test process (or a shim process that ends with the job)."""
    if owner_shim:
        command = [sys.executable, "-c", OWNER_SHIM, *command]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def worker_pid(proc: subprocess.CompletedProcess) -> int:
    """The worker that ran the job (the last one the client named)."""
    found = WORKER_PID.findall(proc.stderr)
    assert found, f"the job did not run in a worker:\n{proc.stderr[-3000:]}"
    return int(found[-1])


def scores(path: Path) -> tuple:
    score = json.loads(path.read_text())
    return score["results"], score["items"], score["n_samples"]


def wait_gone(pid: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while (who := lifeline.ident(pid)) is not None and lifeline.alive(who):
        assert time.monotonic() < deadline, f"worker {pid} still runs after {timeout} s"
        time.sleep(0.1)


def test_offline_tasks_agree_with_evaluate():
    assert set(eval_worker.OFFLINE_TASKS) == set(evaluate.OFFLINE_TASKS)


def test_jobs_share_one_worker_and_score_as_fresh_processes(eval_workers, tiny_eval_model):
    cwd = eval_workers
    for _attempt in range(3):
        pids, stderr = [], ""
        for job in range(2):
            proc = run_job(cwd, job_command(tiny_eval_model, job, cwd / f"w{job}.json"),
                           job_env())
            assert proc.returncode == 0, proc.stderr[-3000:]
            pids.append(worker_pid(proc))
            stderr += proc.stderr
            assert "wrote 5 scores" in proc.stderr  # the job's own log lines reach its stderr
            fresh = run_job(cwd, job_command(tiny_eval_model, job, cwd / f"e{job}.json"),
                            job_env("exec"))
            assert fresh.returncode == 0, fresh.stderr[-3000:]
            assert not WORKER_PID.search(fresh.stderr)
            assert scores(cwd / f"w{job}.json") == scores(cwd / f"e{job}.json")
        # A worker is replaced when the package's code changes, as it may while this runs
        # (someone editing the tree): then the pair is run again.
        if "runs other code or settings" not in stderr:
            break
    assert pids[0] == pids[1], "the second job started a worker of its own"
    assert eval_worker_pids(cwd) == [pids[0]]
    # Opting out runs the job in the launcher's process.
    proc = run_job(cwd, job_command(tiny_eval_model, 0, cwd / "i0.json"), job_env("inprocess"))
    assert proc.returncode == 0 and not WORKER_PID.search(proc.stderr)
    assert "in this process" in proc.stderr


def merge_inputs(root: Path, model: Path) -> list[Path]:
    """The tiny model as a base and two fine-tunes of it (its weights plus seeded noise)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(model / "model.safetensors")
    dirs = []
    for seed, name in enumerate(("base", "ct", "sft")):
        out = root / name
        shutil.copytree(model, out, ignore=shutil.ignore_patterns("recipe.json", "manifest.json"))
        generator = torch.Generator().manual_seed(seed)
        noisy = {key: value + (0.02 * torch.randn(value.shape, generator=generator) if seed
                               else 0) for key, value in weights.items()}
        save_file(noisy, out / "model.safetensors", metadata={"format": "pt"})
        dirs.append(out)
    return dirs


def test_merge_jobs_run_in_the_worker_and_write_the_same_bytes(eval_workers, tiny_eval_model):
    from workflow.merge import STAGE_VERSIONS

    cwd = eval_workers
    base, ct, sft = merge_inputs(cwd / "inputs", tiny_eval_model["model"])
    recipe = {"stage": "merge", "version": STAGE_VERSIONS["merge"], "method": "ties",
              "params": {"lambda": 1.0, "normalize": True, "rescale": False}, "base": "b",
              "models": [{"role": "ct", "lang": "eu", "digest": "c", "weight": 1.0,
                          "density": 0.5},
                         {"role": "sft", "digest": "s", "weight": 1.0, "density": 0.5}]}

    def merge_command(out: Path) -> list[str]:
        return [sys.executable, "-m", "workflow.launch", "--gpus", "0", "--threads", "1", "--",
                "workflow.merge", "--recipe", json.dumps(recipe), "--base", str(base),
                "--models", str(ct), str(sft), "--out", str(out)]

    evaluation = run_job(cwd, job_command(tiny_eval_model, 0, cwd / "w0.json"), job_env())
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    warm = run_job(cwd, merge_command(cwd / "warm"), job_env())
    assert warm.returncode == 0, warm.stderr[-3000:]
    assert worker_pid(warm) == worker_pid(evaluation)  # the same worker, already warm
    assert "workflow.merge.engine: wrote" in warm.stderr  # its log reaches the job's stderr
    fresh = run_job(cwd, merge_command(cwd / "fresh"), job_env("exec"))
    assert fresh.returncode == 0 and not WORKER_PID.search(fresh.stderr), fresh.stderr[-3000:]
    for name in ("model.safetensors", "manifest.json", "config.json"):
        assert (cwd / "warm" / name).read_bytes() == (cwd / "fresh" / name).read_bytes(), name
    # A merge that fails (an input that is not a model) fails its job, not the worker.
    broken = run_job(cwd, merge_command(cwd / "broken")[:-5] + [
        "--models", str(cwd), str(sft), "--out", str(cwd / "broken")], job_env())
    assert broken.returncode != 0 and not (cwd / "broken").exists()
    assert worker_pid(broken) == worker_pid(evaluation)


def test_a_failing_job_fails_alone(eval_workers, tiny_eval_model):
    cwd = eval_workers
    bad = run_job(cwd, job_command(tiny_eval_model, 0, cwd / "bad.json",
                                   model=cwd / "no-such-model"), job_env())
    assert bad.returncode == 2
    assert "evaluate: error: model directory" in bad.stderr and "lacks config.json" in bad.stderr
    assert not (cwd / "bad.json").exists()
    good = run_job(cwd, job_command(tiny_eval_model, 1, cwd / "good.json"), job_env())
    assert good.returncode == 0, good.stderr[-3000:]
    assert worker_pid(good) == worker_pid(bad)  # the worker lived on


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_client_ends_its_worker(eval_workers, tiny_eval_model, sig):
    """SIGTERM: the client kills the worker; SIGKILL: the worker sees the connection close."""
    cwd = eval_workers
    slow = evaluate_benchmark.build_suite(cwd / "slow", 1500)
    client = subprocess.Popen(
        job_command(tiny_eval_model, 0, cwd / "slow.json", suite=slow), cwd=cwd,
        env=job_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        logs = cwd / ".cache" / "lrmerge" / "eval-worker"
        while not any("job 1:" in log.read_text() for log in logs.glob("*/slot-0.log")):
            assert client.poll() is None, client.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the job did not start in a worker"
            time.sleep(0.1)
        (pid,) = eval_worker_pids(cwd)
        time.sleep(0.5)
        client.send_signal(sig)
        _, stderr = client.communicate(timeout=30)
        expected = 128 + sig if sig == signal.SIGTERM else -sig
        assert client.returncode == expected, stderr[-3000:]
        wait_gone(pid)
        assert not (cwd / "slow.json").exists()
    finally:
        client.kill()
        client.wait()
    after = run_job(cwd, job_command(tiny_eval_model, 1, cwd / "after.json"), job_env())
    assert after.returncode == 0, after.stderr[-3000:]
    assert worker_pid(after) != pid


def test_the_worker_ends_with_its_owner(eval_workers, tiny_eval_model):
    cwd = eval_workers
    # The launcher's owner is the shim (as Snakemake is a job's), which ends after the job.
    proc = run_job(cwd, job_command(tiny_eval_model, 0, cwd / "s.json"), job_env(),
                   owner_shim=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wait_gone(worker_pid(proc), timeout=15)
    assert eval_worker_pids(cwd) == []


def test_other_code_or_settings_get_a_fresh_worker(eval_workers, tiny_eval_model):
    cwd = eval_workers
    first = run_job(cwd, job_command(tiny_eval_model, 0, cwd / "a.json"),
                    job_env(**{eval_worker.TAG_ENV: "a"}))
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_job(cwd, job_command(tiny_eval_model, 1, cwd / "b.json"),
                     job_env(**{eval_worker.TAG_ENV: "b"}))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "runs other code or settings" in second.stderr
    assert worker_pid(second) != worker_pid(first)
    wait_gone(worker_pid(first), timeout=15)


@pytest.mark.parametrize("length", [10, 200])
def test_socket_paths_fit_af_unix(tmp_path, length):
    slot_dir = tmp_path / ("d" * length)
    path = eval_worker.slot_socket(slot_dir, 3)
    assert path is not None and len(os.fsencode(path)) <= eval_worker.SOCKET_PATH_MAX
    assert not path.is_relative_to(tmp_path)  # never in the working directory
    assert path != eval_worker.slot_socket(tmp_path / "other", 3)


SNAKEFILE = """
import json, shlex
rule all:
    input: expand("s{i}.json", i=range(len(config["recipes"])))
rule evaluate:
    output: "s{i}.json"
    log: "s{i}.log"
    params: recipe=lambda w: shlex.quote(json.dumps(config["recipes"][int(w.i)]))
    shell: config["launch"] + " --recipe {params.recipe} --out {output} 2> {log}"
"""


def test_snakemake_jobs_leave_no_worker_behind(eval_workers, tiny_eval_model):
    """Jobs of a real Snakemake run (--cores 2: two at a time, two slots) run in workers,
    which end with the Snakemake process, their owner."""
    cwd = eval_workers
    (cwd / "Snakefile").write_text(SNAKEFILE)
    fixture = tiny_eval_model
    launch_cmd = (f"PYTHONPATH={REPO} {sys.executable} -m workflow.launch --gpus 0 --threads 1"
                  f" -- workflow.evaluate --model {fixture['model']} --suite eu={fixture['suite']}"
                  " --threads 1")
    config = {"launch": launch_cmd, "recipes": [
        evaluate_benchmark.job_recipe(fixture["model_digest"], fixture["suite_digest"], job)
        for job in range(3)]}
    snakemake(cwd, config, snakefile=cwd / "Snakefile")
    pids = {worker_pid(subprocess.CompletedProcess([], 0, "", (cwd / f"s{job}.log").read_text()))
            for job in range(3)}
    assert 1 <= len(pids) <= 2  # one worker per slot: at most two jobs ran at a time
    for pid in pids:
        wait_gone(pid, timeout=15)
    assert eval_worker_pids(cwd) == []
