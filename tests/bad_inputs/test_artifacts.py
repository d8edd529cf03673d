"""Bad inputs to the artifact store: damaged artifacts, leftovers of killed jobs, file modes.

Each case names the culprit in one sentence, before the consuming stage starts."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from workflow.artifacts import (
    MANIFEST_FILE,
    IntegrityError,
    atomic_dir,
    atomic_file,
    check_sizes,
    verify_artifact,
    verify_inputs,
    write_recipe,
)


@pytest.fixture
def artifact(tmp_path) -> Path:
    """A finished artifact: two files, a recipe and a manifest, written as every stage does."""
    out = tmp_path / "results" / "ct" / "abc123abc123"
    with atomic_dir(out) as tmp:
        (tmp / "model.safetensors").write_bytes(os.urandom(4096))
        (tmp / "sub").mkdir()
        (tmp / "sub" / "tokenizer.json").write_text('{"a": 1}')
        write_recipe(tmp, {"stage": "ct", "version": "1"})
    return out


def test_a_finished_artifact_records_every_file_in_its_manifest(artifact):
    files = json.loads((artifact / MANIFEST_FILE).read_text())["files"]
    assert set(files) == {"model.safetensors", "sub/tokenizer.json", "recipe.json"}
    assert files["model.safetensors"]["size"] == 4096
    assert verify_artifact(artifact) == 3


def test_a_truncated_weight_file_is_named(artifact):
    weights = artifact / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(IntegrityError, match=f"{weights} is 100 bytes, its manifest says 4096"):
        check_sizes(artifact)


def test_a_deleted_weight_file_is_named(artifact):
    (artifact / "model.safetensors").unlink()
    with pytest.raises(IntegrityError, match="model.safetensors is missing"):
        verify_artifact(artifact)


def test_altered_bytes_of_the_same_size_are_caught_by_the_sha256(artifact, tmp_path):
    weights = artifact / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))
    check_sizes(artifact)  # the cheap check cannot see it
    with pytest.raises(IntegrityError, match="does not match the sha256"):
        verify_inputs([artifact], cache_file=tmp_path / "hashes.json")


def test_a_corrupt_manifest_is_named(artifact):
    (artifact / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(IntegrityError, match=f"{artifact / MANIFEST_FILE} is not a valid"):
        verify_artifact(artifact)


def test_a_missing_input_artifact_is_named(tmp_path):
    missing = tmp_path / "results" / "ct" / "gone"
    with pytest.raises(IntegrityError, match=f"input artifact {missing} does not exist"):
        verify_artifact(missing)


def test_the_launcher_refuses_a_damaged_input_before_the_stage_starts(artifact, tmp_path):
    (artifact / "model.safetensors").write_bytes(b"short")
    marker = tmp_path / "stage-ran"
    result = subprocess.run(
        [sys.executable, "-m", "workflow.launch", "--gpus", "0", "--nproc", "1",
         "--verify", str(artifact), "--", "pathlib", str(marker)],
        capture_output=True, text=True, cwd=tmp_path, check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert result.returncode != 0
    assert "model.safetensors is 5 bytes, its manifest says 4096" in result.stderr
    assert not marker.exists()


def test_the_temporaries_of_a_killed_job_are_removed_when_it_runs_again(tmp_path):
    out = tmp_path / "results" / "merge" / "abc"
    stale = tmp_path / "results" / "merge" / ".abc.tmp-killed"
    stale.mkdir(parents=True)
    (stale / "model-00001.safetensors").write_bytes(b"x" * 1000)
    stale_file = tmp_path / "results" / "merge" / ".abc.tmp-half.json"
    stale_file.write_text("{")
    other = tmp_path / "results" / "merge" / ".abcd.tmp-another-output"
    other.mkdir()
    with atomic_dir(out) as tmp:
        (tmp / "x").write_text("done")
    assert not stale.exists() and not stale_file.exists()
    assert other.exists()  # another output's temporary is not this job's to remove
    assert (out / "x").read_text() == "done"


def test_a_failed_write_leaves_neither_output_nor_temporary(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "half").write_text("...")
        raise RuntimeError("killed")
    assert not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_finished_artifacts_are_readable_by_others(artifact, tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    for path in [artifact, *artifact.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        expected = (0o777 if path.is_dir() else 0o666) & ~mask
        assert mode == expected, (path, oct(mode))
    with atomic_file(tmp_path / "scores.json") as handle:
        handle.write("{}")
    assert stat.S_IMODE((tmp_path / "scores.json").stat().st_mode) == 0o666 & ~mask
