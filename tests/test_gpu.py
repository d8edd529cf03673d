"""GPU leases with fake device ids: exclusive under contention, released on exit or kill -9."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workflow import gpu

IDS = ["0", "1", "2", "3"]


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)


def hold(lock_dir: str, n: int, seconds: float, log_path: str) -> None:
    """Lease n fake GPUs, keep them for a while, and log (start, end, ids, visible)."""
    with gpu.lease(n, IDS, Path(lock_dir), timeout=60, poll=0.02) as ids:
        start = time.monotonic()
        visible = os.environ["CUDA_VISIBLE_DEVICES"]
        time.sleep(seconds)
        end = time.monotonic()
    with open(log_path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps([start, end, ids, visible]) + "\n")


def test_competing_processes_never_share_a_device(tmp_path):
    log_path = tmp_path / "leases.jsonl"
    ctx = multiprocessing.get_context("fork")
    # 6 jobs of 2 GPUs on 4 ids: at most 2 run at a time, the rest wait their turn.
    procs = [
        ctx.Process(target=hold, args=(str(tmp_path / "locks"), 2, 0.3, str(log_path)))
        for _ in range(6)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert len(rows) == 6
    for _start, _end, ids, visible in rows:
        assert len(set(ids)) == 2 and set(ids) <= set(IDS)
        assert visible == ",".join(ids)
    overlaps = 0
    for i, (s1, e1, ids1, _) in enumerate(rows):
        for s2, e2, ids2, _ in rows[i + 1 :]:
            if s1 < e2 and s2 < e1:  # held at the same time
                overlaps += 1
                assert not set(ids1) & set(ids2), (ids1, ids2)
    assert overlaps >= 1  # the test did exercise concurrency
    # Two at a time at most: the six 0.3 s holds need at least three rounds.
    assert max(r[1] for r in rows) - min(r[0] for r in rows) >= 0.85


def test_lease_sets_and_restores_visible_devices(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "before")
    with gpu.lease(3, IDS, tmp_path, timeout=1) as ids:
        assert ids == ["0", "1", "2"]
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2"
        # The fourth is free, but two more are not: all or nothing, then a timeout.
        with pytest.raises(TimeoutError, match="not free"):
            gpu.acquire(2, IDS, tmp_path, timeout=0.1, poll=0.02)
        with gpu.lease(1, IDS, tmp_path, timeout=1) as more:
            assert more == ["3"]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "before"
    with gpu.lease(0, IDS, tmp_path) as none:
        assert none == [] and os.environ["CUDA_VISIBLE_DEVICES"] == ""
    with pytest.raises(ValueError, match="only 4 exist"):
        gpu.acquire(5, IDS, tmp_path)


def test_device_discovery_and_slurm(monkeypatch, tmp_path):
    monkeypatch.setenv("LRMERGE_GPU_IDS", "4, 5")
    assert gpu.available_devices() == ["4", "5"]
    monkeypatch.delenv("LRMERGE_GPU_IDS")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,7")
    assert gpu.available_devices() == ["2", "7"]
    # Under SLURM the allocation is used as it is: nothing locked, nothing changed.
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    with gpu.lease(2, directory=tmp_path / "locks") as ids:
        assert ids == ["2", "7"] and os.environ["CUDA_VISIBLE_DEVICES"] == "2,7"
    assert not (tmp_path / "locks").exists()


def test_launcher_holds_the_lease_until_killed(tmp_path):
    """workflow.launch keeps its locks across exec; kill -9 of the job frees them."""
    env = {
        **os.environ,
        "LRMERGE_GPU_IDS": "0,1",
        "LRMERGE_GPU_LOCK_DIR": str(tmp_path / "locks"),
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    env.pop("SLURM_JOB_ID", None)
    # A stand-in for the training stage: report the devices it got, then keep running.
    (tmp_path / "probe.py").write_text(
        "import os, time\nprint(os.environ['CUDA_VISIBLE_DEVICES'], flush=True)\ntime.sleep(60)\n"
    )
    env["PYTHONPATH"] += os.pathsep + str(tmp_path)
    job = subprocess.Popen(
        [sys.executable, "-m", "workflow.launch", "--gpus", "1", "--", "probe"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        leased = job.stdout.readline().strip()
        assert leased in {"0", "1"}
        # The other id is still free, the leased one is not.
        with gpu.lease(1, ["0", "1"], tmp_path / "locks", timeout=5, poll=0.02) as ids:
            assert ids != [leased]
        with pytest.raises(TimeoutError):
            gpu.acquire(2, ["0", "1"], tmp_path / "locks", timeout=0.2, poll=0.02)
    finally:
        os.kill(job.pid, signal.SIGKILL)
        job.wait()
    with gpu.lease(2, ["0", "1"], tmp_path / "locks", timeout=5, poll=0.02) as ids:
        assert ids == ["0", "1"]
