"""GPU leases: concurrent local jobs take distinct device ids through lock files.

Snakemake's ``--resources gpu=N`` caps how many GPUs jobs use at once but does not say which.
A job asking for n GPUs takes an exclusive ``fcntl.flock`` on n free ``gpu-<id>.lock`` files
and sets CUDA_VISIBLE_DEVICES to those ids; the kernel drops a lock when its holder dies (even
by kill -9), so no lease outlives its job. Under SLURM (SLURM_JOB_ID set) the scheduler has
already chosen the devices: the allocation is used as it is and nothing is locked.

Devices are, first found: LRMERGE_GPU_IDS ("0,1,2,3"; fake ids for tests), the ids in
CUDA_VISIBLE_DEVICES (the devices this user may use), or 0..torch.cuda.device_count()-1.
Lock files live in LRMERGE_GPU_LOCK_DIR, by default /tmp/lrmerge-gpu-locks, one directory
for the whole machine, so jobs of different working directories see each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("workflow.gpu")

DEFAULT_LOCK_DIR = Path(tempfile.gettempdir()) / "lrmerge-gpu-locks"


def under_slurm() -> bool:
    return bool(os.environ.get("SLURM_JOB_ID"))


def lock_dir() -> Path:
    return Path(os.environ.get("LRMERGE_GPU_LOCK_DIR") or DEFAULT_LOCK_DIR)


def available_devices() -> list[str]:
    """The device ids jobs on this machine may lease (see the module docstring)."""
    for name in ("LRMERGE_GPU_IDS", "CUDA_VISIBLE_DEVICES"):
        value = os.environ.get(name)
        if value is not None and value.strip():
            return [part.strip() for part in value.split(",") if part.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _try_lock(path: Path) -> int | None:
    # Lock files are shared by every user of the machine: readable and writable by all.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def acquire(
    n: int,
    devices: list[str] | None = None,
    directory: Path | None = None,
    timeout: float | None = None,
    poll: float = 2.0,
) -> tuple[list[str], list[int]]:
    """Lock ``n`` of ``devices``; return (ids, lock fds). Waits while too few are free.

    All or nothing: a try that finds fewer than n free ids lets go of the ones it got, so two
    jobs never sit on half an allocation each.
    """
    devices = available_devices() if devices is None else list(devices)
    if n < 0:
        raise ValueError(f"gpu lease: n must be >= 0, got {n}")
    if n > len(devices):
        raise ValueError(
            f"gpu lease: asked for {n} GPUs, only {len(devices)} exist here ({devices}); "
            "lower resources.<stage>.gpu or set LRMERGE_GPU_IDS"
        )
    directory = lock_dir() if directory is None else Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(PermissionError):  # sticky and open to all, like /tmp
        os.chmod(directory, 0o1777)
    deadline = None if timeout is None else time.monotonic() + timeout
    waited = False
    while True:
        ids: list[str] = []
        fds: list[int] = []
        for device in devices:
            fd = _try_lock(directory / f"gpu-{device}.lock")
            if fd is not None:
                ids.append(device)
                fds.append(fd)
                if len(ids) == n:
                    if waited:
                        log.info("leased GPU(s) %s after waiting", ",".join(ids))
                    return ids, fds
        release(fds)
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"gpu lease: {n} of {devices} not free within {timeout} s")
        if not waited:
            log.info("waiting for %d free GPU(s) of %s (locks in %s)", n, devices, directory)
            waited = True
        time.sleep(poll * random.uniform(0.5, 1.5))  # jitter: competing jobs do not lock-step


def release(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


@contextlib.contextmanager
def lease(
    n: int,
    devices: list[str] | None = None,
    directory: Path | None = None,
    timeout: float | None = None,
    poll: float = 2.0,
) -> Iterator[list[str]]:
    """Hold ``n`` GPUs for the block, with CUDA_VISIBLE_DEVICES set to them.

    Under SLURM, yields the allocation's ids and changes nothing. With n = 0 the block sees no
    GPU (CUDA_VISIBLE_DEVICES=""), so a CPU job cannot wander onto a device another job leased.
    """
    if under_slurm():
        yield available_devices()
        return
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids, fds = acquire(n, devices, directory, timeout, poll) if n else ([], [])
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
    try:
        yield ids
    finally:
        release(fds)
        if previous is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = previous
