"""Start a training stage on the job's GPUs: lease device ids, then one process or torchrun.

    python -m workflow.launch --gpus N [--nproc P] [--threads T] -- workflow.train ct ARGS...

--gpus is the rule's ``resources.gpu``. Locally, N device ids are leased (workflow.gpu: lock
files, waits while they are taken) and CUDA_VISIBLE_DEVICES is set to them; N = 0 hides every
GPU. Under SLURM the allocation is used as it is. P processes (default max(1, N)) are started:
P = 1 runs the module in this process's place; P > 1 runs it under torchrun (torch's
``torch.distributed.run --standalone``: a free local port, DDP; FSDP when the recipe asks the
Trainer for it), with gloo on CPU, which is how tests/test_ddp.py runs two CPU processes.

The launcher replaces itself with the command (exec), so Snakemake's signals reach torchrun or
the stage directly, and the lock files stay held by that process until it ends. Before the exec
it arms the lifeline (workflow/lifeline.py): the stage dies with the job's shell, and records
the job's owner (Snakemake) for the stage's watchdog, so a killed Snakemake leaves no orphan.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

from workflow import gpu, lifeline
from workflow.artifacts import verify_inputs

log = logging.getLogger("workflow.launch")


def build_command(module: str, args: list[str], nproc: int) -> list[str]:
    """The argv that runs ``python -m module args`` in ``nproc`` processes (one process runs
    through ``workflow.lifeline``, which arms the stage to die with its job)."""
    if nproc < 1:
        raise ValueError(f"launch: --nproc must be >= 1, got {nproc}")
    if nproc == 1:
        return [sys.executable, "-m", "workflow.lifeline", module, *args]
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m workflow.launch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--gpus", type=int, required=True, help="GPUs to lease (0: CPU)")
    parser.add_argument("--nproc", type=int, default=None, help="processes (default max(1, N))")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of the whole job")
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
        argv_out = build_command(command[0], command[1:], nproc)
    except (ValueError, TimeoutError) as error:  # IntegrityError is a ValueError
        sys.exit(f"error: {error}")
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(max(1, args.threads // nproc))
    log.info("running %s", shlex.join(argv_out))
    lifeline.prepare_exec(env)  # the stage dies with its job (workflow/lifeline.py)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv_out[0], argv_out, env)


if __name__ == "__main__":
    main()
