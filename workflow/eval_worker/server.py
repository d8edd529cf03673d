"""The worker process of workflow/eval_worker (started by the client; not meant to be run by
hand)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import logging
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

from workflow import lifeline
from workflow.eval_worker import (
    HEADER,
    IDLE_ENV,
    MAX_RSS_ENV,
    WORKER_MODULES,
    fingerprint,
    send_json,
)

log = logging.getLogger("workflow.eval_worker")


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

                import workflow.merge.__main__  # noqa: F401
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
        try:
            self.loop(listener)
        finally:
            listener.close()
            with contextlib.suppress(OSError):
                self.path.unlink()

    def loop(self, listener: socket.socket) -> None:
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
        send_json(conn, {"pid": os.getpid(), "fingerprint": self.fingerprint})
        data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 2)
        try:
            if len(fds) != 2 or len(data) < HEADER:
                return None  # a client that went away, or not one
            size = int.from_bytes(data[:HEADER], "big")
            data = data[HEADER:]
            while len(data) < size:
                chunk = conn.recv(min(1 << 20, size - len(data)))
                if not chunk:
                    return None
                data += chunk
            request = json.loads(data)
            if request.get("fingerprint") != self.fingerprint:
                self.say("a job for other code or settings; exiting for a fresh worker")
                send_json(conn, {"stale": True})
                return "exit"
            self.jobs += 1
            self.say("job %d: %s %s ...", self.jobs, request.get("module"),
                     " ".join(request["argv"][:1]))
            done = threading.Event()
            threading.Thread(target=self.watch, args=(conn, done), daemon=True).start()
            began = time.monotonic()
            rc = self.run_job(request, fds)
            done.set()
        finally:
            for fd in fds:
                os.close(fd)
        gc.collect()
        send_json(conn, {"rc": rc})
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

        module = request.get("module", "workflow.evaluate")
        if module not in WORKER_MODULES:
            print(f"eval worker: {module} is not one of {WORKER_MODULES}", file=sys.stderr)
            return 2
        stage = importlib.import_module(module)
        if not hasattr(stage, "main"):  # a package: ``python -m`` runs its __main__
            stage = importlib.import_module(f"{module}.__main__")

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
            sys.argv = [module, *request["argv"]]
            with contextlib.suppress(AttributeError):  # "once" warnings: once per job
                warnings._filters_mutated()
            try:
                stage.main(request["argv"])
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
