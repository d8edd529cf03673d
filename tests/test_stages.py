"""The stage table and the code-change guard: a stage's code may not change what it writes
without a new version (or an explicit "no change to outputs" record)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from workflow import stages
from workflow.plan import Plan
from workflow.stages import PROJECT_DIR, STAGES


def test_the_committed_code_matches_the_stage_lock():
    problems = stages.check()
    assert not problems, "\n".join(problems)


@pytest.fixture
def project_copy(tmp_path) -> tuple[Path, Path]:
    """The stage modules, copied, with a lock of their current code: the guard runs there."""
    root = tmp_path / "project"
    shutil.copytree(PROJECT_DIR / "workflow", root / "workflow",
                    ignore=shutil.ignore_patterns("__pycache__"))
    lock = root / "workflow" / "stages.lock.json"
    lock.unlink()
    stages.record(list(stages.STAGE_SOURCES), "baseline of the copy", root, lock)
    assert stages.check(root, lock) == []
    return root, lock


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_a_comment_or_docstring_is_no_code_change(project_copy):
    root, lock = project_copy
    train = root / "workflow" / "train.py"
    _edit(train, "def run_training(", "# a new comment\ndef run_training(")
    _edit(train, '"""', '"""An edited docstring. ')  # the module's docstring
    assert stages.check(root, lock) == []


def test_a_changed_stage_fails_until_its_version_is_bumped_and_recorded(project_copy):
    root, lock = project_copy
    train = root / "workflow" / "train.py"
    _edit(train, "IGNORE = -100", "IGNORE = -101")
    problems = stages.check(root, lock)
    changed = {re.match(r"stage '(\w+)'", p).group(1) for p in problems}
    # train.py holds the code of pretraining, SFT and CT: all three must answer for it.
    assert changed == {"pretrain", "sft", "ct"}
    assert all("without a new version" in p and "workflow/train.py" in p for p in problems)

    _edit(train, '"ct": "1"}', '"ct": "2"}')
    problems = stages.check(root, lock)
    assert any("stage 'ct' is at version 2" in p for p in problems)  # bumped, not yet recorded
    stages.record(["ct"], None, root, lock)
    # ct passes now; pretrain and sft share the change: same bytes, say so explicitly
    assert {re.match(r"stage '(\w+)'", p).group(1) for p in stages.check(root, lock)} == {
        "pretrain", "sft"}
    stages.record(["pretrain", "sft"], "IGNORE is only used by SFT labels", root, lock)
    assert stages.check(root, lock) == []
    history = stages.read_lock(lock)["stages"]["sft"]["history"]
    assert history[-1]["note"] == "IGNORE is only used by SFT labels"


def test_recording_a_changed_stage_without_a_bump_or_a_reason_is_refused(project_copy):
    root, lock = project_copy
    _edit(root / "workflow" / "data.py", "ENCODE_BATCH = 512", "ENCODE_BATCH = 256")
    with pytest.raises(SystemExit, match="bump its version, or give --no-output-change"):
        stages.record(["prepare"], None, root, lock)


def test_a_version_bump_changes_the_digests_of_that_stage_and_downstream(
        monkeypatch, tmp_path):
    from workflow_utils import tiny_config

    from workflow.config import validate_config

    config = validate_config(tiny_config(), PROJECT_DIR)
    before = Plan(config, tmp_path)
    monkeypatch.setitem(stages._module_versions("workflow/train.py"), "ct", "99")
    after = Plan(config, tmp_path)
    changed = {rule for (rule, digest) in before.by_key if (rule, digest) not in after.by_key}
    # CT and everything built from it; data, SFT and the base stay
    assert changed == {"ct", "ctsft", "merge", "evaluate", "report"}


def test_every_rule_comes_from_the_stage_table():
    rule_files = sorted((PROJECT_DIR / "rules").glob("*.smk"))
    defined = set()
    for path in rule_files:
        for call in re.findall(r"^stage_rules\((.*)\)$", path.read_text(), re.M):
            defined |= set(re.findall(r'"(\w+)"', call))
    assert defined == set(STAGES)
    # every stage's version comes from the module that implements it
    for stage in STAGES.values():
        assert stage.version == stages.stage_version(stage.version_of or stage.stage)
