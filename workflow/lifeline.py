"""A stage dies with its job, and holds its work dir while it lives.

Snakemake runs a job as ``bash -c "set -euo pipefail; ... python -m workflow.launch ... > log"``
and the launcher execs the stage (or torchrun). Killing Snakemake, even with kill -9, used to
leave the stage running as an orphan that a rerun then raced on the same work dir. Two guards:

- Parent death signal. ``prctl(PR_SET_PDEATHSIG, SIGTERM)``: the kernel sends SIGTERM when the
  parent dies. The launcher sets it before exec (it survives execve), so the stage or torchrun
  dies with the job's bash; :func:`arm` sets it again in each torchrun worker (whose parent is
  torchrun: a fork clears it).
- Owner watchdog. The job's bash outlives a kill -9 of Snakemake (it only waits for its
  child), so the launcher records the job's owner, the process that started the job's shell
  (Snakemake), in LRMERGE_JOB_OWNER, and the stage polls it every second from a daemon thread.
  Once the owner is gone, or the stage's own parent changed, the watchdog ends the job: the
  process the launcher exec'd (LRMERGE_JOB_ROOT: the stage, or torchrun) and everything below
  it, SIGTERM and then SIGKILL. Processes are named by pid and start time, so a reused pid is
  never mistaken for the owner.

Not the process group: Snakemake starts its jobs in its own group (and sits in its caller's:
make, pytest, a terminal), so killpg would hit them; a new group per job would keep a terminal's
Ctrl-C from the stage while Snakemake waits for its jobs; torchrun puts each worker in a
session of its own anyway.

LRMERGE_LIFELINE=0 in the launcher's environment turns both guards off, for a launch by hand
meant to outlive its shell (nohup). A stage run without the launcher has no lifeline.

:func:`hold_lock` is the other half: an exclusive ``flock`` that the kernel drops when its
holder dies, so a second trainer on the same work dir fails at once instead of racing.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger("workflow.lifeline")

OWNER_ENV = "LRMERGE_JOB_OWNER"  # "pid:start time" of the process that started the job
ROOT_ENV = "LRMERGE_JOB_ROOT"  # "pid:start time" of the process the launcher exec'd
SWITCH_ENV = "LRMERGE_LIFELINE"  # "0" turns the lifeline off
PR_SET_PDEATHSIG = 1
# A job's shell sits between Snakemake (or a user's shell) and the launcher.
SHELLS = frozenset({"bash", "sh", "dash", "zsh", "ksh", "mksh", "fish", "busybox"})

Ident = tuple[int, int]  # (pid, start time in clock ticks since boot): unique for a boot
_watchdog: threading.Thread | None = None  # one per process, however often arm() is called


class LockHeld(RuntimeError):
    """Another live process holds the lock; the message names the path and its pid."""


def _stat(pid: int) -> tuple[str, str, int, int] | None:
    """(comm, state, ppid, start time) from /proc/<pid>/stat; None when there is no such pid."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may hold spaces and parentheses: it ends at the last ')'.
    comm = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    return comm, fields[0], int(fields[1]), int(fields[19])


def ident(pid: int) -> Ident | None:
    stat = _stat(pid)
    return None if stat is None else (pid, stat[3])


def alive(who: Ident) -> bool:
    """Whether the process ``who`` still runs (a zombie does not: it has ended)."""
    stat = _stat(who[0])
    return stat is not None and stat[3] == who[1] and stat[1] not in ("Z", "X")


def _format(who: Ident) -> str:
    return f"{who[0]}:{who[1]}"


def _parse(text: str | None) -> Ident | None:
    try:
        pid, start = (int(part) for part in (text or "").split(":"))
    except ValueError:
        return None
    return pid, start


def job_owner(pid: int | None = None) -> Ident | None:
    """The process that started the job of ``pid`` (default: this process).

    The parent, unless it is a shell (Snakemake's ``bash -c``, a user's terminal): then the
    shell's parent. bash execs the last command of ``-c`` when nothing follows it, in which
    case the parent is Snakemake itself.
    """
    stat = _stat(os.getpid() if pid is None else pid)
    if stat is None:
        return None
    parent = _stat(stat[2])
    if parent is None:
        return None
    if parent[0] in SHELLS and parent[2] > 1:
        return ident(parent[2])
    return ident(stat[2])


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` when the parent dies (Linux); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def enabled(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return env.get(SWITCH_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def prepare_exec(env: dict[str, str]) -> None:
    """In the launcher, just before it execs the stage: record the job's owner and this
    process (the stage to be) in ``env``, and die with the parent from here on."""
    if not enabled(env):
        return
    parent = os.getppid()
    owner, me = job_owner(), ident(os.getpid())
    if owner is not None and me is not None:
        env[OWNER_ENV], env[ROOT_ENV] = _format(owner), _format(me)
    set_parent_death_signal()
    if os.getppid() != parent:  # the parent died before the signal was set
        sys.exit("error: the job's shell ended before the stage started; not starting it")


def arm(poll: float = 1.0, grace: float = 5.0) -> threading.Thread | None:
    """In the stage: die with the job. Returns the watchdog thread (None without a launcher).

    Cheap and idempotent: every stage's main() may call it first thing.
    """
    global _watchdog
    owner = _parse(os.environ.get(OWNER_ENV))
    if owner is None or not enabled():
        return None
    if _watchdog is not None:
        return _watchdog
    set_parent_death_signal()
    parent = os.getppid()
    root = _parse(os.environ.get(ROOT_ENV))

    def watch() -> None:
        while True:
            if not alive(owner):
                reason = f"the job's owner (pid {owner[0]}) is gone"
            elif os.getppid() != parent:
                reason = f"this process's parent (pid {parent}) is gone"
            else:
                time.sleep(poll)
                continue
            end_job(root, reason, grace)
            return

    _watchdog = threading.Thread(target=watch, name="lrmerge-lifeline", daemon=True)
    _watchdog.start()
    log.info("lifeline: this process ends when the job's owner (pid %d) does", owner[0])
    return _watchdog


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(stat[2], []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def end_job(root: Ident | None, reason: str, grace: float = 5.0) -> None:
    """End the job's processes: ``root`` (if it is still that process) and everything below
    it, then this process. SIGTERM first, so torchrun can stop its workers; SIGKILL after
    ``grace`` seconds for whatever is left."""
    me = os.getpid()
    top = root[0] if root is not None and alive(root) else me
    targets = [top, *_descendants(top)]
    if me not in targets:
        targets += [me, *_descendants(me)]
    print(f"lifeline: {reason}; ending this job's processes {targets}", file=sys.stderr, flush=True)
    others = [ident(pid) for pid in targets if pid != me]
    others = [who for who in others if who is not None]
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 0.0)):
        for who in others:
            if alive(who):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(who[0], sig)
        deadline = time.monotonic() + wait
        while any(alive(who) for who in others) and time.monotonic() < deadline:
            time.sleep(0.1)
    os.kill(me, signal.SIGTERM)
    time.sleep(grace)  # a Python SIGTERM handler may have caught it
    os._exit(128 + signal.SIGTERM)


def hold_lock(path: Path, what: str) -> int:
    """Take an exclusive lock on ``path`` for the rest of this process's life; return its fd.

    The holder's pid is written into the file, so the error a second process gets names it.
    Raises LockHeld (naming ``what``, the thing the lock guards) when a live process holds it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise LockHeld(
            f"{what} is in use by another process (pid {holder}, lock {path}); "
            "wait for it to end or stop it before running this job again"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def main(argv: list[str] | None = None) -> None:
    """``python -m workflow.lifeline MODULE ARGS...``: run ``python -m MODULE ARGS...`` armed.

    The launcher starts every single-process stage this way, so each one dies with its job
    without a line of its own (torchrun workers arm themselves: workflow.train calls arm()).
    """
    import runpy

    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        sys.exit("usage: python -m workflow.lifeline MODULE [ARGS...]")
    arm()
    sys.argv = [argv[0], *argv[1:]]
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
