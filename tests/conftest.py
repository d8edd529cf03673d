"""Suite-wide test ordering.

The real-cluster tests (tests/test_slurm.py) run last. Once SLURM's client tools are installed,
every `snakemake` start pays for the SLURM executor plugin's import-time probe
(`scontrol show config`, up to its 10 s timeout while no slurmctld answers); on a fresh CI
machine the cluster test is what installs them, so every workflow test collected after it would
pay that probe on each Snakemake start.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    items.sort(key=lambda item: item.path.name == "test_slurm.py")  # stable: order kept otherwise
