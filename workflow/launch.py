"""Start a training stage on the job's GPUs: lease device ids, then one process or torchrun.

    python -m workflow.launch --gpus N [--nproc P] [--nodes M] [--threads T] -- MODULE ARGS...

(MODULE and ARGS: the stage's command, e.g. workflow.train ct --recipe ...)

--gpus is the rule's ``resources.gpu``. Locally, N device ids are leased (workflow.gpu: lock
files, waits while they are taken) and CUDA_VISIBLE_DEVICES is set to them; N = 0 hides every
GPU. Under SLURM the allocation is used as it is. P processes (default max(1, N)) are started:
P = 1 runs the module in this process's place; P > 1 runs it under torchrun (torch's
``torch.distributed.run --standalone``: a free local port, DDP; FSDP when the recipe asks the
Trainer for it), with gloo on CPU, which is how tests/test_ddp.py runs two CPU processes.

--nodes M > 1 (``resources.<stage>.nodes``) runs M torchrun agents of P processes each, one per
node of the SLURM job, started by srun and joined by a c10d rendezvous on the job's first host:

    srun --nodes M --ntasks M --ntasks-per-node 1 --kill-on-bad-exit=1 [--cpus-per-task C]
      python -m torch.distributed.run --nnodes M --nproc-per-node P --rdzv-backend c10d
      --rdzv-endpoint HEAD:PORT --rdzv-id $SLURM_JOB_ID -m workflow.train ct ARGS...

HEAD is the first host of the job's node list (``scontrol show job``, then ``scontrol show
hostnames``), PORT a free port there (the launcher runs in the batch script, on that host).
srun's node and task counts come from the allocation: a job of fewer nodes than agents
(tests/test_slurm.py: 2 tasks on its one-node cluster) puts several agents on a node, with the
same command otherwise. The trainer
counts processes by WORLD_SIZE and ranks by RANK, so the token budget and the resume state are
those of one node with M x P processes. Outside a SLURM job M > 1 is an error, before anything
runs.

One process without a GPU lease (a CPU job, or a SLURM job's own allocation) runs in the
launcher's interpreter: the stage's main runs here, as ``python -m workflow.lifeline MODULE``
would run it after an exec, armed the same way, sparing the job a second interpreter start
(evaluation jobs are mostly fixed cost). LRMERGE_LAUNCH=exec keeps the exec for such jobs too.
An evaluation or merge job (``workflow.evaluate``, ``workflow.merge``) outside SLURM goes
further: it becomes a thin client of a warm worker of the Snakemake run, which imported torch,
transformers and lm-eval once (workflow/eval_worker/); it runs here when no worker can take it
(the reason logged), and LRMERGE_LAUNCH=inprocess (or exec) keeps it out of the workers.

Otherwise the launcher replaces itself with the command (exec), so Snakemake's signals reach
torchrun, srun or the stage directly, and the lock files stay held by that process until it
ends. Before the exec (or the in-process run) it arms the lifeline (workflow/lifeline.py):
the stage dies with the job's shell, and records the job's owner (Snakemake) for the stage's
watchdog, so a killed Snakemake leaves no orphan. Across nodes only srun is armed (it dies
with the job's shell and then ends its tasks on every node): the owner's pid means nothing on
another node, so the watchdog stays off there.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass

from workflow import gpu, lifeline
from workflow.artifacts import verify_inputs
from workflow.eval_worker import WORKER_MODULES

log = logging.getLogger("workflow.launch")

RDZV_PORT = 29400  # torchrun's c10d default; the base of the port when HEAD is another host
# "exec": exec a second interpreter even where in-process would do; "inprocess": no evaluation
# worker; unset or "worker": evaluation and merge jobs run in a warm worker (eval_worker/).
MODE_ENV = "LRMERGE_LAUNCH"


@dataclass(frozen=True)
class SlurmJob:
    """What the multi-node command needs from the SLURM job the launcher runs in."""

    job_id: str
    hosts: tuple[str, ...]  # the job's nodes, in order; hosts[0] holds the rendezvous
    tasks: int | None = None  # tasks the job may start
    cpus_per_task: int | None = None  # given to srun: 22.05's srun no longer reads it from the env
    port: int = RDZV_PORT

    @classmethod
    def query(cls, job_id: str) -> SlurmJob:
        """The job's hosts, tasks and CPUs per task, from ``scontrol``: the job's own SLURM_*
        variables may be gone (the slurm executor plugin's jobstep drops all but the job id)."""
        scontrol = shutil.which("scontrol")
        if scontrol is None:
            raise ValueError("launch: --nodes > 1 needs scontrol (SLURM's client) on PATH")

        def run(*args: str) -> str:
            return subprocess.run([scontrol, *args], check=True, capture_output=True,
                                  text=True).stdout

        fields = dict(re.findall(r"(\S+?)=(\S*)", run("show", "job", "-o", job_id)))
        hosts = tuple(run("show", "hostnames", fields.get("NodeList", "")).split())
        if not hosts:
            raise ValueError(f"launch: scontrol shows no host for SLURM job {job_id}")
        if hosts[0] == socket.gethostname().split(".")[0]:
            port = _free_port()  # the usual case: the batch script runs on the first host
        else:  # no way to ask that host: a port of its own per job
            port = RDZV_PORT + 1 + int(job_id) % 1000
        tasks, cpus = fields.get("NumTasks", ""), fields.get("CPUs/Task", "")
        return cls(job_id, hosts, int(tasks) if tasks.isdigit() else None,
                   int(cpus) if cpus.isdigit() else None, port)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def build_command(module: str, args: list[str], nproc: int, nodes: int = 1,
                  slurm: SlurmJob | None = None) -> list[str]:
    """The argv that runs ``python -m module args`` in ``nproc`` processes on each of ``nodes``
    nodes (one process runs through ``workflow.lifeline``, which arms the stage to die with
    its job; more than one node needs the SLURM job to run in)."""
    if nproc < 1:
        raise ValueError(f"launch: --nproc must be >= 1, got {nproc}")
    if nodes < 1:
        raise ValueError(f"launch: --nodes must be >= 1, got {nodes}")
    if nodes == 1 and nproc == 1:
        return [sys.executable, "-m", "workflow.lifeline", module, *args]
    if nodes == 1:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            module,
            *args,
        ]
    if slurm is None:
        raise ValueError(
            f"launch: --nodes {nodes} (resources.<stage>.nodes) starts one torchrun per node "
            "with srun and needs a SLURM job; this is none (SLURM_JOB_ID is unset): submit "
            "with --profile profiles/slurm, or set nodes to 1")
    if slurm.tasks is not None and nodes > slurm.tasks:
        raise ValueError(
            f"launch: --nodes {nodes} needs {nodes} SLURM tasks, job {slurm.job_id} has "
            f"{slurm.tasks} (sbatch --nodes {nodes} --ntasks {nodes})")
    used = min(nodes, len(slurm.hosts))
    srun = ["srun", "--nodes", str(used), "--ntasks", str(nodes),
            "--ntasks-per-node", str(math.ceil(nodes / used)), "--kill-on-bad-exit=1"]
    if slurm.cpus_per_task:
        srun += ["--cpus-per-task", str(slurm.cpus_per_task)]
    return [
        *srun,
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(nodes),
        "--nproc-per-node",
        str(nproc),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"{slurm.hosts[0]}:{slurm.port}",
        "--rdzv-id",
        slurm.job_id,
        "-m",
        module,
        *args,
    ]


def run_in_process(command: list[str], env: dict[str, str]) -> None:
    """Run ``python -m MODULE ARGS`` (``command``) in this interpreter, as it runs after an
    exec of ``workflow.lifeline``: with ``env`` as the environment (set before the stage imports
    torch, which reads the thread and device variables once) and the lifeline armed."""
    os.environ.update(env)
    # The stage configures logging itself, as a fresh interpreter would let it.
    for handler in logging.root.handlers[:]:
        logging.root.removeHandler(handler)
    logging.root.setLevel(logging.WARNING)
    lifeline.main(command)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m workflow.launch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--gpus", type=int, required=True, help="GPUs to lease (0: CPU)")
    parser.add_argument("--nproc", type=int, default=None,
                        help="processes per node (default max(1, N))")
    parser.add_argument("--nodes", type=int, default=1,
                        help="nodes: one torchrun each, started by srun (SLURM only)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of the whole job (per node)")
    parser.add_argument("--lease-timeout", type=float, default=None, help="seconds; default wait")
    parser.add_argument("--verify", nargs="*", default=[], metavar="ARTIFACT",
                        help="input artifact directories to check against their manifests "
                        "before anything starts (workflow.artifacts.verify_inputs)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- MODULE ARGS...")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the stage to run after --, e.g. -- workflow.train ct ...")
    if args.gpus < 0:
        parser.error(f"--gpus must be >= 0, got {args.gpus}")
    nproc = args.nproc if args.nproc is not None else max(1, args.gpus)
    env = dict(os.environ)
    try:
        slurm = None
        if args.nodes > 1 and gpu.under_slurm():
            slurm = SlurmJob.query(env["SLURM_JOB_ID"])
        # Checked first: a multi-node job outside SLURM fails before anything is read or leased.
        argv_out = build_command(command[0], command[1:], nproc, args.nodes, slurm)
        # A damaged input fails here, naming the file, before a GPU is leased or a model loaded.
        verify_inputs(args.verify)
        if gpu.under_slurm():
            log.info("SLURM job %s: using its allocation as is", env["SLURM_JOB_ID"])
        elif args.gpus:
            ids, fds = gpu.acquire(args.gpus, timeout=args.lease_timeout)
            for fd in fds:  # the locks must outlive the exec below
                os.set_inheritable(fd, True)
            env["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
            log.info("leased GPU(s) %s", env["CUDA_VISIBLE_DEVICES"])
        else:
            env["CUDA_VISIBLE_DEVICES"] = ""
    except (ValueError, TimeoutError) as error:  # IntegrityError is a ValueError
        sys.exit(f"error: {error}")
    except subprocess.CalledProcessError as error:
        sys.exit(f"error: launch: {shlex.join(error.cmd)} failed: {error.stderr.strip()}")
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(max(1, args.threads // nproc))
    # No lease to hand over: the stage may run here instead of in an exec'd interpreter.
    mode = env.get(MODE_ENV, "").strip().lower()
    in_process = (nproc == 1 and args.nodes == 1 and (not args.gpus or gpu.under_slurm())
                  and mode != "exec")
    worker = (in_process and command[0] in WORKER_MODULES and not gpu.under_slurm()
              and mode in ("", "worker"))
    log.info("running %s%s", shlex.join(command if in_process else argv_out),
             " in a warm worker" if worker else " in this process" if in_process else "")
    lifeline.prepare_exec(env)  # the stage (or srun) dies with its job (workflow/lifeline.py)
    if worker:
        from workflow.eval_worker import client as eval_worker

        try:
            code = eval_worker.run(command, env)
        except Exception as error:  # noqa: BLE001 - the job can still run here
            log.warning("warm worker failed (%r); running the job here", error)
            code = None
        if code is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.exit(code)
        log.info("running %s in this process", shlex.join(command))
    if in_process:
        sys.stdout.flush()
        run_in_process(command, env)
        return
    if slurm is not None:
        # The owner's and root's pids are this node's: on another node they would name no
        # process (or a stranger), so the srun tasks run without the watchdog.
        env.pop(lifeline.OWNER_ENV, None)
        env.pop(lifeline.ROOT_ENV, None)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv_out[0], argv_out, env)


if __name__ == "__main__":
    main()
