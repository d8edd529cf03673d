"""Content addressing and atomic writes, shared by every stage.

An artifact's recipe is everything that decides its bytes: the stage, the stage's version
string, its parameters, the digests of its input artifacts and, for raw external inputs, their
content hash. The digest is a prefix of sha256 over the recipe's canonical JSON; the recipe is
written beside the artifact as ``recipe.json``.

Outputs are built under a temporary sibling name and renamed into place, so a killed job never
leaves something that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DIGEST_LENGTH = 12
RECIPE_FILE = "recipe.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create owner-only files; finished artifacts get the usual permissions.
FILE_MODE = 0o666 & ~_umask()
DIR_MODE = 0o777 & ~_umask()


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal recipes give equal strings."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def digest_of(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(recipe).encode("utf-8")).hexdigest()[:DIGEST_LENGTH]


def merged_model_digest(recipe: dict[str, Any]) -> str:
    """The digest of the merged model a merge recipe describes. A diagnostics-only merge
    (``merge_options.materialize: false``) has the merge's recipe with another stage."""
    if recipe.get("stage") == "merge_diagnostics":
        return digest_of({**recipe, "stage": "merge"})
    return digest_of(recipe)


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            hasher.update(chunk)
    return hasher.hexdigest()


def _prepare_destination(final: Path) -> None:
    """Make room for ``final``: Snakemake may pre-create an empty output directory."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.is_dir() and not final.is_symlink():
        if any(final.iterdir()):
            raise FileExistsError(f"refusing to overwrite non-empty output directory {final}")
        final.rmdir()


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, DIR_MODE)
        _prepare_destination(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file that replaces ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(fd)
    try:
        encoding = None if "b" in mode else "utf-8"
        with open(tmp_name, mode, encoding=encoding) as handle:
            yield handle
        os.chmod(tmp_name, FILE_MODE)
        os.replace(tmp_name, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def write_json(path: str | Path, value: Any) -> None:
    with atomic_file(path) as handle:
        json.dump(value, handle, indent=2, sort_keys=True, ensure_ascii=False)
        handle.write("\n")


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def write_recipe(directory: str | Path, recipe: dict[str, Any]) -> None:
    """Write ``recipe.json`` (with its digest) into an artifact directory."""
    write_json(Path(directory) / RECIPE_FILE, {"digest": digest_of(recipe), "recipe": recipe})


def parse_recipe_arg(text: str) -> dict[str, Any]:
    """Decode the ``--recipe`` JSON a rule passes to a stage's command line."""
    recipe = json.loads(text)
    if not isinstance(recipe, dict) or "stage" not in recipe:
        raise ValueError("--recipe must be a JSON object with a 'stage' key")
    return recipe


def parse_named_paths(values: list[str], option: str) -> dict[str, Path]:
    """``["eu=DIR", ...]`` (a repeatable ``NAME=PATH`` option) -> ``{"eu": Path(DIR)}``."""
    named: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{option} must look like NAME=PATH, got {value!r}")
        if name in named:
            raise ValueError(f"{option} {name} is given twice")
        named[name] = Path(path)
    return named
