"""Checks of the config's `cluster` section and resources against the cluster, before any sbatch.

A job that no node can hold is not rejected by SLURM: asking for more CPUs than any node has
leaves it PENDING forever (reason PartitionConfig), so a run would wait without end. And an
account copied from an example (``your_account``) fails every submission. Both are caught here
at parse time, with one sentence naming the config key. rules/common.smk calls
``check_config`` always, ``check_capacity`` when the run submits to a cluster (a non-local
executor) and ``sinfo`` exists (where it does not, the capacity check is skipped quietly), and
``check_local`` when the jobs run here.

Training across nodes (``resources.<key>.nodes``, README "Training across nodes"): only the
training keys take nodes > 1, with a grad_accum that the job's processes divide, no more nodes
than sinfo lists, and never in a local run; ``slurm_resources`` turns it into the slurm
executor plugin's resources.
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
DEFAULTS = {"threads": 1, "mem_mb": 2000, "gpu": 0, "nodes": 1}
# Resources keys whose jobs may span nodes (one torchrun per node: workflow/launch.py), and the
# train sections each one's grad_accum comes from.
MULTINODE = {"pretrain": ("model.scratch.pretrain.train",), "ct": ("ct.train",),
             "sft": ("sft.train",)}


class ClusterError(ValueError):
    """The config asks for something the cluster cannot give; one sentence naming the key."""


def is_placeholder(account: str) -> bool:
    return bool(_PLACEHOLDER.match(str(account).strip()))


def check_config(config: Mapping[str, Any]) -> None:
    """The `cluster` section and the `nodes` resources: a placeholder account is an error, and
    so are nodes > 1 on a stage that does not train, or with a grad_accum that the job's
    processes (nodes x GPUs) do not divide."""
    account = (config.get("cluster") or {}).get("account")
    if account is not None and is_placeholder(account):
        raise ClusterError(
            f"config key 'cluster.account' is the placeholder {account!r}: set your SLURM "
            "account, or null to submit without one (the cluster's default)")
    for key, values in (config.get("resources") or {}).items():
        if (values or {}).get("nodes", 1) > 1 and key not in MULTINODE:
            raise ClusterError(
                f"config key 'resources.{key}.nodes' is {values['nodes']}: only training "
                f"({', '.join(MULTINODE)}) runs across nodes; set it on those keys")
    for key, sections in MULTINODE.items():
        nodes, nodes_key = resource(config, key, "nodes")
        if nodes <= 1:
            continue
        processes = nodes * max(1, resource(config, key, "gpu")[0])
        for section in sections:
            train = _lookup(config, section)
            accum = (train or {}).get("grad_accum", 1)
            if train is not None and accum % processes:
                raise ClusterError(
                    f"config key '{section}.grad_accum': {accum} must be a multiple of the "
                    f"{processes} processes of a {key} job ({nodes_key} {nodes} x its GPUs)")


def _lookup(config: Mapping[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(config, Mapping) or part not in config:
            return None
        config = config[part]
    return config


def check_local(config: Mapping[str, Any], keys: Iterable[str]) -> None:
    """A run that executes its jobs here: a stage in ``keys`` with nodes > 1 is an error (one
    torchrun per node needs srun in a SLURM job)."""
    for key in sorted(set(keys)):
        nodes, nodes_key = resource(config, key, "nodes")
        if nodes > 1:
            raise ClusterError(
                f"config key '{nodes_key}' is {nodes}: training across nodes runs under SLURM "
                "only (snakemake --profile profiles/slurm); this run executes its jobs here, "
                "so set it to 1")


def slurm_resources(config: Mapping[str, Any], key: str) -> dict[str, Any]:
    """The rule resources that tell the slurm executor plugin about a stage's nodes.

    One node: the GPUs as they are (``gpu`` becomes ``--gpus=N``). N > 1 nodes: sbatch
    ``--nodes=N --ntasks=N --ntasks-per-node=1`` and ``--gpus-per-node=G``, with the plugin's
    own ``gpu`` at 0 (its ``--gpus`` counts per job, and it turns ``tasks`` of a GPU job into
    ``--ntasks-per-gpu``); ``mpi`` makes the plugin's jobstep run the job's shell in the batch
    script instead of inside ``srun -n1``, so that the launcher's own srun starts one torchrun
    per node. threads (``--cpus-per-task``) and mem_mb (``--mem``) are then per node.
    """
    gpus = resource(config, key, "gpu")[0]
    nodes = resource(config, key, "nodes")[0]
    if nodes <= 1:
        return {"gpu": gpus}
    extra = "--ntasks-per-node=1" + (f" --gpus-per-node={gpus}" if gpus else "")
    return {"gpu": 0, "nodes": nodes, "tasks": nodes, "mpi": "srun", "slurm_extra": extra}


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
    CPUs and mem_mb within its memory, and no more nodes than the cluster has, else
    ClusterError naming the key."""
    max_cpus = max(cpus for cpus, _ in nodes)
    for key in sorted(set(keys)):
        count, count_key = resource(config, key, "nodes")
        if count > len(nodes):
            raise ClusterError(
                f"config key '{count_key}' asks for {count} nodes but this cluster has "
                f"{len(nodes)} (sinfo): the {key} jobs would pend forever")
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
