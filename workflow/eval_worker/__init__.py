"""Warm evaluation workers: each evaluation (or merge) job a thin client of a process that
imported already.

An evaluation job's time is mostly fixed cost: importing torch, transformers and lm-eval and
building lm-eval's tasks (~6 s of CPU) against well under a second of scoring on small models.
Grouping evaluations into one Snakemake job would share that cost but loses what a job per
score gives (its own content-addressed file, rerun alone when missing: Snakemake deletes every
output of a job before running it). So every score stays its own job, and the job hands its
work to a long-lived process of the same Snakemake run that has paid the fixed cost once:

- Slots. A run's workers live in ``<cwd>/.cache/lrmerge/eval-worker/<owner>/`` (owner: the
  Snakemake process that owns the job, ``LRMERGE_JOB_OWNER`` of workflow/lifeline.py, as
  ``pid-starttime``; a job without an owner uses no worker). The client takes a non-blocking
  ``flock`` on ``slot-<i>.lock``, i = 0, 1, ... (at most one per CPU), and holds it for the
  whole job: one job per worker at a time, and concurrent jobs (``--cores 2``) get different
  workers. Only the holder of a slot's lock ever starts its worker.
- Worker. Listens on a Unix socket under the temp directory (``lrmerge-ew-<uid>/<hash of the
  slot directory>-<i>.sock``: not in the working directory, which stays copyable; removed when
  the worker ends). Where nothing answers, the client starts it
  detached (its own session, output to ``slot-<i>.log``) and waits for the socket. It imports
  torch, transformers, lm-eval and workflow.evaluate first, inside the job's kind of HF cache
  settings (see Modes), and then serves one job at a time; lm-eval's TaskManager stays cached
  between jobs (``workflow.evaluate.make_task_manager``).
- A job. The client sends ``{module, argv, env, cwd, fingerprint}`` and its fds 1 and 2
  (SCM_RIGHTS). The worker puts those fds on its own 1 and 2, the job's environment in
  ``os.environ``, chdirs, sets torch's threads from OMP_NUM_THREADS, resets logging, runs
  ``main(argv)`` of the module (``workflow.evaluate``, or ``workflow.merge``: merge jobs of
  small models are mostly importing torch too; WORKER_MODULES) and answers the exit status
  a fresh process would have had (SystemExit's code, 1 and the traceback on the job's stderr
  for an exception). The job's
  log file gets what a fresh process would have written there; scores and merged weights are
  the same (the evaluation seeds every generator itself; tests/test_eval_worker.py compares).
- Exit. A worker ends when the owner is gone (polled every second), after
  LRMERGE_WORKER_IDLE seconds without a job (default 300), after a job that leaves it above
  LRMERGE_WORKER_MAX_RSS_MB (default 6000), or when a request's code fingerprint differs from
  its own: a hash of the workflow package's ``*.py`` and task YAMLs, the interpreter, the
  environment read at import time (HF_*, TORCH*, CUDA_*, PYTHONPATH, ...) and the mode; the
  client then starts a fresh worker. Editing the code mid-run never runs a job on old code.
- Dying with the job. The client runs in the launcher's process, armed by the lifeline like an
  in-process stage. On SIGTERM or SIGINT (the job's shell died, Snakemake cancels the job) it
  SIGKILLs the worker (its pid comes in the worker's hello) and exits 128 + signal. If the
  client is SIGKILLed, the worker's watchdog thread sees the connection close and the worker
  exits at once. Either way no job runs on after its client; the next job starts a new worker.
- Modes. Offline suites (``topic``/``bpb`` only) make a fresh evaluation import the HF
  libraries with HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set (``isolated_caches``), registry tasks
  with the user's settings; both read them once, at import. A worker therefore imports within
  the same settings as the jobs it serves, and the mode is part of the fingerprint.

Not under SLURM (a batch job's allocation is its own) and not for GPU jobs (they hold a device
lease in the launcher). ``LRMERGE_LAUNCH=inprocess`` or ``exec`` opts out (workflow/launch.py).
Merge-on-load inputs are not cached in the worker: ``workflow.merge.engine`` reads them as
zero-copy views of memory-mapped files, so a sweep's variants read them from the page cache
already, and a cache would only pin their pages in the worker.

Modules: this one holds what both sides share (the fingerprint, slots' socket paths, the wire
format); ``client`` what a job's launcher runs (:func:`workflow.eval_worker.client.run`);
``server`` the worker process.

    python -m workflow.eval_worker.server --dir SLOTDIR --slot I --socket PATH --owner PID-START
        --mode offline|registry
(started by the client, as ``python -c WORKER_MAIN PROJECT ...`` so that it finds this package
with the job's PYTHONPATH untouched; not meant to be run by hand)
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

PACKAGE = Path(__file__).resolve().parent.parent  # workflow/
IDLE_ENV = "LRMERGE_WORKER_IDLE"  # seconds without a job before a worker exits
MAX_RSS_ENV = "LRMERGE_WORKER_MAX_RSS_MB"  # a worker above this after a job exits
START_TIMEOUT_ENV = "LRMERGE_WORKER_START_TIMEOUT"  # seconds a client waits for a new worker
TAG_ENV = "LRMERGE_WORKER_TAG"  # mixed into the fingerprint: a new value, new workers
# Variables the HF libraries, torch and the interpreter read once, at import or start-up.
IMPORT_ENV_PREFIXES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH", "PYTORCH_", "CUDA_",
                       "TOKENIZERS_", "XDG_CACHE_HOME", "PYTHONPATH", "PYTHONHASHSEED", TAG_ENV)
SOCKET_PATH_MAX = 107  # AF_UNIX sun_path holds 108 bytes, NUL included
OFFLINE_TASKS = ("topic", "bpb")  # workflow.evaluate.OFFLINE_TASKS (checked in the tests)
HEADER = 4  # bytes of a request's length prefix
# The stages a worker runs: single-process CPU jobs whose own work is small against importing
# torch (merges of small models take ~0.4 s of a 2 s job). Each module's main(argv) is the job.
WORKER_MODULES = ("workflow.evaluate", "workflow.merge")
# ``python -m workflow.eval_worker`` from this package's directory, wherever the job's working
# directory is, with the job's environment untouched (PYTHONPATH is in the fingerprint).
WORKER_MAIN = ("import sys; sys.path.insert(0, sys.argv.pop(1)); "
               "from workflow.eval_worker.server import main; main()")




def fingerprint(env: dict[str, str], mode: str) -> str:
    """What a worker's results depend on besides a job's argv: the code, the interpreter, the
    environment read at import time, and the mode."""
    digest = hashlib.sha256()
    files = sorted([*PACKAGE.rglob("*.py"), *(PACKAGE / "tasks").glob("*.yaml")])
    for path in files:
        digest.update(str(path.relative_to(PACKAGE)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    digest.update(sys.executable.encode() + b"\0" + mode.encode() + b"\0")
    for key in sorted(env):
        if key.startswith(IMPORT_ENV_PREFIXES):
            digest.update(f"{key}={env[key]}\0".encode())
    return digest.hexdigest()


def job_mode(module: str, argv: list[str]) -> str:
    """"offline" when the job's recipe asks only for the project's offline tasks (they run
    with the HF libraries imported offline), else "registry". A merge imports no HF library:
    any worker serves it, "offline" ones by convention."""
    if module != "workflow.evaluate":
        return "offline"
    try:
        recipe = json.loads(argv[argv.index("--recipe") + 1])
        tasks = [t for spec in recipe["suites"].values() for t in spec["tasks"]]
    except (ValueError, IndexError, KeyError, TypeError, AttributeError):
        return "offline"  # a bad recipe: evaluate reports it, in whichever worker
    return "offline" if all(t in OFFLINE_TASKS for t in tasks) else "registry"


def slot_socket(slot_dir: Path, slot: int) -> Path | None:
    """The socket of ``slot``: under the temp directory, keyed by a hash of the slot directory,
    never in the working directory (a socket file there would break copying it, and a path
    inside it may be too long for AF_UNIX); None if even that path is too long."""
    key = hashlib.sha256(os.fsencode(slot_dir.resolve())).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"lrmerge-ew-{os.getuid()}" / f"{key}-{slot}.sock"
    return path if len(os.fsencode(path)) <= SOCKET_PATH_MAX else None


def send_json(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


def recv_line(sock: socket.socket, limit: int = 1 << 20) -> dict[str, Any] | None:
    """One JSON line; None when the peer closed first."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            return None
        data += chunk
        if len(data) > limit:
            raise ValueError("eval worker: reply too long")
    return json.loads(data)
