"""The mergekit (0.1.5) configuration equivalent to a merge recipe, for interop.

``mergekit-yaml`` run on this file with the same inputs reproduces our merge (to fp32 rounding on
float32 models) for linear, task_arithmetic, ties, breadcrumbs, breadcrumbs_ties, slerp and
model_stock; dare_* and della* match in distribution only (mergekit draws from the global RNG,
we from per-tensor seeded generators). ties_sv and ties_yadav have no mergekit counterpart: no
file is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from workflow.merge.methods import MERGE_METHODS, resolve_merge_spec

# Global parameters with no mergekit counterpart (they only steer our own execution).
_OURS_ONLY = frozenset({"seed"})


def mergekit_config(recipe: dict, base_dir: str | Path, model_dirs: Sequence[str | Path], *,
                    dtype: str = "float32") -> dict[str, Any] | None:
    """The mergekit config as a dict, or None where mergekit has no such method."""
    method = recipe["method"]
    spec = MERGE_METHODS[method]
    if not spec.mergekit:
        return None
    params, per_model, _ = resolve_merge_spec(method, recipe["params"], recipe["models"])
    dirs = [str(d) for d in model_dirs]
    config: dict[str, Any] = {"merge_method": method, "dtype": dtype}
    if method == "slerp":
        first, second = (str(base_dir), dirs[0]) if len(dirs) == 1 else (dirs[0], dirs[1])
        config["base_model"] = first
        config["models"] = [{"model": first}, {"model": second}]
        config["parameters"] = {"t": params["t"]}
        return config
    if method != "linear":
        config["base_model"] = str(base_dir)
    models = []
    for directory, model_params in zip(dirs, per_model, strict=True):
        entry: dict[str, Any] = {"model": directory}
        if model_params:
            entry["parameters"] = dict(model_params)
        models.append(entry)
    if method == "model_stock":
        models.insert(0, {"model": str(base_dir)})
    config["models"] = models
    shared = {k: v for k, v in params.items() if k not in _OURS_ONLY}
    if shared:
        config["parameters"] = shared
    return config


def mergekit_yaml(recipe: dict, base_dir: str | Path, model_dirs: Sequence[str | Path], *,
                  dtype: str = "float32") -> str | None:
    """:func:`mergekit_config` as YAML text (None where mergekit has no such method)."""
    config = mergekit_config(recipe, base_dir, model_dirs, dtype=dtype)
    if config is None:
        return None
    note = "# Written by lrmerge: the mergekit 0.1.5 equivalent of recipe.json.\n"
    if MERGE_METHODS[recipe["method"]].random:
        note += "# Random method: mergekit's masks differ from ours (see workflow.merge.methods).\n"
    return note + yaml.safe_dump(config, sort_keys=False)


__all__ = ["mergekit_config", "mergekit_yaml"]
