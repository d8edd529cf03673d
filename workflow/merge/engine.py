"""Merge engine: owns all I/O around the pure methods in :mod:`workflow.merge.methods`.

Reading. Safetensors files (single or sharded) are memory-mapped and each tensor is a zero-copy
view, so inputs cost page cache, not process memory. Tensors are visited one name at a time
across base and models.

Writing. The output layout (names, dtypes, shapes, shards of at most ``max_shard_bytes``) is
known before any math, so each shard file is created at its final size with its header and
mapped; the kernels write merged values straight into it. Peak process memory is then a few
chunk buffers (streaming methods) or a few float32 copies of the largest tensor (the others),
whatever the model size.

Whole-model methods. ties_yadav's top-k threshold and majority sign are properties of the whole
model: before the merge pass, :func:`_whole_model_contexts` streams every floating tensor
(checked for NaN/Inf on the way) through :func:`~workflow.merge.kernels.whole_model_statistics`,
one tensor at a time, once per density set of the sweep.

Sweeps. :func:`merge_many` merges several recipes over the same inputs in one pass: each tensor
is read once; variants that differ only in ``lambda`` share all the math up to the final scaling.

Vocabulary. A tensor may have more rows in a model than in the base only where that model's
config has a larger ``vocab_size`` (a CT model with an extended vocabulary); the output then has
the extended row count: rows the base has are merged as usual, rows beyond the base are copied
from the model that has them, and that model's tokenizer and ``vocab_size`` are used. Two models
extending the same tensor, fewer rows than the base, or any other shape difference are errors
naming the tensor: nothing is ever cropped.

Tied embeddings. A model may omit ``lm_head.weight`` when its config ties it; where the base has
the tensor, that model's input embeddings stand in. A model's extra ``lm_head.weight`` is ignored
when the base ties it. Non-floating tensors are copied from the base.

Integrity (DESIGN §3). A truncated or corrupt input (a safetensors header that is not JSON or
claims more bytes than the file has, a tensor whose data lies past the end of the file, an
index or config that is not JSON) is a :class:`CheckpointError` naming the file and tensor,
raised when the input is opened, before any output exists. Every floating input tensor (base
and models) is checked for NaN/Inf as it is read, by sums (NaN and Inf survive any sum): the
streaming kernels sum the float32 copies they make anyway, other tensors get one sum per input
here. A non-finite value is a :class:`CheckpointError` naming the tensor and file, unless
``allow_nonfinite``, which merges anyway (what each method then does: the module docstring of
:mod:`workflow.merge.methods`) and leaves such tensors out of the diagnostics.

Each output directory gets the shards (+ index), config.json (the base's, vocab size updated),
tokenizer and generation files (from the task model, else the base), diagnostics.json,
mergekit.yaml (when mergekit has the method), a README.md model card carrying the recipe, and
recipe.json; it appears atomically.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import logging
import math
import mmap
import os
import shutil
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from workflow.artifacts import atomic_dir, read_json, write_json, write_recipe
from workflow.merge.kernels import (
    NonFiniteInput,
    stream_merge,
    stream_plan,
    whole_model_statistics,
)
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
MERGEKIT_FILE = "mergekit.yaml"
CARD_FILE = "README.md"
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
    "sft_topk_mass_kept": "share of the |delta| mass of the SFT delta's top max(1, "
                          "int(density*numel)) entries where the merged delta is nonzero with "
                          "the SFT sign",
    "sft_dropped": "fraction of nonzero SFT delta entries the merge zeroed or flipped",
    "trimmed": "of entries some input changed, the fraction the merge left at the base value",
}
assert set(DIAGNOSTIC_DEFINITIONS) == set(DIAGNOSTIC_KEYS)
# Whole-model methods (ties_yadav) count the SFT mass over the entries their merge kept.
WHOLE_MODEL_DEFINITIONS = {
    **DIAGNOSTIC_DEFINITIONS,
    "sft_topk_mass_kept": "share of the |delta| mass of the SFT delta's kept entries (|delta| >= "
                          "its whole-model threshold) where the merged delta is nonzero with the "
                          "SFT sign",
}

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_ITEMSIZE = {k: v.itemsize for k, v in DTYPES.items()}
ALLOW_NONFINITE_HINT = "set integrity.allow_nonfinite: true (--allow-nonfinite) to merge anyway"


class CheckpointError(ValueError):
    """An input checkpoint that cannot be merged as it is (corrupt, truncated, NaN/Inf); the
    message names the file and, where known, the tensor."""


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _entry_problem(entry: Any, data_size: int) -> str | None:
    """What is wrong with one tensor entry of a safetensors header (None: nothing)."""
    if not isinstance(entry, dict):
        return f"has a header entry that is not an object ({entry!r})"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPES:
        return f"has unsupported dtype {dtype!r}"
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        return f"has an invalid shape {shape!r}"
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        return f"has invalid data_offsets {offsets!r}"
    start, end = offsets
    if end > data_size:
        return (f"ends at byte {end} of the data, but the file holds {data_size} bytes of data "
                "(truncated or corrupt)")
    need = _numel(shape) * _ITEMSIZE[dtype]
    if end - start != need:
        return f"spans {end - start} bytes where its {dtype} shape {shape} needs {need}"
    return None


class SafetensorsFile:
    """A memory-mapped safetensors file; tensors are zero-copy views of the mapping.

    The header is checked against the file size when opened, so a truncated or corrupt file is
    a CheckpointError naming it (and the tensor), not a crash in the middle of a merge.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < 8:
                raise CheckpointError(f"{path} is not a safetensors file: it has {size} bytes, "
                                      "fewer than the 8 of the header length")
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > size - 8:
                # Checked before reading: a garbage length must not become a huge allocation.
                raise CheckpointError(f"{path} is truncated or not a safetensors file: its "
                                      f"header length is {length} bytes but {size - 8} follow")
            try:
                header = json.loads(handle.read(length))
            except (ValueError, RecursionError) as error:  # JSON, UTF-8, absurd nesting
                raise CheckpointError(f"{path} has a corrupt safetensors header that is not "
                                      f"JSON ({error})") from None
            if not isinstance(header, dict):
                raise CheckpointError(f"{path} has a corrupt safetensors header: a JSON "
                                      f"{type(header).__name__}, not an object")
            # Copy-on-write: torch wants a writable buffer, and we never write.
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        header.pop("__metadata__", None)
        self._data_start = 8 + length
        for name, entry in header.items():
            problem = _entry_problem(entry, size - self._data_start)
            if problem is not None:
                raise CheckpointError(f"tensor {name!r} of {path} {problem}")
        self.entries: dict[str, dict[str, Any]] = header

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.entries[name]["dtype"]]

    def get(self, name: str) -> Tensor:
        entry = self.entries[name]
        start, end = entry["data_offsets"]
        dtype, shape = DTYPES[entry["dtype"]], tuple(entry["shape"])
        count = (end - start) // _ITEMSIZE[entry["dtype"]]
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self._map, dtype=dtype, count=count,
                                offset=self._data_start + start)
        return flat.view(shape)


class Checkpoint:
    """Lazy, read-only view of the tensors of one HF safetensors checkpoint directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                    isinstance(f, str) for f in weight_map.values()):
                raise CheckpointError(f"{index} has no 'weight_map' object of file names")
            self._file_of: dict[str, str] = dict(weight_map)
        elif (self.directory / SINGLE_FILE).is_file():
            self._file_of = dict.fromkeys(SafetensorsFile(self.directory / SINGLE_FILE).entries,
                                          SINGLE_FILE)
        else:
            raise FileNotFoundError(f"{self.directory} has neither {SINGLE_FILE} nor {INDEX_FILE}")
        self._files: dict[str, SafetensorsFile] = {}
        config = self.directory / "config.json"
        self.config: dict[str, Any] = _read_json(config) if config.is_file() else {}

    def file_of(self, name: str) -> Path:
        """The file holding tensor ``name``."""
        return self.directory / self._file_of[name]

    def _file(self, name: str) -> SafetensorsFile:
        file = self._file_of[name]
        if file not in self._files:
            path = self.directory / file
            if not path.is_file():
                raise FileNotFoundError(f"{path} (listed for tensor {name!r}) does not exist")
            self._files[file] = SafetensorsFile(path)
        handle = self._files[file]
        if name not in handle.entries:
            raise CheckpointError(f"tensor {name!r} is listed for {self.directory / file} "
                                  "but not in it")
        return handle

    def names(self) -> list[str]:
        return list(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self._file(name).dtype(name)

    def get(self, name: str) -> Tensor:
        return self._file(name).get(name)

    @property
    def vocab_size(self) -> int | None:
        size = self.config.get("vocab_size", self.config.get("text_config", {}).get("vocab_size"))
        return int(size) if isinstance(size, int) else None


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a checkpoint's index or config; a corrupt one names the file."""
    try:
        value = read_json(path)
    except ValueError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def nonfinite_counts(x: Tensor) -> tuple[int, int]:
    """(NaN count, Inf count) of a floating tensor.

    NaN and Inf survive any sum, so a finite sum clears the tensor in one read pass with no
    temporary (~10x cheaper than ``isfinite().all()``, which writes a bool per entry); only a
    non-finite sum (or finite values summing past the dtype's range) pays for the counts.
    """
    if x.numel() == 0:
        return 0, 0
    # float8 has no sum kernel; the others accumulate in float32 already.
    total = x.sum(dtype=torch.float32) if x.element_size() == 1 else x.sum()
    if math.isfinite(float(total)):
        return 0, 0
    return int(torch.isnan(x).count_nonzero()), int(torch.isinf(x).count_nonzero())


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _preallocate(fd: int, size: int, path: Path) -> None:
    """Allocate a new shard's blocks before it is written through a memory map.

    Writing a sparse file through a shared map makes the filesystem allocate blocks one page
    fault at a time (ext4's delayed allocation): 3-4x slower than writing the same bytes
    after one fallocate, and the cost of every output of a sweep. It also turns a full disk
    into an error here instead of a SIGBUS mid-merge. Where the filesystem cannot preallocate,
    the writes still work, only slower.
    """
    if size and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise OSError(error.errno, f"no space left on device for {size / 1e9:.2f} GB",
                              str(path)) from error
            log.debug("no preallocation (%s); writing through page faults", error)


class ShardWriter:
    """Pre-sized, memory-mapped safetensors shards: :meth:`view` gives the writable output of a
    tensor; :meth:`finish` writes the index (for several shards) and unmaps."""

    def __init__(self, directory: Path, layout: Sequence[tuple[str, torch.dtype, tuple]],
                 max_shard_bytes: int) -> None:
        shards: list[list[tuple[str, torch.dtype, tuple, int]]] = [[]]
        size = 0
        for name, dtype, shape in layout:
            nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, dtype, shape, nbytes))
            size += nbytes
        count = len(shards)
        self.directory = directory
        self._where: dict[str, tuple[int, int, torch.dtype, tuple]] = {}
        self._maps: list[mmap.mmap | None] = []
        self.weight_map: dict[str, str] = {}
        self.files: list[str] = []
        self.total_bytes = 0
        for number, shard in enumerate(shards, start=1):
            file = SINGLE_FILE if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
            self.files.append(file)
            # Widest dtypes first: every offset stays aligned to its element size.
            shard.sort(key=lambda t: -torch.empty((), dtype=t[1]).element_size())
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name, dtype, shape, nbytes in shard:
                header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                                "data_offsets": [offset, offset + nbytes]}
                self.weight_map[name] = file
                offset += nbytes
            text = json.dumps(header, separators=(",", ":")).encode()
            text += b" " * (-(8 + len(text)) % 8)
            data_start = 8 + len(text)
            with open(directory / file, "w+b") as handle:
                handle.write(struct.pack("<Q", len(text)) + text)
                handle.truncate(data_start + offset)
                handle.flush()
                _preallocate(handle.fileno(), data_start + offset, directory / file)
                self._maps.append(mmap.mmap(handle.fileno(), 0) if offset else None)
            for name, dtype, shape, _ in shard:
                start = header[name]["data_offsets"][0]
                self._where[name] = (len(self._maps) - 1, data_start + start, dtype, shape)
            self.total_bytes += offset

    def view(self, name: str) -> Tensor:
        index, offset, dtype, shape = self._where[name]
        count = _numel(shape)
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self._maps[index], dtype=dtype, count=count,
                                offset=offset).view(shape)

    def discard(self) -> None:
        """Drop the maps of a failed merge without unmapping them: the exception's traceback
        still holds views (torch.frombuffer keeps the map alive, not mapped), and reading one
        after close(), as pytest or a debugger does to show arguments, is a segfault. Each map
        is unmapped when its last view goes."""
        self._maps = []

    def finish(self) -> None:
        gc.collect()  # views must be gone before the maps close
        for mapping in self._maps:
            if mapping is not None:
                mapping.close()
        if len(self.files) > 1:
            write_json(self.directory / INDEX_FILE,
                       {"metadata": {"total_size": self.total_bytes},
                        "weight_map": self.weight_map})


class DiscardSink:
    """Takes each merged tensor and drops it (diagnostics-only merges: no weights written).

    Nothing reads an output back, so every variant of a sweep shares one scratch buffer of the
    current tensor's shape: memory stays at one copy of the largest tensor.
    """

    def __init__(self, layout: Sequence[tuple[str, torch.dtype, tuple]]) -> None:
        self._layout = {name: (dtype, shape) for name, dtype, shape in layout}
        self._scratch = torch.empty(0)

    def view(self, name: str) -> Tensor:
        dtype, shape = self._layout[name]
        if self._scratch.dtype != dtype or tuple(self._scratch.shape) != tuple(shape):
            self._scratch = torch.empty(0)  # free the old one before allocating
            self._scratch = torch.empty(shape, dtype=dtype)
        return self._scratch

    def discard(self) -> None:
        pass

    def finish(self) -> None:
        pass


class MemorySink:
    """Collects merged tensors in memory (merge-on-load)."""

    def __init__(self, layout: Sequence[tuple[str, torch.dtype, tuple]]) -> None:
        self.tensors = {name: torch.empty(shape, dtype=dtype) for name, dtype, shape in layout}

    def view(self, name: str) -> Tensor:
        return self.tensors[name]

    def finish(self) -> None:
        pass


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count


# --------------------------------------------------------------------------------------------
# Planning: names, sources and shapes
# --------------------------------------------------------------------------------------------


@dataclass
class TensorPlan:
    """Where one output tensor comes from."""

    name: str
    sources: list[str]  # per model: the tensor name to read (a tied alias may differ)
    shape: tuple[int, ...]  # output shape
    base_rows: int | None = None  # set when rows beyond the base come from `extender`
    extender: int | None = None


def _embedding_name(ck: Checkpoint) -> str | None:
    candidates = [n for n in ck.names() if n.endswith("embed_tokens.weight")]
    return candidates[0] if len(candidates) == 1 else None


def plan_tensors(base: Checkpoint, models: Sequence[Checkpoint]) -> tuple[list[TensorPlan],
                                                                           int | None]:
    """The output tensors (the base's names) and where each comes from; the index of the model
    that extends the vocabulary, if any. Raises ValueError naming the first tensor at fault."""
    names = base.names()
    base_set = set(names)
    plans = [TensorPlan(name, [], base.shape(name)) for name in names]
    extender: int | None = None
    for index, model in enumerate(models):
        model_names = set(model.names())
        for name in sorted(model_names - base_set):
            if name in TIED_ALIASES:
                # The base ties it to the embeddings; mirror the base and drop the copy.
                log.warning("ignoring %s of %s: it is tied in the base", name, model.directory)
                continue
            raise ValueError(f"tensor {name!r} of {model.directory} is not in the base "
                             f"{base.directory}")
        for plan in plans:
            name = plan.name
            source = name
            if name not in model_names:
                alias = _embedding_name(model) if name in TIED_ALIASES else None
                if alias is None or not model.config.get("tie_word_embeddings", False):
                    raise ValueError(f"tensor {name!r} of the base {base.directory} is missing "
                                     f"from {model.directory}")
                source = alias
            plan.sources.append(source)
        for plan in plans:
            name, source = plan.name, plan.sources[-1]
            shape, base_shape = model.shape(source), base.shape(name)
            if shape == base_shape:
                continue
            grows = (len(shape) == len(base_shape) and len(shape) >= 1
                     and shape[1:] == base_shape[1:] and shape[0] > base_shape[0]
                     and model.vocab_size == shape[0]
                     and (base.vocab_size or base_shape[0]) < shape[0])
            if not grows:
                raise ValueError(f"tensor {name!r} has shape {list(shape)} in {model.directory} "
                                 f"but {list(base_shape)} in the base {base.directory}"
                                 + (" (fewer rows than the base: never cropped)"
                                    if len(shape) == len(base_shape) and shape[1:] ==
                                    base_shape[1:] and shape[0] < base_shape[0] else ""))
            if plan.extender is not None and plan.extender != index:
                raise ValueError(f"tensor {name!r} is extended by both "
                                 f"{models[plan.extender].directory} and {model.directory}: "
                                 "two extended vocabularies cannot be merged")
            plan.extender, plan.base_rows, plan.shape = index, base_shape[0], shape
            extender = index
    for plan in plans:
        dtype = base.dtype(plan.name)
        for model, source in zip(models, plan.sources, strict=True):
            if model.dtype(source).is_floating_point != dtype.is_floating_point:
                raise ValueError(f"tensor {plan.name!r} is {model.dtype(source)} in "
                                 f"{model.directory} but {dtype} in the base {base.directory}")
    return plans, extender


def check_compatible(base: Checkpoint, models: Sequence[Checkpoint]) -> list[str]:
    """The tensor names to merge, after checking every model has them all with compatible
    shapes; raises ValueError naming the first tensor at fault."""
    return [plan.name for plan in plan_tensors(base, models)[0]]


# --------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------


@dataclass
class Variant:
    """One recipe of a (possibly one-variant) sweep, resolved."""

    recipe: dict
    method: str
    params: dict[str, Any]
    per_model: list[dict[str, Any]]
    task_index: int | None
    ct_indices: list[int]
    diag_density: float
    counts: dict[str, DiagnosticCounts] = field(default_factory=dict)
    context: dict[str, Any] | None = None  # whole-model statistics (ties_yadav)


# A diagnostics-only merge (materialize: false) carries the merge's recipe under its own stage.
MERGE_STAGES = ("merge", "merge_diagnostics")


def _spec_from_recipe(recipe: Mapping[str, Any]) -> tuple[str, dict[str, Any], list[dict]]:
    if not isinstance(recipe, Mapping) or recipe.get("stage") not in MERGE_STAGES:
        stage = recipe.get("stage") if isinstance(recipe, Mapping) else recipe
        raise ValueError(f"recipe 'stage' must be one of {MERGE_STAGES}, got {stage!r}")
    for key in ("method", "params", "models"):
        if key not in recipe:
            raise ValueError(f"merge recipe has no {key!r} key")
    if not isinstance(recipe["models"], list):
        # A malformed recipe is a config error: ValueError, like every other spec error.
        raise ValueError(  # noqa: TRY004
            f"merge recipe 'models' must be a list, got {recipe['models']!r}")
    return recipe["method"], recipe["params"], recipe["models"]


def resolve_variant(recipe: dict) -> Variant:
    method_name, raw_params, models = _spec_from_recipe(recipe)
    params, per_model, task_index = resolve_merge_spec(method_name, raw_params, models)
    diag_density = (per_model[task_index].get("density", 1.0)
                    if task_index is not None and MERGE_METHODS[method_name].trims else 1.0)
    return Variant(recipe, method_name, params, per_model, task_index,
                   [i for i, m in enumerate(models) if m["role"] == "ct"], diag_density)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_finite(plan: TensorPlan, base: Checkpoint, b: Tensor, inputs: Sequence[Checkpoint],
                  xs: Sequence[Tensor], allow_nonfinite: bool) -> bool:
    """Whether the inputs of one floating tensor are all finite; raises CheckpointError naming
    the first non-finite one unless ``allow_nonfinite`` (then it is logged)."""
    finite = True
    for ck, name, x in ((base, plan.name, b), *zip(inputs, plan.sources, xs, strict=True)):
        nan, inf = nonfinite_counts(x)
        if nan or inf:
            what = (f"non-finite values ({nan} NaN, {inf} Inf) in tensor {name} of "
                    f"{ck.file_of(name)}")
            if not allow_nonfinite:
                raise CheckpointError(f"{what}; {ALLOW_NONFINITE_HINT}")
            log.warning("%s: merged anyway (allow_nonfinite), left out of the diagnostics", what)
            finite = False
    return finite


def _merge_tensor(plan: TensorPlan, base: Checkpoint, inputs: Sequence[Checkpoint],
                  variants: Sequence[Variant], outs: Sequence[Tensor], device: torch.device,
                  diagnostics: bool, allow_nonfinite: bool = False) -> None:
    """Merge one tensor for every variant into ``outs`` (one per variant).

    Floating inputs are checked for NaN/Inf where every variant streams by the kernel, on the
    float32 copies it makes anyway (see stream_merge: cheaper than a pass of its own over bf16
    inputs), else here; a failed check is followed by exact counts here, which name the file.
    """
    b = base.get(plan.name)
    rows = b.shape[0] if plan.base_rows is not None else None
    xs = [ck.get(source) for ck, source in zip(inputs, plan.sources, strict=True)]
    floating = b.is_floating_point()
    groups: dict[tuple, list[int]] = {}
    fallback: list[int] = []
    for j, v in enumerate(variants):
        splan = stream_plan(MERGE_METHODS[v.method], v.params, v.per_model, v.task_index,
                            v.context)
        if splan is None:
            fallback.append(j)
        else:
            key = (splan.key, v.task_index, tuple(v.ct_indices), v.diag_density)
            groups.setdefault(key, []).append(j)
            variants[j]._splan = splan  # type: ignore[attr-defined]
    # The kernel sees only the rows it merges, and refuses what allow_nonfinite lets through.
    in_kernel = floating and not fallback and rows is None and not allow_nonfinite
    if floating and not in_kernel and not _check_finite(plan, base, b, inputs, xs,
                                                        allow_nonfinite):
        diagnostics = False  # NaN counts and ratios would mean nothing
    if rows is not None:
        # Rows beyond the base come from the model that has them; the rest merge as usual.
        extra = xs[plan.extender][rows:]
        for out in outs:
            out[rows:].copy_(extra)
        xs = [x[:rows] for x in xs]
        outs = [out[:rows] for out in outs]
    if not floating:
        for out in outs:
            out.copy_(b)
        return
    flat_b = b.reshape(-1)
    flat_xs = [x.reshape(-1) for x in xs]

    def stream(check: bool) -> None:
        for number, members in enumerate(groups.values()):
            first = variants[members[0]]
            want = diagnostics and first.task_index is not None
            counts = stream_merge(
                first._splan,  # type: ignore[attr-defined]
                flat_b, flat_xs, [outs[j].reshape(-1) for j in members],
                [variants[j].params.get("lambda", 1.0) for j in members],
                diag_ct=first.ct_indices, diag_task=first.task_index if want else None,
                device=device, require_finite=check and number == 0)
            if counts is not None:
                for j, count in zip(members, counts, strict=True):
                    variants[j].counts[plan.name] = count

    try:
        stream(in_kernel)
    except NonFiniteInput:
        _check_finite(plan, base, b, inputs, xs, allow_nonfinite=False)  # names the file
        stream(False)  # all finite after all: finite values overflowed a float32 sum
    if not fallback:
        return
    # Reference path: whole float32 tensors on the device.
    bd = b.to(device)
    xd = [x.to(device, dtype=b.dtype) for x in xs]  # mergekit casts inputs to the base dtype
    for j in fallback:
        v = variants[j]
        merged = MERGE_METHODS[v.method](bd, xd, v.params, v.per_model, v.task_index,
                                         tensor_name=plan.name, context=v.context)
        outs[j].copy_(merged.reshape(outs[j].shape))
        if diagnostics and v.task_index is not None:
            b32 = bd.float()
            v.counts[plan.name] = delta_diagnostics(
                [xd[i].float() - b32 for i in v.ct_indices], xd[v.task_index].float() - b32,
                merged.float() - b32, v.diag_density)


def _whole_model_contexts(variants: Sequence[Variant], base: Checkpoint,
                          inputs: Sequence[Checkpoint], plans: Sequence[TensorPlan],
                          device: torch.device, allow_nonfinite: bool) -> None:
    """Set the whole-model statistics of each ``whole_model`` variant (ties_yadav): passes over
    every floating tensor, one at a time, before the merge (no tensor is held past its turn).

    The tensors are exactly what the merge pass gives the method (the rows the base has, inputs
    cast to the base dtype), and they are checked for NaN/Inf on the first pass, so a bad input
    fails before any statistics are spent on it."""
    wanted = [v for v in variants if MERGE_METHODS[v.method].whole_model]
    if not wanted:
        return
    density_sets = list(dict.fromkeys(tuple(m["density"] for m in v.per_model) for v in wanted))
    checked: set[str] = set()

    def tensors() -> Any:
        for plan in plans:
            b = base.get(plan.name)
            if not b.is_floating_point() or b.numel() == 0:
                continue
            xs = [ck.get(source) for ck, source in zip(inputs, plan.sources, strict=True)]
            if plan.name not in checked:
                checked.add(plan.name)
                if not allow_nonfinite:
                    _check_finite(plan, base, b, inputs, xs, allow_nonfinite=False)
            if plan.base_rows is not None:
                xs = [x[: b.shape[0]] for x in xs]
            yield b.to(device), [x.to(device, dtype=b.dtype) for x in xs]

    log.info("whole-model top-k statistics for %d density set(s): 3 passes over the inputs",
             len(density_sets))
    contexts = dict(zip(density_sets, whole_model_statistics(tensors, density_sets),
                        strict=True))
    for v in wanted:
        v.context = contexts[tuple(m["density"] for m in v.per_model)]


def _run(variants: Sequence[Variant], base: Checkpoint, inputs: Sequence[Checkpoint],
         plans: Sequence[TensorPlan], sinks: Sequence[Any], device: torch.device,
         diagnostics: bool, allow_nonfinite: bool = False) -> None:
    _whole_model_contexts(variants, base, inputs, plans, device, allow_nonfinite)
    label = ",".join(sorted({v.method for v in variants}))
    for plan in tqdm(plans, desc=f"merge ({label} x{len(variants)})", unit="tensor",
                     mininterval=1.0):
        outs = [sink.view(plan.name) for sink in sinks]
        _merge_tensor(plan, base, inputs, variants, outs, device, diagnostics,
                      allow_nonfinite)
        del outs


def _open_inputs(base_dir: Path, model_dirs: Sequence[Path], n_models: int
                 ) -> tuple[Checkpoint, list[Checkpoint]]:
    if len(model_dirs) != n_models:
        raise ValueError(f"the merge recipe lists {n_models} models but {len(model_dirs)} "
                         "model directories were given")
    for directory in (base_dir, *model_dirs):
        if not (Path(directory) / "config.json").is_file():
            raise FileNotFoundError(f"{Path(directory) / 'config.json'} does not exist")
    return Checkpoint(base_dir), [Checkpoint(d) for d in model_dirs]


def _layout(base: Checkpoint, plans: Sequence[TensorPlan]) -> list[tuple[str, torch.dtype,
                                                                         tuple]]:
    return [(p.name, base.dtype(p.name), p.shape) for p in plans]


def _output_config(base: Checkpoint, inputs: Sequence[Checkpoint],
                   extender: int | None) -> dict[str, Any]:
    config = json.loads(json.dumps(base.config))
    if extender is not None:
        size = inputs[extender].vocab_size
        if "vocab_size" in config or "text_config" not in config:
            config["vocab_size"] = size
        else:
            config["text_config"]["vocab_size"] = size
    return config


def _tokenizer_source(base_dir: Path, model_dirs: Sequence[Path], task_index: int | None,
                      extender: int | None) -> Path:
    if extender is not None:
        # Only the extending model's tokenizer covers the extra rows.
        return Path(model_dirs[extender])
    task_dir = Path(model_dirs[task_index] if task_index is not None else model_dirs[-1])
    # The task (SFT) model carries the chat template and eos settings the merged model needs.
    return task_dir if (task_dir / "tokenizer_config.json").is_file() else Path(base_dir)


def _model_card(recipe: dict, yaml_text: str | None) -> str:
    method = recipe["method"]
    lines = [
        "---", "tags: [merge, lrmerge]", "---", "",
        f"# Merged model ({method})", "",
        f"Made by the lrmerge merge stage with `{method}` "
        f"({MERGE_METHODS[method].reference}).", "",
        "## Recipe", "", "```json", json.dumps(recipe, indent=2, sort_keys=True), "```", "",
    ]
    if yaml_text is not None:
        lines += ["## Equivalent mergekit configuration", "", "```yaml", yaml_text.rstrip(),
                  "```", ""]
    lines += [f"Diagnostics: `{DIAGNOSTICS_FILE}`.", ""]
    return "\n".join(lines)


def merge_many(recipes: Sequence[dict], base_dir: Path, model_dirs: Sequence[Path],
               out_dirs: Sequence[Path], *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
               device: str | torch.device | None = None, diagnostics: bool = True,
               weights: bool = True, allow_nonfinite: bool = False) -> None:
    """Merge several recipes over the same base and models in one pass over the inputs.

    ``model_dirs`` follow each recipe's "models" order; every recipe must list the same models
    (the same count and roles), and ``out_dirs[j]`` receives ``recipes[j]``. Without
    ``weights`` each output gets only the diagnostics, the recipe, the model card and the
    mergekit YAML (the merge is computed and dropped tensor by tensor). NaN/Inf in an input
    tensor is a CheckpointError unless ``allow_nonfinite`` (config ``integrity.allow_nonfinite``).
    """
    if not weights and not diagnostics:
        raise ValueError("a merge without weights is only for its diagnostics")
    from workflow.merge.mergekit_yaml import mergekit_yaml

    if not recipes or len(recipes) != len(out_dirs):
        raise ValueError(f"{len(recipes)} recipes but {len(out_dirs)} output directories")
    variants = [resolve_variant(r) for r in recipes]
    roles = [[m["role"] for m in r["models"]] for r in recipes]
    for j, r in enumerate(roles[1:], start=1):
        if r != roles[0]:
            raise ValueError(f"recipe #{j} lists models {r} but recipe #0 lists {roles[0]}: a "
                             "sweep merges the same models")
    base_dir = Path(base_dir)
    model_dirs = [Path(d) for d in model_dirs]
    base, inputs = _open_inputs(base_dir, model_dirs, len(roles[0]))
    plans, extender = plan_tensors(base, inputs)
    device = torch.device(device) if device is not None else default_device()
    layout = _layout(base, plans)
    log.info("merging %d tensors of %d models into %d outputs on %s", len(plans), len(inputs),
             len(variants), device)
    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(atomic_dir(out)) for out in out_dirs]
        writers = ([ShardWriter(tmp, layout, max_shard_bytes) for tmp in tmps] if weights
                   else [DiscardSink(layout)] * len(tmps))  # one shared scratch buffer
        try:
            _run(variants, base, inputs, plans, writers, device, diagnostics, allow_nonfinite)
        except BaseException:
            for writer in writers:
                writer.discard()
            raise
        for writer in writers:
            writer.finish()
        config = _output_config(base, inputs, extender)
        for tmp, v in zip(tmps, variants, strict=True):
            if weights:
                write_json(tmp / "config.json", config)
                source = _tokenizer_source(base_dir, model_dirs, v.task_index, extender)
                for name in SIDE_FILES:
                    if (source / name).is_file():
                        shutil.copy2(source / name, tmp / name)
            if diagnostics:
                write_json(tmp / DIAGNOSTICS_FILE, {
                    "method": v.method,
                    "params": v.params,
                    "sft_density": v.diag_density if v.task_index is not None else None,
                    "definitions": WHOLE_MODEL_DEFINITIONS
                    if MERGE_METHODS[v.method].whole_model else DIAGNOSTIC_DEFINITIONS,
                    **aggregate_diagnostics(v.counts),
                })
            yaml_text = mergekit_yaml(v.recipe, base_dir, model_dirs,
                                      dtype=str(base.dtype(plans[0].name)).split(".")[-1]
                                      if plans else "float32")
            if yaml_text is not None:
                (tmp / MERGEKIT_FILE).write_text(yaml_text, encoding="utf-8")
            (tmp / CARD_FILE).write_text(_model_card(v.recipe, yaml_text), encoding="utf-8")
            write_recipe(tmp, v.recipe)
    for out in out_dirs:
        log.info("wrote %s", out)


def merge_models(recipe: dict, base_dir: Path, model_dirs: Sequence[Path], out_dir: Path, *,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 device: str | torch.device | None = None, diagnostics: bool = True,
                 allow_nonfinite: bool = False) -> None:
    """Merge ``model_dirs`` (in ``recipe["models"]`` order) onto ``base_dir`` into ``out_dir``
    (``allow_nonfinite``: as :func:`merge_many`)."""
    merge_many([recipe], base_dir, model_dirs, [out_dir], max_shard_bytes=max_shard_bytes,
               device=device, diagnostics=diagnostics, allow_nonfinite=allow_nonfinite)


def merged_state_dict(recipe: dict, base_dir: Path, model_dirs: Sequence[Path], *,
                      device: str | torch.device | None = None, allow_nonfinite: bool = False
                      ) -> tuple[dict[str, Tensor], dict[str, Any], Path]:
    """The merged tensors in memory, the output config and the tokenizer directory
    (``allow_nonfinite``: as :func:`merge_many`)."""
    variant = resolve_variant(recipe)
    base, inputs = _open_inputs(Path(base_dir), model_dirs, len(variant.per_model))
    plans, extender = plan_tensors(base, inputs)
    sink = MemorySink(_layout(base, plans))
    device = torch.device(device) if device is not None else default_device()
    _run([variant], base, inputs, plans, [sink], device, diagnostics=False,
         allow_nonfinite=allow_nonfinite)
    return (sink.tensors, _output_config(base, inputs, extender),
            _tokenizer_source(Path(base_dir), model_dirs, variant.task_index, extender))


def load_merged_model(recipe: dict, base_dir: Path, model_dirs: Sequence[Path], *,
                      device: str | torch.device = "cpu",
                      dtype: str | torch.dtype | None = None,
                      allow_nonfinite: bool = False) -> tuple[Any, Any]:
    """Merge-on-load: build the merged model in memory, no checkpoint written.

    Returns ``(model, tokenizer)`` (an ``AutoModelForCausalLM`` in eval mode on ``device`` and
    its ``AutoTokenizer``), equal to loading what :func:`merge_models` would write. ``dtype``
    casts the merged weights after merging (the merge itself runs in the inputs' dtype, as the
    written checkpoint would); None keeps the inputs' dtype. ``allow_nonfinite``: as
    :func:`merge_many`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tensors, config_dict, tokenizer_dir = merged_state_dict(recipe, base_dir, model_dirs,
                                                            allow_nonfinite=allow_nonfinite)
    model_type = config_dict.get("model_type")
    if not model_type:
        raise ValueError(f"{Path(base_dir) / 'config.json'} has no 'model_type'")
    config = AutoConfig.for_model(**config_dict)
    merged_dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()),
                        torch.float32)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=merged_dtype)
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and k not in TIED_ALIASES]
    if missing or unexpected:
        raise ValueError(f"merged tensors do not fit {model_type}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    model.tie_weights()
    if dtype is not None:
        model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    return model, tokenizer


__all__ = ["Checkpoint", "CheckpointError", "ShardWriter", "check_compatible",
           "load_merged_model", "merge_many", "merge_models", "merged_state_dict",
           "nonfinite_counts", "plan_tensors"]
