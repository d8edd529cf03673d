"""The SLURM profile against a real single-node SLURM cluster (slurmctld + slurmd, no accounting
storage, a fake GRES of two GPUs), started by tests/slurm/start-slurm.sh and stopped after the
module. Skips, with the reason, where no cluster can be started here: not Linux, not root, or
the SLURM packages are neither installed nor installable (apt-get). CI (`make test`, as root on
Debian with apt access) runs it.

What it proves: `snakemake --profile profiles/slurm` runs a small workflow (tests/slurm/small.yaml:
every stage, one language, one budget, one merge) to the end on a cluster without accounting
storage; a rerun submits nothing; a job failing inside SLURM fails the run, named; a `gpu: 1` job
is submitted with --gpus=1 and runs under the (fake) GRES; SIGTERM to Snakemake cancels its jobs
and leaves the queue empty; a placeholder account or more threads than any node has stop the run
before any submission, naming the config key. The checks of workflow/cluster.py that need no
cluster run everywhere.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from workflow import cluster

PROJECT = Path(__file__).resolve().parent.parent
SCRIPTS = PROJECT / "tests" / "slurm"
SMALL = SCRIPTS / "small.yaml"
SUBMITTED = re.compile(r"has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")


# -- workflow/cluster.py, no cluster needed ---------------------------------------------------


def test_placeholder_account_is_named():
    for account in ("your_account", "YOUR-ACCOUNT", "<account>", "changeme", "my_project"):
        with pytest.raises(cluster.ClusterError, match=r"'cluster\.account'"):
            cluster.check_config({"cluster": {"account": account}})
    cluster.check_config({"cluster": {"account": "proj1234"}})
    cluster.check_config({"cluster": {"account": None}})
    cluster.check_config({})


def test_capacity_names_the_key():
    nodes = cluster.parse_sinfo("4 16000\n8+ 32000\nbad line here\n")
    assert nodes == [(4, 16000), (8, 32000)]
    config = {"resources": {"default": {"threads": 1, "mem_mb": 2000},
                            "ct": {"threads": 16}, "merge": {"mem_mb": 64000}}}
    cluster.check_capacity(config, ["prepare", "evaluate"], nodes)
    with pytest.raises(cluster.ClusterError, match=r"'resources\.ct\.threads' asks for 16 CPUs"):
        cluster.check_capacity(config, ["prepare", "ct"], nodes)
    with pytest.raises(cluster.ClusterError, match=r"'resources\.merge\.mem_mb'"):
        cluster.check_capacity(config, ["merge"], nodes)
    # 8 threads fit only the 32000 MB node; 20000 MB with 8 threads fits there, 40000 does not.
    fat = {"resources": {"default": {"threads": 8, "mem_mb": 20000}}}
    cluster.check_capacity(fat, ["ct"], nodes)
    fat["resources"]["default"]["mem_mb"] = 40000
    with pytest.raises(cluster.ClusterError, match=r"'resources\.default\.mem_mb'"):
        cluster.check_capacity(fat, ["ct"], nodes)


def test_runtime_from_cluster_section():
    config = {"cluster": {"runtime_min": {"default": 120, "ct": 1440}}}
    assert cluster.runtime(config, "ct") == 1440
    assert cluster.runtime(config, "merge") == 120
    assert cluster.runtime({"cluster": {"runtime_min": {"default": None}}}, "merge") is None


# -- the cluster -------------------------------------------------------------------------------


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def slurm():
    """A running single-node SLURM cluster for this module; stopped afterwards."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the SLURM test cluster needs Linux")
    if os.geteuid() != 0:
        pytest.skip("the SLURM test cluster needs root (it installs and starts slurmctld)")
    if shutil.which("slurmctld") is None:
        if shutil.which("apt-get") is None:
            pytest.skip("SLURM is not installed and there is no apt-get to install it")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = subprocess.run(
            "apt-get update -qq && apt-get install -y -qq --no-install-recommends "
            "slurmctld slurmd slurm-client munge", shell=True, capture_output=True, text=True,
            timeout=600, env=env, check=False)
        if install.returncode != 0:
            pytest.skip(f"cannot install SLURM with apt-get: {install.stderr.strip()[-500:]}")
    started = _run(["bash", str(SCRIPTS / "start-slurm.sh")], timeout=300)
    try:
        assert started.returncode == 0, f"start-slurm.sh: {started.stdout}\n{started.stderr}"
        assert _run(["squeue", "-h"], timeout=30).stdout.strip() == "", "the queue is not empty"
        yield
    finally:
        _run(["bash", str(SCRIPTS / "stop-slurm.sh")], timeout=120)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "LRMERGE_GPU", "SNAKEMAKE_PROFILE"))}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _command(workdir: Path, config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--profile", str(PROJECT / "profiles" / "slurm"),
            "--snakefile", str(PROJECT / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(config), *args]


def snakemake(workdir: Path, config: Path, *args: str, timeout: float = 360):
    """Run the workflow through the SLURM profile; (returncode, output, submitted job ids)."""
    result = subprocess.run(_command(workdir, config, *args), capture_output=True, text=True,
                            timeout=timeout, env=_env(), cwd=PROJECT, check=False)
    output = result.stdout + result.stderr
    return result.returncode, output, SUBMITTED.findall(output)


def kind(log: str) -> str:
    """A submission's rule or group, from its log path: rule_ct, group_evaluate_evaluate, …"""
    return next(part for part in Path(log).parts if part.startswith(("rule_", "group_")))


def write_config(path: Path, **changes) -> Path:
    config = yaml.safe_load(SMALL.read_text())
    config.update(changes)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def squeue() -> list[str]:
    return _run(["squeue", "-h", "-o", "%i %T"], timeout=30).stdout.split("\n")[:-1]


def job_tres(job_id: str) -> str:
    """A job's lines of `scontrol show job` with its trackable resources (the test cluster keeps
    finished jobs for an hour: MinJobAge in start-slurm.sh)."""
    out = _run(["scontrol", "show", "job", job_id], timeout=30).stdout
    return " ".join(line.strip() for line in out.splitlines() if "tres" in line.lower())


@pytest.fixture(scope="module")
def finished(slurm, tmp_path_factory):
    """The small workflow run to the end through the profile: its workdir, output, submissions.
    The merge asks for one GPU, and LRMERGE_GPU_IDS is unset (the job uses its allocation)."""
    workdir = tmp_path_factory.mktemp("slurm-run")
    config = write_config(workdir / "config.yaml", resources={"merge": {"gpu": 1}})
    start = time.monotonic()
    code, output, jobs = snakemake(workdir, config)
    wall = time.monotonic() - start
    assert code == 0, output[-8000:]
    print(f"slurm run: {len(jobs)} submissions in {wall:.0f} s")
    return workdir, config, output, jobs


def test_run_completes(finished):
    workdir, _, output, jobs = finished
    assert re.search(r"\d+ of \d+ steps \(100%\) done", output), output[-3000:]
    reports = list((workdir / "results" / "report").glob("*/*"))
    assert reports, "no report written"
    assert list((workdir / "results" / "eval").rglob("scores.json"))
    # The stage table's local stages ran on this host, every other stage as a SLURM job.
    submitted = {kind(log) for _, log in jobs}
    assert not submitted & {"rule_evalset", "rule_report"}, submitted
    assert re.search(r"^localrule (evalset|report):", output, re.M), output[-3000:]
    assert {"rule_pretrain", "rule_ct", "rule_merge"} <= submitted, submitted
    assert squeue() == []


def test_gpu_job_runs_under_gres(finished):
    workdir, _, _, jobs = finished
    merges = [job for job, log in jobs if kind(log) == "rule_merge"]
    assert len(merges) == 1
    assert "TresPerJob=gres:gpu:1" in job_tres(merges[0]), job_tres(merges[0])
    others = [job for job, log in jobs if kind(log) in ("rule_ct", "rule_pretrain")]
    assert others and all("gres:gpu" not in job_tres(job) for job in others)
    # launch.py saw the SLURM job and used its allocation (no local GPU lease).
    log = next((workdir / "logs" / "merge").rglob("*.log")).read_text()
    assert "using its allocation as is" in log, log[-2000:]


def test_rerun_submits_nothing(finished):
    workdir, config, _, _ = finished
    code, output, jobs = snakemake(workdir, config, timeout=120)
    assert code == 0, output[-4000:]
    assert jobs == []
    assert "Nothing to be done" in output, output[-2000:]


def test_failing_job_fails_the_run(finished):
    """A budget larger than the corpus: prepare fails, inside its SLURM job."""
    workdir, _, _, _ = finished
    config = write_config(workdir / "too-big.yaml", budgets=[50_000_000])
    code, output, jobs = snakemake(workdir, config, timeout=300)
    assert code != 0, output[-4000:]
    failed = [log for _, log in jobs if "prepare" in log or "group_data" in log]
    assert failed, output[-4000:]
    assert re.search(r"Error in (rule prepare|group data)", output), output[-4000:]
    assert "jobid" in output and squeue() == []


def test_sigterm_cancels_jobs(finished):
    workdir, _, _, _ = finished
    config = write_config(workdir / "other-budget.yaml", budgets=[3000])
    proc = subprocess.Popen(_command(workdir, config), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(), cwd=PROJECT)
    try:
        deadline = time.monotonic() + 120
        while not squeue() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert squeue(), "no job reached the queue"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0, output[-3000:]
    deadline = time.monotonic() + 30
    while squeue() and time.monotonic() < deadline:
        time.sleep(1)
    assert squeue() == [], output[-3000:]


@pytest.mark.parametrize(("changes", "key"), [
    ({"cluster": {"account": "your_account"}}, "cluster.account"),
    ({"resources": {"ct": {"threads": 4096}}}, "resources.ct.threads"),
    ({"resources": {"default": {"mem_mb": 10**9}}}, "resources.default.mem_mb"),
])
def test_unsatisfiable_config_stops_before_submission(slurm, tmp_path, changes, key):
    config = write_config(tmp_path / "config.yaml", **changes)
    code, output, jobs = snakemake(tmp_path, config, timeout=120)
    assert code != 0 and jobs == []
    assert f"config key '{key}'" in output, output[-3000:]
