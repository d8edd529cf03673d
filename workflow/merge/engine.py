"""Merge engine: owns all I/O around the pure methods in :mod:`workflow.merge.methods`.

Tensors are read lazily, one name at a time across base and models, from single-file or sharded
safetensors checkpoints; the merged tensors stream into shards of at most ``max_shard_bytes``
(a single ``model.safetensors`` when they fit, else HF-style shards plus an index). The output
directory gets config.json (from the base, whose tensor layout it mirrors), tokenizer and
generation config files (from the task model, falling back to the base), diagnostics.json and
recipe.json, and appears atomically.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from workflow.artifacts import atomic_dir, read_json, write_json, write_recipe
from workflow.merge.methods import (
    DIAGNOSTIC_KEYS,
    MERGE_METHODS,
    DiagnosticCounts,
    aggregate_diagnostics,
    delta_diagnostics,
    resolve_merge_spec,
)

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DIAGNOSTICS_FILE = "diagnostics.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
# Tensors a checkpoint may drop because they are tied to another (HF omits them on save).
TIED_ALIASES = frozenset({"lm_head.weight"})
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
DIAGNOSTIC_DEFINITIONS = {
    "sign_conflict": "over (CT model, entry) pairs where CT and SFT deltas are both nonzero, "
                     "the fraction of opposite sign",
    "sft_topk_mass_kept": "share of the |delta| mass of the SFT delta's top int(density*numel) "
                          "entries where the merged delta is nonzero with the SFT sign",
    "sft_dropped": "fraction of nonzero SFT delta entries the merge zeroed or flipped",
    "trimmed": "of entries some input changed, the fraction the merge left at the base value",
}
assert set(DIAGNOSTIC_DEFINITIONS) == set(DIAGNOSTIC_KEYS)


class Checkpoint:
    """Lazy, read-only view of the tensors of one HF safetensors checkpoint directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index} has no 'weight_map' object")
            self._file_of: dict[str, str] = dict(weight_map)
        elif (self.directory / SINGLE_FILE).is_file():
            with safe_open(self.directory / SINGLE_FILE, framework="pt") as handle:
                self._file_of = {name: SINGLE_FILE for name in handle.keys()}  # noqa: SIM118 (not a dict)
        else:
            raise FileNotFoundError(f"{self.directory} has neither {SINGLE_FILE} nor {INDEX_FILE}")
        self._handles: dict[str, Any] = {}

    def _handle(self, name: str) -> Any:
        file = self._file_of[name]
        if file not in self._handles:
            path = self.directory / file
            if not path.is_file():
                raise FileNotFoundError(f"{path} (listed for tensor {name!r}) does not exist")
            self._handles[file] = safe_open(path, framework="pt")
        return self._handles[file]

    def names(self) -> list[str]:
        return list(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> Tensor:
        return self._handle(name).get_tensor(name)


class ShardWriter:
    """Streams tensors into safetensors shards; names them and writes the index at the end."""

    def __init__(self, directory: Path, max_shard_bytes: int) -> None:
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._total_bytes = 0

    def add(self, name: str, tensor: Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes
        self._total_bytes += nbytes

    def _flush(self) -> None:
        path = self.directory / f".shard-{len(self._shards)}.safetensors"
        save_file(self._pending, path, metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> None:
        if self._pending or not self._shards:
            self._flush()
        if len(self._shards) == 1:
            self._shards[0][0].rename(self.directory / SINGLE_FILE)
            return
        count = len(self._shards)
        weight_map: dict[str, str] = {}
        for i, (path, names) in enumerate(self._shards, start=1):
            final = f"model-{i:05d}-of-{count:05d}.safetensors"
            path.rename(self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
        write_json(self.directory / INDEX_FILE,
                   {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map})


def check_compatible(base: Checkpoint, models: Sequence[Checkpoint]) -> list[str]:
    """The tensor names to merge (the base's), after checking every model has them all with
    the base's shapes; raises ValueError naming the first tensor at fault."""
    names = base.names()
    base_set = set(names)
    for model in models:
        model_names = set(model.names())
        for name in names:
            if name not in model_names:
                raise ValueError(f"tensor {name!r} of the base {base.directory} is missing "
                                 f"from {model.directory}")
        for name in sorted(model_names - base_set):
            if name in TIED_ALIASES:
                # The base ties it to the embeddings; mirror the base and drop the copy.
                log.warning("ignoring %s of %s: it is tied in the base", name, model.directory)
                continue
            raise ValueError(f"tensor {name!r} of {model.directory} is not in the base "
                             f"{base.directory}")
        for name in names:
            if model.shape(name) != base.shape(name):
                raise ValueError(f"tensor {name!r} has shape {list(model.shape(name))} in "
                                 f"{model.directory} but {list(base.shape(name))} in the base "
                                 f"{base.directory}")
    return names


def _spec_from_recipe(recipe: Mapping[str, Any]) -> tuple[str, dict[str, Any], list[dict]]:
    if recipe.get("stage") != "merge":
        raise ValueError(f"recipe 'stage' must be 'merge', got {recipe.get('stage')!r}")
    for key in ("method", "params", "models"):
        if key not in recipe:
            raise ValueError(f"merge recipe has no {key!r} key")
    if not isinstance(recipe["models"], list):
        # A malformed recipe is a config error: ValueError, like every other spec error.
        raise ValueError(  # noqa: TRY004
            f"merge recipe 'models' must be a list, got {recipe['models']!r}")
    return recipe["method"], recipe["params"], recipe["models"]


def _copy_side_files(tmp: Path, base_dir: Path, task_dir: Path) -> None:
    shutil.copy2(base_dir / "config.json", tmp / "config.json")
    # The task (SFT) model carries the chat template and eos settings the merged model needs.
    source = task_dir if (task_dir / "tokenizer_config.json").is_file() else base_dir
    for name in SIDE_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, tmp / name)


def merge_models(recipe: dict, base_dir: Path, model_dirs: list[Path], out_dir: Path, *,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Merge ``model_dirs`` (in ``recipe["models"]`` order) onto ``base_dir`` into ``out_dir``."""
    method_name, raw_params, models = _spec_from_recipe(recipe)
    params, per_model, task_index = resolve_merge_spec(method_name, raw_params, models)
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    model_dirs = [Path(d) for d in model_dirs]
    if len(model_dirs) != len(models):
        raise ValueError(f"the merge recipe lists {len(models)} models but {len(model_dirs)} "
                         "model directories were given")
    for directory in (base_dir, *model_dirs):
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"{directory / 'config.json'} does not exist")
    method = MERGE_METHODS[method_name]
    base = Checkpoint(base_dir)
    inputs = [Checkpoint(d) for d in model_dirs]
    names = check_compatible(base, inputs)

    ct_indices = [i for i, m in enumerate(models) if m["role"] == "ct"]
    sft_density = per_model[task_index].get("density", 1.0) if task_index is not None else 1.0
    log.info("merging %d tensors of %d models with %s %s", len(names), len(inputs),
             method_name, params)
    counts: dict[str, DiagnosticCounts] = {}
    with atomic_dir(out_dir) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        for name in tqdm(names, desc=f"merge ({method_name})", unit="tensor", mininterval=1.0):
            b = base.get(name)
            # As mergekit: inputs are cast to the base dtype before any math.
            xs = [ck.get(name).to(b.dtype) for ck in inputs]
            merged = method(b, xs, params, per_model, task_index)
            if b.is_floating_point():
                b32 = b.float()
                counts[name] = delta_diagnostics(
                    [xs[i].float() - b32 for i in ct_indices],
                    xs[task_index].float() - b32 if task_index is not None else None,
                    merged.float() - b32,
                    sft_density,
                )
            writer.add(name, merged)
            del b, xs
        writer.finish()
        task_dir = model_dirs[task_index] if task_index is not None else model_dirs[-1]
        _copy_side_files(tmp, base_dir, task_dir)
        write_json(tmp / DIAGNOSTICS_FILE, {
            "method": method_name,
            "params": params,
            "sft_density": sft_density if task_index is not None else None,
            "definitions": DIAGNOSTIC_DEFINITIONS,
            **aggregate_diagnostics(counts),
        })
        write_recipe(tmp, recipe)
    log.info("wrote %s", out_dir)


__all__ = ["Checkpoint", "ShardWriter", "check_compatible", "merge_models"]
