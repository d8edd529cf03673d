"""workflow.launch runs a one-process CPU stage in its own interpreter, armed like an exec'd one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workflow import launch, lifeline

REPO = Path(__file__).resolve().parents[1]
PROBE = """
import json, logging, os, sys, threading
logging.basicConfig(level=logging.INFO, format="PROBE %(message)s")
logging.getLogger("probe").info("stage logging is the stage's own")
print(json.dumps({
    "argv": sys.argv[1:],
    "me": "{}:{}".format(*__import__("workflow.lifeline").lifeline.ident(os.getpid())),
    "launcher_loaded": "workflow.gpu" in sys.modules,  # imported by the launcher only
    "armed": any(t.name == "lrmerge-lifeline" for t in threading.enumerate()),
    "root": os.environ.get("LRMERGE_JOB_ROOT"),
    "owner": os.environ.get("LRMERGE_JOB_OWNER"),
    "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
    "omp": os.environ.get("OMP_NUM_THREADS"),
}), flush=True)
sys.exit(int(sys.argv[-1]))
"""


@pytest.mark.parametrize("mode", ["", "exec"])
def test_cpu_stage_runs_in_the_launchers_process_armed(tmp_path, mode):
    (tmp_path / "probe_stage.py").write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}",
           launch.MODE_ENV: mode, "CUDA_VISIBLE_DEVICES": "0"}
    env.pop(lifeline.SWITCH_ENV, None)
    proc = subprocess.run(
        [sys.executable, "-m", "workflow.launch", "--gpus", "0", "--threads", "2", "--",
         "probe_stage", "a", "--b", "3"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 3, proc.stderr  # the stage's exit status is the job's
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["argv"] == ["a", "--b", "3"]
    # In-process unless asked to exec; either way the same process the launcher started as.
    assert out["launcher_loaded"] is (mode != "exec")
    assert ("in this process" in proc.stderr) is (mode != "exec")
    assert out["root"] == out["me"]  # the watchdog's job root is the stage itself
    assert out["owner"] == "{}:{}".format(*lifeline.ident(os.getpid()))  # pytest started it
    assert out["armed"], "the lifeline watchdog does not run in the stage"
    assert out["cuda"] == "" and out["omp"] == "2"  # set before the stage imports torch
    assert "PROBE stage logging is the stage's own" in proc.stderr


def test_in_process_stage_ends_when_its_owner_is_killed(tmp_path):
    """kill -9 of the job's owner (Snakemake) ends the stage, as it did after an exec."""
    (tmp_path / "sleeper_stage.py").write_text(
        "import os, pathlib, time\n"
        "pathlib.Path(os.environ['PIDFILE']).write_text(str(os.getpid()))\n"
        "time.sleep(120)\n"
    )
    pidfile = tmp_path / "stage.pid"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}", "PIDFILE": str(pidfile)}
    env.pop(lifeline.SWITCH_ENV, None)
    env.pop(launch.MODE_ENV, None)
    job = f"{sys.executable} -m workflow.launch --gpus 0 -- sleeper_stage; true"
    # The owner starts the job's shell, as Snakemake does, and is then killed.
    owner = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time\n"
         "subprocess.Popen(['bash', '-c', sys.argv[1]])\ntime.sleep(120)\n", job],
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while not pidfile.exists() or not pidfile.read_text():
            assert time.monotonic() < deadline, "the stage did not start"
            time.sleep(0.1)
        stage = lifeline.ident(int(pidfile.read_text()))
        assert stage is not None
        cmdline = Path(f"/proc/{stage[0]}/cmdline").read_bytes().split(b"\0")
        assert b"workflow.launch" in cmdline  # the launcher's process runs the stage
        owner.kill()
        deadline = time.monotonic() + 20
        while lifeline.alive(stage):
            assert time.monotonic() < deadline, "the stage outlived its owner"
            time.sleep(0.2)
    finally:
        owner.kill()
        owner.wait()
