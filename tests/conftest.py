"""Suite-wide test ordering.

The real-cluster tests (tests/test_slurm.py) run last. Once SLURM's client tools are installed,
every `snakemake` start pays for the SLURM executor plugin's import-time probe
(`scontrol show config`, up to its 10 s timeout while no slurmctld answers); on a fresh CI
machine the cluster test is what installs them, so every workflow test collected after it would
pay that probe on each Snakemake start.

Also shared: the tiny evaluation fixture of workflow.evaluate_benchmark, and the cleanup of
evaluation workers (workflow/eval_worker/) a test started.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from workflow_utils import eval_worker_pids


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    items.sort(key=lambda item: item.path.name == "test_slurm.py")  # stable: order kept otherwise


# ----------------------------------------------------------------------------- evaluation


@pytest.fixture(scope="session")
def tiny_eval_model(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """workflow.evaluate_benchmark's tiny random Llama and a 20-doc topic + bpb suite."""
    from workflow import evaluate_benchmark

    root = tmp_path_factory.mktemp("tiny-eval")
    model, model_digest = evaluate_benchmark.build_model(root)
    suite, suite_digest = evaluate_benchmark.build_suite(root, 20)
    return {"model": model, "model_digest": model_digest, "suite": suite,
            "suite_digest": suite_digest, "root": root}


@pytest.fixture
def eval_workers(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path``, whose evaluation workers are killed at teardown (none may linger)."""
    yield tmp_path
    for pid in eval_worker_pids(tmp_path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
