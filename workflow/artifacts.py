"""Content addressing and atomic writes, shared by every stage.

An artifact's recipe is everything that decides its bytes: the stage, the stage's version
string, its parameters, the digests of its input artifacts and, for raw external inputs, their
content hash. The digest is a prefix of sha256 over the recipe's canonical JSON; the recipe is
written beside the artifact as ``recipe.json``.

Outputs are built under a temporary sibling name and renamed into place, so a killed job never
leaves something that looks finished; the temporary siblings a killed job left are removed the
next time that output is built.

Integrity: every artifact directory holds ``manifest.json``, the size and sha256 of each of its
files, written last before the rename. Consumers check their inputs against it before use
(:func:`verify_artifact`; the sha256 of a file is cached by path, size and mtime, so a check
costs a few ``stat`` calls once a file has been hashed), and ``python -m workflow.artifacts
verify results`` checks every artifact.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

DIGEST_LENGTH = 12
RECIPE_FILE = "recipe.json"
MANIFEST_FILE = "manifest.json"
HASH_CACHE = Path(".cache") / "lrmerge" / "file-hashes.json"


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


def _tmp_prefix(final: Path) -> str:
    return f".{final.name}.tmp-"


def remove_stale_temporaries(final: str | Path) -> list[Path]:
    """Remove the temporary siblings of ``final`` that killed jobs left behind.

    Only one job builds a given output at a time (Snakemake locks its outputs, the trainer
    its work dir), so every temporary of ``final`` that exists when its job starts is stale.
    """
    final = Path(final)
    stale = sorted(final.parent.glob(_tmp_prefix(final) + "*")) if final.parent.is_dir() else []
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def _normalize_modes(root: Path) -> None:
    """mkstemp/mkdtemp (and some writers) create owner-only files: finished artifacts get
    the usual permissions, as any file the user writes."""
    os.chmod(root, DIR_MODE)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), DIR_MODE)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, FILE_MODE)


@contextlib.contextmanager
def atomic_dir(final: str | Path, manifest: bool = True) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``final`` only if the block succeeds.

    Stale temporaries of ``final`` (from killed jobs) are removed first; the finished directory
    gets ``manifest.json`` (sizes and sha256 of its files) unless ``manifest`` is false.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(final), dir=final.parent))
    try:
        yield tmp
        _normalize_modes(tmp)
        if manifest:
            if (tmp / MANIFEST_FILE).exists():  # a stage's own file would be overwritten
                raise FileExistsError(f"{final}: the stage wrote a {MANIFEST_FILE} of its own; "
                                      "pass manifest=False to atomic_dir")
            write_manifest(tmp)
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
    remove_stale_temporaries(final)
    fd, tmp_name = tempfile.mkstemp(prefix=_tmp_prefix(final), dir=final.parent)
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


def point_latest(artifact_dir: str | Path) -> None:
    """Make ``latest`` beside ``artifact_dir`` a relative symlink to it, atomically."""
    artifact_dir = Path(artifact_dir)
    link = artifact_dir.parent / "latest"
    tmp = link.with_name(f".latest.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(artifact_dir.name)
    os.replace(tmp, link)


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


# -- integrity ---------------------------------------------------------------------------------


class IntegrityError(ValueError):
    """An artifact whose files differ from its manifest; the message names the file."""


class HashCache:
    """sha256 of files, cached by (path, size, mtime) so repeated checks cost a ``stat``."""

    def __init__(self, cache_file: str | Path = HASH_CACHE):
        self.cache_file = Path(cache_file)
        try:
            self.entries: dict[str, str] = json.loads(self.cache_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            self.entries = {}
        self.dirty = False

    def sha256(self, path: Path) -> str:
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in self.entries:
            if path.is_dir():
                parts = sorted(
                    f"{p.relative_to(path)}:{self.sha256(p)}"
                    for p in path.rglob("*")
                    if p.is_file()
                )
                self.entries[key] = digest_of({"directory": parts})
            else:
                self.entries[key] = sha256_file(path)
            self.dirty = True
        return self.entries[key]

    def remember(self, path: Path, sha256: str) -> None:
        """Record a hash computed elsewhere (e.g. while writing the manifest)."""
        stat = path.stat()
        self.entries[f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"] = sha256
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        with contextlib.suppress(OSError):  # a read-only cache costs time, never correctness
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_file.with_suffix(f".tmp{os.getpid()}")
            # Jobs save concurrently: merge what others saved meanwhile, then replace.
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                self.entries = {**json.loads(self.cache_file.read_text()), **self.entries}
            tmp.write_text(json.dumps(self.entries, indent=0, sort_keys=True))
            os.replace(tmp, self.cache_file)
            self.dirty = False


def _artifact_files(directory: Path) -> Iterator[Path]:
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST_FILE and ".tmp-" not in path.name:
            yield path


def write_manifest(directory: str | Path) -> dict[str, Any]:
    """Record the size and sha256 of every file under ``directory`` in ``manifest.json``."""
    directory = Path(directory)
    files = {
        path.relative_to(directory).as_posix(): {
            "size": path.stat().st_size,
            "sha256": sha256_file(path),
        }
        for path in _artifact_files(directory)
    }
    manifest = {"files": files}
    path = directory / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.chmod(path, FILE_MODE)
    return manifest


def is_complete(path: str | Path) -> bool:
    """Whether an artifact is finished: a score file exists, or a directory has its recipe
    (written inside the temporary directory, before the rename that publishes it)."""
    path = os.fspath(path)  # called once per job while planning: plain strings, no Path
    if path.endswith(".json"):
        return os.path.isfile(path)
    return os.path.isfile(os.path.join(path, RECIPE_FILE))


def _read_manifest(directory: Path) -> dict[str, Any] | None:
    """The ``files`` of an artifact's manifest; None without one (or for a single file)."""
    manifest_path = directory / MANIFEST_FILE
    try:
        return json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
    except (FileNotFoundError, NotADirectoryError):  # no manifest, or a single-file artifact
        return None
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise IntegrityError(f"{manifest_path} is not a valid manifest ({error})") from None


def _check_sizes(directory: Path, files: dict[str, Any]) -> None:
    manifest_path = directory / MANIFEST_FILE
    for name, expected in files.items():
        path = directory / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise IntegrityError(f"{path} is missing (listed in {manifest_path}); the artifact "
                                 f"is damaged: move {directory} away and rerun to rebuild "
                                 "it") from None
        if size != expected["size"]:
            raise IntegrityError(f"{path} is {size} bytes, its manifest says {expected['size']}; "
                                 f"the artifact is damaged: move {directory} away and rerun")


def check_sizes(directory: str | Path) -> None:
    """The cheap half of :func:`verify_artifact`: every file of the manifest exists with its
    recorded size (a ``stat`` each; planning runs this on finished artifacts)."""
    directory = Path(directory)
    files = _read_manifest(directory)
    if files is not None:
        _check_sizes(directory, files)


def verify_artifact(directory: str | Path, cache: HashCache | None = None) -> int:
    """Check an artifact directory against its manifest; return the number of files checked.

    Missing or resized files fail on a ``stat``; contents are hashed once per (size, mtime),
    through ``cache``. A directory without a manifest (built before manifests existed) passes
    unchecked. Raises IntegrityError naming the first bad file.
    """
    directory = Path(directory)
    files = _read_manifest(directory)
    if files is None:
        if not directory.exists():
            raise IntegrityError(f"input artifact {directory} does not exist")
        return 0
    _check_sizes(directory, files)
    cache = cache if cache is not None else HashCache(Path(os.devnull))
    for name, expected in sorted(files.items()):
        path = directory / name
        if cache.sha256(path) != expected["sha256"]:
            raise IntegrityError(f"{path} does not match the sha256 in "
                                 f"{directory / MANIFEST_FILE}; the artifact is damaged: move "
                                 f"{directory} away and rerun")
    return len(files)


def verify_inputs(paths: Iterable[str | Path], cache_file: str | Path = HASH_CACHE) -> int:
    """Check each input artifact directory (others, e.g. raw corpora, are skipped)."""
    cache = HashCache(cache_file)
    checked = 0
    try:
        for path in paths:
            if Path(path).is_dir():
                checked += verify_artifact(path, cache)
    finally:
        cache.save()
    return checked


def find_artifacts(root: str | Path) -> Iterator[Path]:
    """Every artifact directory (one with a recipe.json) under ``root``."""
    for recipe in sorted(Path(root).rglob(RECIPE_FILE)):
        if not any(".tmp-" in part for part in recipe.parts):
            yield recipe.parent


def verify_tree(
    root: str | Path, cache_file: str | Path = HASH_CACHE
) -> tuple[int, list[str], list[str]]:
    """Verify every artifact under ``root``: (artifacts found, damaged, unchecked)."""
    cache = HashCache(cache_file)
    problems: list[str] = []
    unchecked: list[str] = []
    count = 0
    for directory in find_artifacts(root):
        count += 1
        try:
            stored = read_json(directory / RECIPE_FILE)
            if digest_of(stored["recipe"]) != stored["digest"]:
                problems.append(f"{directory}/{RECIPE_FILE}: its digest does not match its recipe")
            if not (directory / MANIFEST_FILE).is_file():
                unchecked.append(f"{directory}: no {MANIFEST_FILE} (built before manifests)")
                continue
            verify_artifact(directory, cache)
        except (IntegrityError, json.JSONDecodeError, KeyError, OSError) as error:
            problems.append(str(error))
    cache.save()
    return count, problems, unchecked


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workflow.artifacts",
                                     description="Check artifacts against their manifests.")
    sub = parser.add_subparsers(dest="command", required=True)
    tree = sub.add_parser("verify", help="check every artifact under a folder (default results)")
    tree.add_argument("root", nargs="?", default="results")
    inputs = sub.add_parser("verify-inputs", help="check the given input artifacts")
    inputs.add_argument("paths", nargs="*")
    args = parser.parse_args(argv)
    if args.command == "verify-inputs":
        try:
            verify_inputs(args.paths)
        except IntegrityError as error:
            sys.exit(f"error: {error}")
        return
    count, damaged, unchecked = verify_tree(args.root)
    for line in unchecked:
        print(f"UNCHECKED {line}")
    for line in damaged:
        print(f"DAMAGED {line}")
    print(f"{count} artifacts under {args.root}: {len(damaged)} damaged, "
          f"{len(unchecked)} without a manifest")
    if damaged:
        sys.exit(1)


if __name__ == "__main__":
    main()
