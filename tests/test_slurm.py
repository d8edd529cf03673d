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
before any submission, naming the config key. Training across nodes: a job of 2 tasks on the
one node stands for 2 nodes, and `workflow.launch --nodes 2` in it (srun, one torchrun agent per
task, c10d rendezvous, gloo) trains the same CT model as one process. The checks of
workflow/cluster.py and the sbatch flags of a job across nodes need no cluster and run
everywhere.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_resume import tiny_model, token_dir, weights

from workflow import cluster
from workflow.stages import STAGES

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


def test_nodes_checks_name_the_key():
    def config(**resources):
        return {"resources": resources, "ct": {"train": {"grad_accum": 4}},
                "sft": {"train": {"grad_accum": 1}}}

    cluster.check_config(config(ct={"nodes": 2, "gpu": 2}))
    with pytest.raises(cluster.ClusterError, match=r"'ct\.train\.grad_accum': 4 must be a mult"):
        cluster.check_config(config(ct={"nodes": 2, "gpu": 4}))
    with pytest.raises(cluster.ClusterError, match=r"'resources\.merge\.nodes' is 2: only"):
        cluster.check_config(config(merge={"nodes": 2}))
    with pytest.raises(cluster.ClusterError, match=r"'resources\.default\.nodes' is 3: only"):
        cluster.check_config(config(default={"nodes": 3}))
    cluster.check_local(config(ct={"nodes": 2}), ["merge", "sft"])
    with pytest.raises(cluster.ClusterError, match=r"'resources\.ct\.nodes' is 2: .* SLURM only"):
        cluster.check_local(config(ct={"nodes": 2}), ["merge", "ct"])
    with pytest.raises(cluster.ClusterError, match=r"'resources\.ct\.nodes' asks for 2 nodes"):
        cluster.check_capacity(config(ct={"nodes": 2}), ["ct"], [(8, 16000)])


def test_multinode_job_submission():
    """A job across nodes as the slurm executor plugin submits it, through the plugin's own
    sbatch and jobstep functions: N nodes, one task each, GPUs per node, and a job shell run
    in the batch script (the `mpi` path: no `srun -n1` around the launcher's own srun)."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string
    from snakemake_executor_plugin_slurm.validation import validate_slurm_extra

    class Resources(dict):  # a job's resources: .get() and attributes, as Snakemake's
        def __getattr__(self, name: str):
            try:
                return self[name]
            except KeyError:
                raise AttributeError(name) from None

    def sbatch(resources: dict) -> str:
        job = type("Job", (), {"resources": Resources(resources), "threads": 8})()
        validate_slurm_extra(job)
        params = {"run_uuid": "u", "slurm_logfile": "l", "comment_str": "c", "account": "",
                  "partition": "", "workdir": ""}
        return get_submit_command(job, params) + set_gres_string(job)

    config = {"resources": {"ct": {"nodes": 3, "gpu": 4, "mem_mb": 64000}}}
    resources = {"mem_mb": 64000, **cluster.slurm_resources(config, "ct")}
    assert "mpi" in resources  # the jobstep's test for running the shell as it is
    flags = sbatch(resources).split()
    for flag in ("--nodes=3", "--ntasks=3", "--ntasks-per-node=1", "--gpus-per-node=4",
                 "--cpus-per-task=8"):
        assert flag in flags, (flag, flags)
    assert not [flag for flag in flags if flag.startswith(("--gpus=", "--ntasks-per-gpu"))]
    # One node: as before, the plugin's --gpus=N and one task.
    one = cluster.slurm_resources({"resources": {"ct": {"gpu": 2}}}, "ct")
    assert one == {"gpu": 2}
    flags = sbatch(one).split()
    assert "--gpus=2" in flags and "--ntasks=1" not in flags and "--nodes=3" not in flags


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


def snakemake(workdir: Path, config: Path, *args: str, timeout: float = 900):
    """Run the workflow through the SLURM profile; (returncode, output, submitted job ids).
    A run past ``timeout`` gets SIGTERM, so that Snakemake cancels its jobs and the next test
    finds an empty queue, and then fails the test."""
    proc = subprocess.Popen(_command(workdir, config, *args), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(), cwd=PROJECT)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            output, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        pytest.fail(f"snakemake ran past {timeout} s:\n{output[-4000:]}")
    return proc.returncode, output, SUBMITTED.findall(output)


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
    print(overheads(workdir, jobs))
    return workdir, config, output, jobs


def overheads(workdir: Path, jobs: list[tuple[str, str]]) -> str:
    """Per single-rule submission: seconds in SLURM (scontrol's RunTime) against the seconds
    of work its benchmark file records; the difference is the cost of a cluster job."""
    lines = []
    for job_id, log in jobs:
        name = kind(log).removeprefix("rule_")
        if name not in STAGES:
            continue
        out = _run(["scontrol", "show", "job", job_id], timeout=30).stdout
        found = re.search(r"RunTime=(\d+):(\d+):(\d+)", out)
        folder = workdir / STAGES[name].folder.replace("results/", "benchmarks/", 1)
        work = sum(float(path.read_text().split("\n")[1].split("\t")[0])
                   for path in folder.rglob("*.tsv"))
        if found:
            hours, minutes, seconds = (int(part) for part in found.groups())
            lines.append(f"  {name}: {hours * 3600 + minutes * 60 + seconds} s in SLURM, "
                         f"{work:.0f} s of work")
    return "per job:\n" + "\n".join(lines)


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


def test_two_nodes_train_like_one_process(slurm, tmp_path):
    """Training across nodes on the one-node cluster: a SLURM job of 2 tasks stands for 2
    nodes. The launcher (--nodes 2) runs srun, one torchrun agent per task with one process
    (gloo, CPU), joined by a c10d rendezvous on the job's first host; the result must be the
    single-process run's of the same recipe."""
    model = tiny_model(tmp_path)
    # 992 targets -> 32 blocks of 31 -> 4 optimizer steps of 2 x 4 sequences an epoch: no
    # top-up blocks, so both runs see the same shuffled order (tests/test_ddp.py tops up).
    data = token_dir(tmp_path, "tokens", 992, seed=2)
    train = {"lr": 3e-3, "min_lr": 1e-4, "batch_size": 4, "grad_accum": 2, "seq_len": 32,
             "epochs": 2, "seed": 0}
    recipe = json.dumps({"stage": "ct", "version": "1", "params": {"train": train}})

    def command(out: Path, *launch: str) -> list[str]:
        return [sys.executable, "-m", "workflow.launch", "--gpus", "0", *launch, "--threads",
                "1", "--", "workflow.train", "ct", "--recipe", recipe, "--model", str(model),
                "--data", str(data), "--out", str(out), "--threads", "1"]

    environment = {**_env(), "PYTHONPATH": str(PROJECT), "CUDA_VISIBLE_DEVICES": "",
                   "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # The job's shell as the plugin's jobstep runs it: of the SLURM variables only the job id
    # is left, so the launcher must ask scontrol for the job's hosts, tasks and CPUs.
    script = ("unset $(compgen -e | grep '^SLURM_' | grep -vx SLURM_JOB_ID); exec "
              + shlex.join(command(tmp_path / "nodes", "--nodes", "2")))
    # salloc runs the script on this host, the cluster's one node, holding a job of 2 tasks,
    # as sbatch runs a batch script on a job's first node; it returns when the script ends
    # (sbatch --wait polls, 30 s more here).
    start = time.monotonic()
    multi = subprocess.Popen(
        ["salloc", "--ntasks", "2", "--cpus-per-task", "1", "--mem", "3000", "bash", "-c",
         script], env=environment, cwd=PROJECT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    single = subprocess.run(command(tmp_path / "one", "--nproc", "1"), env=environment,
                            cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    single_s = time.monotonic() - start
    try:
        text, _ = multi.communicate(timeout=300)
    finally:
        if multi.poll() is None:  # salloc ends its job when it ends
            multi.terminate()
            multi.communicate(timeout=60)
    print(f"two nodes (salloc, srun, 2 torchrun agents): {time.monotonic() - start:.0f} s; "
          f"one process alongside: {single_s:.0f} s")
    assert multi.returncode == 0, text[-4000:]
    srun = (r"running srun --nodes 1 --ntasks 2 --ntasks-per-node 2 .*torch\.distributed\.run "
            r"--nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint \S+:\d+ "
            r"--rdzv-id \d+ -m workflow\.train ct")
    assert re.search(srun, text), text
    one, nodes = (json.loads((tmp_path / name / "metrics.json").read_text())
                  for name in ("one", "nodes"))
    assert (one["world_size"], nodes["world_size"]) == (1, 2)
    assert nodes["tokens_trained"] == one["tokens_trained"] == 2 * 992  # exact, 2 epochs
    assert nodes["steps"] == one["steps"] == 8
    # Both runs add the same two micro-batch gradients per step (one process accumulates them,
    # two all-reduce them over gloo) in fp32, so they can differ only by rounding: ~1e-7
    # relative per step (they came out bit-identical here). Training moved the weights by
    # ~1e-2 and a micro-batch lost or seen twice moves them by ~lr = 3e-3: 1e-5 tells the two
    # apart.
    start, a, b = weights(model), weights(tmp_path / "one"), weights(tmp_path / "nodes")
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-3  # it did train
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5, msg=key)


# One run per check the Snakefile calls before any submission: check_config (the account) and
# check_capacity against sinfo (threads). Its other cases (memory, nodes) are the same call,
# tested without a cluster above.
@pytest.mark.parametrize(("changes", "key"), [
    ({"cluster": {"account": "your_account"}}, "cluster.account"),
    ({"resources": {"ct": {"threads": 4096}}}, "resources.ct.threads"),
])
def test_unsatisfiable_config_stops_before_submission(slurm, tmp_path, changes, key):
    config = write_config(tmp_path / "config.yaml", **changes)
    code, output, jobs = snakemake(tmp_path, config, timeout=120)
    assert code != 0 and jobs == []
    assert f"config key '{key}'" in output, output[-3000:]
