"""The client side of workflow/eval_worker: what an evaluation job's launcher runs (:func:`run`)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from workflow import lifeline
from workflow.eval_worker import (
    HEADER,
    PACKAGE,
    START_TIMEOUT_ENV,
    WORKER_MAIN,
    fingerprint,
    job_mode,
    recv_line,
    slot_socket,
)

log = logging.getLogger("workflow.eval_worker")
_held: list[int] = []  # the slot lock of this client, held until it exits


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
        hello = recv_line(sock)  # a worker that was ending closes without one
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
    """Run ``command`` (``MODULE ARGS``, MODULE one of WORKER_MODULES) in a warm worker of
    this Snakemake run; returns its exit status, or None (the reason logged) when no worker
    can be used and the caller should run it itself."""
    owner = _owner_key(env)
    if owner is None:
        log.info("eval worker: the job has no owner (LRMERGE_JOB_OWNER); running in process")
        return None
    # The launcher sends only WORKER_MODULES; the worker refuses any other.
    module, argv, cwd = command[0], command[1:], os.getcwd()
    mode = job_mode(module, argv)
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
    request = json.dumps({"module": module, "argv": argv, "env": env, "cwd": cwd,
                          "fingerprint": wanted}).encode()
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
            socket.send_fds(sock, [len(request).to_bytes(HEADER, "big") + request], [1, 2])
            reply = recv_line(sock)
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
