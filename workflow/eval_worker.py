"""Warm evaluation workers: each evaluation job a thin client of a process that imported already.

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
- Worker. Listens on the Unix socket ``slot-<i>.sock`` (a short path under /tmp, keyed by a
  hash, when that path is too long for AF_UNIX). Where nothing answers, the client starts it
  detached (its own session, output to ``slot-<i>.log``) and waits for the socket. It imports
  torch, transformers, lm-eval and workflow.evaluate first, inside the job's kind of HF cache
  settings (see Modes), and then serves one job at a time; lm-eval's TaskManager stays cached
  between jobs (``workflow.evaluate.make_task_manager``).
- A job. The client sends ``{argv, env, cwd, fingerprint}`` and its fds 1 and 2 (SCM_RIGHTS).
  The worker puts those fds on its own 1 and 2, the job's environment in ``os.environ``,
  chdirs, sets torch's threads from OMP_NUM_THREADS, resets logging, runs
  ``workflow.evaluate.main(argv)`` and answers the exit status a fresh process would have had
  (SystemExit's code, 1 and the traceback on the job's stderr for an exception). The job's
  log file gets what a fresh process would have written there; scores are the same (the
  evaluation seeds every generator itself; tests/test_eval_worker.py compares).
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

    python -m workflow.eval_worker --dir SLOTDIR --slot I --socket PATH --owner PID-START
        --mode offline|registry
(started by the client, as ``python -c WORKER_MAIN PROJECT ...`` so that it finds this package
with the job's PYTHONPATH untouched; not meant to be run by hand)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import hashlib
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

from workflow import lifeline

log = logging.getLogger("workflow.eval_worker")

PACKAGE = Path(__file__).resolve().parent
IDLE_ENV = "LRMERGE_WORKER_IDLE"  # seconds without a job before a worker exits
MAX_RSS_ENV = "LRMERGE_WORKER_MAX_RSS_MB"  # a worker above this after a job exits
START_TIMEOUT_ENV = "LRMERGE_WORKER_START_TIMEOUT"  # seconds a client waits for a new worker
TAG_ENV = "LRMERGE_WORKER_TAG"  # mixed into the fingerprint: a new value, new workers
# Variables the HF libraries, torch and the interpreter read once, at import or start-up.
IMPORT_ENV_PREFIXES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH", "PYTORCH_", "CUDA_",
                       "TOKENIZERS_", "XDG_CACHE_HOME", "PYTHONPATH", "PYTHONHASHSEED", TAG_ENV)
SOCKET_PATH_MAX = 107  # AF_UNIX sun_path holds 108 bytes, NUL included
OFFLINE_TASKS = ("topic", "bpb")  # workflow.evaluate.OFFLINE_TASKS (checked in the tests)
_HEADER = 4  # bytes of a request's length prefix
# ``python -m workflow.eval_worker`` from this package's directory, wherever the job's working
# directory is, with the job's environment untouched (PYTHONPATH is in the fingerprint).
WORKER_MAIN = ("import sys; sys.path.insert(0, sys.argv.pop(1)); "
               "from workflow.eval_worker import main; main()")
_held: list[int] = []  # the slot lock of this client, held until it exits


# ----------------------------------------------------------------------------- shared


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


def job_mode(argv: list[str]) -> str:
    """"offline" when the job's recipe asks only for the project's offline tasks (they run
    with the HF libraries imported offline), else "registry"."""
    try:
        recipe = json.loads(argv[argv.index("--recipe") + 1])
        tasks = [t for spec in recipe["suites"].values() for t in spec["tasks"]]
    except (ValueError, IndexError, KeyError, TypeError, AttributeError):
        return "offline"  # a bad recipe: evaluate reports it, in whichever worker
    return "offline" if all(t in OFFLINE_TASKS for t in tasks) else "registry"


def slot_socket(slot_dir: Path, slot: int) -> Path | None:
    """The socket of ``slot``: in the slot directory, or under /tmp where that path is too
    long for AF_UNIX; None if even that is."""
    path = slot_dir / f"slot-{slot}.sock"
    if len(os.fsencode(path)) <= SOCKET_PATH_MAX:
        return path
    key = hashlib.sha256(os.fsencode(slot_dir)).hexdigest()[:16]
    short = Path(tempfile.gettempdir()) / f"lrmerge-ew-{os.getuid()}" / f"{key}-{slot}.sock"
    return short if len(os.fsencode(short)) <= SOCKET_PATH_MAX else None


def _send_json(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


def _recv_line(sock: socket.socket, limit: int = 1 << 20) -> dict[str, Any] | None:
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


# ----------------------------------------------------------------------------- client


def _owner_key(env: dict[str, str]) -> str | None:
    owner = lifeline._parse(env.get(lifeline.OWNER_ENV))
    return None if owner is None else f"{owner[0]}-{owner[1]}"


def _prune(root: Path, mine: str) -> None:
    """Remove the slot directories of runs whose owner is gone (locks, logs, pid files)."""
    for entry in root.iterdir() if root.is_dir() else ():
        pid, _, start = entry.name.partition("-")
        if entry.name == mine or not (pid.isdigit() and start.isdigit()):
            continue
        if not lifeline.alive((int(pid), int(start))):
            shutil.rmtree(entry, ignore_errors=True)


def _take_slot(slot_dir: Path) -> tuple[int, int] | None:
    """(slot, fd of its held lock), or None when every slot is busy."""
    for slot in range(max(1, os.cpu_count() or 1)):
        fd = os.open(slot_dir / f"slot-{slot}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return slot, fd
    return None


def _connect(path: Path) -> tuple[socket.socket, dict[str, Any]] | None:
    """A connection to the worker listening on ``path`` and its hello; None if none answers."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(30)
        sock.connect(str(path))
        hello = _recv_line(sock)  # a worker that was ending closes without one
        if hello is None or "pid" not in hello:
            raise ConnectionError("no hello")
        sock.settimeout(None)
        return sock, hello
    except (OSError, ValueError):
        sock.close()
        return None


def _wait_gone(pid: int, timeout: float) -> None:
    who = lifeline.ident(pid)
    deadline = time.monotonic() + timeout
    while who is not None and lifeline.alive(who):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
        time.sleep(0.05)


def _start_worker(slot_dir: Path, slot: int, path: Path, owner: str, mode: str,
                  env: dict[str, str]) -> tuple[socket.socket, dict[str, Any]] | None:
    """Start slot ``slot``'s worker, detached, and connect to it; None (logged) if it does
    not answer within LRMERGE_WORKER_START_TIMEOUT seconds (default 60)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a dead worker's; only the slot's lock holder gets here
    logfile = slot_dir / f"slot-{slot}.log"
    with open(logfile, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", WORKER_MAIN, str(PACKAGE.parent), "--dir", str(slot_dir),
             "--slot", str(slot), "--socket", str(path), "--owner", owner, "--mode", mode],
            env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            start_new_session=True,  # Ctrl-C of Snakemake's terminal reaches the clients
        )
    timeout = float(env.get(START_TIMEOUT_ENV, "60"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.info("eval worker: a new worker exited (%s) at start; see %s",
                     proc.returncode, logfile)
            return None
        if path.exists() and (connected := _connect(path)) is not None:
            return connected
        time.sleep(0.05)
    proc.kill()
    log.info("eval worker: a new worker did not answer within %.0f s; see %s", timeout, logfile)
    return None


def run(command: list[str], env: dict[str, str]) -> int | None:
    """Run the evaluation ``command`` (``workflow.evaluate ARGS``) in a warm worker of this
    Snakemake run; returns its exit status, or None (the reason logged) when no worker can
    be used and the caller should run it itself."""
    owner = _owner_key(env)
    if owner is None:
        log.info("eval worker: the job has no owner (LRMERGE_JOB_OWNER); running in process")
        return None
    argv, cwd = command[1:], os.getcwd()
    mode = job_mode(argv)
    root = Path(cwd) / ".cache" / "lrmerge" / "eval-worker"
    slot_dir = root / owner
    try:
        slot_dir.mkdir(parents=True, exist_ok=True)
        taken = _take_slot(slot_dir)
    except OSError as error:
        log.info("eval worker: no slot directory (%s); running in process", error)
        return None
    if taken is None:
        log.info("eval worker: every slot in %s is busy; running in process", slot_dir)
        return None
    slot, lock_fd = taken
    _held.append(lock_fd)  # held until this process ends: the worker is this job's
    path = slot_socket(slot_dir, slot)
    if path is None:
        log.info("eval worker: no socket path short enough for %s; running in process",
                 slot_dir)
        return None
    # The client is the stage's process now: armed as an in-process stage would be.
    os.environ.update(env)
    lifeline.arm()
    wanted = fingerprint(env, mode)
    request = json.dumps({"argv": argv, "env": env, "cwd": cwd, "fingerprint": wanted}).encode()
    for attempt in range(3):
        connected = _connect(path) if path.exists() else None
        if connected is None:
            if attempt == 0:
                _prune(root, owner)
            connected = _start_worker(slot_dir, slot, path, owner, mode, env)
            if connected is None:
                _no_worker()
                return None
        sock, hello = connected
        pid = int(hello["pid"])
        log.info("eval worker: job runs in worker pid %d (slot %d, %s)", pid, slot, slot_dir)
        _die_with(pid)
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            socket.send_fds(sock, [len(request).to_bytes(_HEADER, "big") + request], [1, 2])
            reply = _recv_line(sock)
        except OSError:
            reply = None
        finally:
            sock.close()
        if reply is None:  # the worker ended before answering: it was ending anyway
            log.info("eval worker: worker %d closed without an answer; starting another", pid)
            _wait_gone(pid, 5)
            continue
        if reply.get("stale"):
            log.info("eval worker: worker %d runs other code or settings; starting another",
                     pid)
            _wait_gone(pid, 10)
            continue
        return int(reply["rc"])
    log.info("eval worker: no worker took the job; running in process")
    _no_worker()
    return None


_saved_handlers: dict[int, Any] = {}


def _die_with(pid: int) -> None:
    """From here on a SIGTERM or SIGINT of this client ends the worker running its job."""

    def handler(signum: int, frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        os._exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.signal(sig, handler)
        _saved_handlers.setdefault(sig, previous)


def _no_worker() -> None:
    """The job runs in the client after all: its signals act as before."""
    for sig, previous in _saved_handlers.items():
        signal.signal(sig, previous)
    _saved_handlers.clear()


# ----------------------------------------------------------------------------- worker


class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.slot_dir: Path = args.dir
        self.slot: int = args.slot
        self.path: Path = args.socket
        self.owner = lifeline._parse(args.owner.replace("-", ":"))
        self.mode: str = args.mode
        self.idle = float(os.environ.get(IDLE_ENV, "300"))
        self.max_rss = float(os.environ.get(MAX_RSS_ENV, "6000"))
        self.fingerprint = fingerprint(dict(os.environ), self.mode)  # before any import
        self.jobs = 0

    def say(self, message: str, *args: Any) -> None:
        log.info(f"slot {self.slot} pid {os.getpid()}: {message}", *args)

    def warm_up(self) -> None:
        """Import what an evaluation imports, within the HF settings of this mode's jobs."""
        from workflow import evaluate

        scratch = Path(tempfile.mkdtemp(prefix="lrmerge-eval-worker-"))
        try:
            with evaluate.isolated_caches(scratch, offline=self.mode == "offline"):
                import datasets  # noqa: F401
                import lm_eval  # noqa: F401
                import lm_eval.evaluator  # noqa: F401
                import lm_eval.tasks  # noqa: F401
                import torch  # noqa: F401
                import transformers  # noqa: F401
                from lm_eval.models.huggingface import HFLM  # noqa: F401
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def serve(self) -> None:
        start = time.monotonic()
        self.warm_up()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        listener.bind(str(self.path))
        os.chmod(self.path, 0o600)
        listener.listen(4)
        (self.slot_dir / f"slot-{self.slot}.pid").write_text(f"{os.getpid()}\n")
        self.say("ready in %.1f s (%s mode), owner pid %d", time.monotonic() - start,
                 self.mode, self.owner[0])
        last = time.monotonic()
        while True:
            if not lifeline.alive(self.owner):
                self.say("the owner (pid %d) is gone; exiting", self.owner[0])
                return
            if time.monotonic() - last > self.idle:
                self.say("idle for %.0f s; exiting", self.idle)
                return
            if not select.select([listener], [], [], 1.0)[0]:
                continue
            conn, _ = listener.accept()
            with conn:
                try:
                    verdict = self.handle(conn)
                except (OSError, ValueError, KeyError, TypeError) as error:
                    self.say("a bad request or a client gone (%r); next", error)
                    verdict = None
            if verdict == "exit":
                return
            last = time.monotonic()

    def handle(self, conn: socket.socket) -> str | None:
        """Serve one connection; "exit" when this worker should end after it."""
        if _peer_uid(conn) != os.getuid():
            return None  # the socket is the user's (0600); a stranger never gets in
        _send_json(conn, {"pid": os.getpid(), "fingerprint": self.fingerprint})
        data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 2)
        try:
            if len(fds) != 2 or len(data) < _HEADER:
                return None  # a client that went away, or not one
            size = int.from_bytes(data[:_HEADER], "big")
            data = data[_HEADER:]
            while len(data) < size:
                chunk = conn.recv(min(1 << 20, size - len(data)))
                if not chunk:
                    return None
                data += chunk
            request = json.loads(data)
            if request.get("fingerprint") != self.fingerprint:
                self.say("a job for other code or settings; exiting for a fresh worker")
                _send_json(conn, {"stale": True})
                return "exit"
            self.jobs += 1
            self.say("job %d: %s", self.jobs, " ".join(request["argv"][:1] + ["..."]))
            done = threading.Event()
            threading.Thread(target=self.watch, args=(conn, done), daemon=True).start()
            began = time.monotonic()
            rc = self.run_job(request, fds)
            done.set()
        finally:
            for fd in fds:
                os.close(fd)
        gc.collect()
        _send_json(conn, {"rc": rc})
        rss = _rss_mb()
        self.say("job %d: exit %d in %.2f s; RSS %.0f MB", self.jobs, rc,
                 time.monotonic() - began, rss)
        if rss > self.max_rss:
            self.say("RSS above %s=%.0f MB; exiting", MAX_RSS_ENV, self.max_rss)
            return "exit"
        return None

    def watch(self, conn: socket.socket, done: threading.Event) -> None:
        """During a job: end this worker at once when the client goes away (its connection
        closes: it was killed) or the owner does."""
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN | select.POLLHUP)
        while not done.is_set():
            closed = False
            if poller.poll(1000):
                with contextlib.suppress(OSError):
                    closed = conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
                if not closed:
                    time.sleep(0.1)  # something unexpected to read: leave it, look again
            gone = not lifeline.alive(self.owner)
            if (closed or gone) and not done.is_set():
                why = "the client closed its connection" if closed else "the owner is gone"
                self.say("%s during job %d; exiting", why, self.jobs)
                _cleanup_task_dirs()
                os._exit(1)

    def run_job(self, request: dict[str, Any], fds: list[int]) -> int:
        """Run ``workflow.evaluate.main(argv)`` as a fresh process would: the job's fds 1
        and 2, environment and working directory; returns its exit status."""
        import torch

        from workflow import evaluate

        sys.stdout.flush()
        sys.stderr.flush()
        saved_fds = [os.dup(1), os.dup(2)]
        saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
        handlers = logging.root.handlers[:]
        rc = 1
        try:
            os.dup2(fds[0], 1)
            os.dup2(fds[1], 2)
            os.environ.clear()
            os.environ.update(request["env"])
            os.chdir(request["cwd"])
            threads = request["env"].get("OMP_NUM_THREADS", "")
            if threads.isdigit() and int(threads) > 0:
                torch.set_num_threads(int(threads))
            for handler in logging.root.handlers[:]:
                logging.root.removeHandler(handler)
            logging.root.setLevel(logging.WARNING)
            sys.argv = ["workflow.evaluate", *request["argv"]]
            with contextlib.suppress(AttributeError):  # "once" warnings: once per job
                warnings._filters_mutated()
            try:
                evaluate.main(request["argv"])
                rc = 0
            except SystemExit as stop:
                if stop.code is None:
                    rc = 0
                elif isinstance(stop.code, int):
                    rc = stop.code
                else:
                    print(stop.code, file=sys.stderr)
                    rc = 1
            except BaseException:  # noqa: BLE001 - a fresh process would die with it too
                traceback.print_exc()
                rc = 1
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            for handler in logging.root.handlers[:]:
                logging.root.removeHandler(handler)
                if handler not in handlers:
                    with contextlib.suppress(Exception):
                        handler.close()
            for handler in handlers:
                logging.root.addHandler(handler)
            sys.argv = saved_argv
            os.chdir(saved_cwd)
            os.environ.clear()
            os.environ.update(saved_env)
            os.dup2(saved_fds[0], 1)
            os.dup2(saved_fds[1], 2)
            for fd in saved_fds:
                os.close(fd)
        return rc


def _peer_uid(conn: socket.socket) -> int:
    import struct

    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[2]


def _rss_mb() -> float:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _cleanup_task_dirs() -> None:
    """What the atexit hooks would remove, for an exit that skips them."""
    evaluate = sys.modules.get("workflow.evaluate")
    root = getattr(evaluate, "_task_root", None)
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


def _terminated(signum: int, frame: Any) -> None:
    """SIGTERM (a lifeline ending the job's processes): end now, even mid-job (a SystemExit
    there would pass for the job's own exit status)."""
    log.info("slot worker pid %d: SIGTERM; exiting", os.getpid())
    _cleanup_task_dirs()
    os._exit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workflow.eval_worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True, help="the run's slot directory")
    parser.add_argument("--slot", type=int, required=True)
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--owner", required=True, help="PID-START of the owning Snakemake")
    parser.add_argument("--mode", choices=("offline", "registry"), required=True)
    args = parser.parse_args(argv)
    # The worker's own messages go to its log (fd 2 now); a job's logging is the job's.
    handler = logging.StreamHandler(os.fdopen(os.dup(2), "w", buffering=1))
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    if lifeline._parse(args.owner.replace("-", ":")) is None:
        parser.error(f"--owner must be PID-START, got {args.owner!r}")
    signal.signal(signal.SIGTERM, _terminated)
    Worker(args).serve()


if __name__ == "__main__":
    main()
