"""Checks of the config's `cluster` section and resources against the cluster, before any sbatch.

A job that no node can hold is not rejected by SLURM: asking for more CPUs than any node has
leaves it PENDING forever (reason PartitionConfig), so a run would wait without end. And an
account copied from an example (``your_account``) fails every submission. Both are caught here
at parse time, with one sentence naming the config key. rules/common.smk calls
``check_config`` always and ``check_capacity`` when the run submits to a cluster (a non-local
executor) and ``sinfo`` exists; where it does not, the capacity check is skipped quietly.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from typing import Any

# Accounts that are clearly copied from an example, not a site's account.
_PLACEHOLDER = re.compile(
    r"^(your|my|the|some|example)[_-]?(slurm[_-]?)?(account|project|allocation)(_name)?$"
    r"|^<.*>$|^\{.*\}$|^(changeme|change[_-]me|todo|xxx+|placeholder|account|none)$",
    re.IGNORECASE,
)
DEFAULTS = {"threads": 1, "mem_mb": 2000, "gpu": 0}


class ClusterError(ValueError):
    """The config asks for something the cluster cannot give; one sentence naming the key."""


def is_placeholder(account: str) -> bool:
    return bool(_PLACEHOLDER.match(str(account).strip()))


def check_config(config: Mapping[str, Any]) -> None:
    """The `cluster` section alone: a placeholder account is an error."""
    account = (config.get("cluster") or {}).get("account")
    if account is not None and is_placeholder(account):
        raise ClusterError(
            f"config key 'cluster.account' is the placeholder {account!r}: set your SLURM "
            "account, or null to submit without one (the cluster's default)")


def resource(config: Mapping[str, Any], key: str, name: str) -> tuple[Any, str]:
    """A stage's resource and the config key it comes from (``resources.<key>.<name>``, else
    ``resources.default.<name>``, else the built-in default)."""
    resources = config.get("resources") or {}
    if name in (resources.get(key) or {}):
        return resources[key][name], f"resources.{key}.{name}"
    default = resources.get("default") or {}
    if name in default:
        return default[name], f"resources.default.{name}"
    return DEFAULTS[name], f"resources.default.{name}"


def runtime(config: Mapping[str, Any], key: str) -> int | None:
    """Minutes of walltime for a stage's jobs (``cluster.runtime_min.<key>``, else ``default``;
    None: the partition's default)."""
    minutes = (config.get("cluster") or {}).get("runtime_min") or {}
    return minutes.get(key, minutes.get("default"))


def parse_sinfo(text: str) -> list[tuple[int, int]]:
    """(CPUs, memory MB) per line of ``sinfo -h -N -o '%c %m'``; ``4+`` counts as 4."""
    nodes = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 2:
            continue
        try:
            cpus, mem = (int(part.rstrip("+")) for part in parts)
        except ValueError:
            continue
        nodes.append((cpus, mem))
    return nodes


def query_nodes(timeout: float = 20) -> list[tuple[int, int]] | None:
    """The cluster's nodes as (CPUs, memory MB), or None where there is no ``sinfo`` or it
    fails (then nothing is checked)."""
    sinfo = shutil.which("sinfo")
    if sinfo is None:
        return None
    try:
        out = subprocess.run([sinfo, "-h", "-N", "-o", "%c %m"], capture_output=True,
                             text=True, timeout=timeout, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_sinfo(out) or None


def check_capacity(config: Mapping[str, Any], keys: Iterable[str],
                   nodes: list[tuple[int, int]]) -> None:
    """Every stage resource key in ``keys`` fits on at least one node: threads within its
    CPUs and mem_mb within its memory, else ClusterError naming the key."""
    max_cpus = max(cpus for cpus, _ in nodes)
    for key in sorted(set(keys)):
        threads, threads_key = resource(config, key, "threads")
        mem, mem_key = resource(config, key, "mem_mb")
        if threads > max_cpus:
            raise ClusterError(
                f"config key '{threads_key}' asks for {threads} CPUs but the largest node of "
                f"this cluster has {max_cpus} (sinfo): the {key} jobs would pend forever")
        fits = [node_mem for cpus, node_mem in nodes if cpus >= threads]
        if mem > max(fits):
            raise ClusterError(
                f"config key '{mem_key}' asks for {mem} MB but no node with {threads} CPUs "
                f"has more than {max(fits)} MB (sinfo): the {key} jobs cannot be scheduled")
