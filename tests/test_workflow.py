"""The whole workflow, run for real by Snakemake on the tiny config, and its incremental reruns.

One module-scoped run builds everything; the change tests then ask Snakemake (dry run) which
jobs a changed config would execute and compare against the minimal set.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from workflow_utils import PROJECT, planned_jobs, snakemake, tiny_config, with_changes

from workflow.artifacts import digest_of, read_json
from workflow.config import validate_config
from workflow.plan import Plan

MODEL_KINDS = ("base", "sft", "ct", "ctsft", "merge")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    workdir = tmp_path_factory.mktemp("workflow")
    config = tiny_config()
    snakemake(workdir, config)
    return workdir, config


def test_whole_dag_runs_and_writes_the_report(built):
    workdir, config = built
    report = workdir / "results" / "report" / "latest"
    for name in ("scores.csv", "table.md", "budget_curves.png", "bpb_vs_acc.png"):
        assert (report / name).stat().st_size > 0, name
    scores = pd.read_csv(report / "scores.csv")
    assert set(scores["kind"]) == set(MODEL_KINDS)
    assert scores["value"].map(math.isfinite).all()
    # every target language has topic accuracy and bits per byte for every model kind
    for lang in config["languages"]:
        rows = scores[scores["suite"] == lang]
        assert set(rows["metric"]) >= {"acc", "bits_per_byte"}
        assert set(rows["kind"]) == set(MODEL_KINDS)
    table = (report / "table.md").read_text()
    assert "CT-then-SFT" in table and "ties" in table and "CT budget 2k" in table
    assert "| model | eu | gl | avg |" in table and "The papers' claims, checked" in table


def test_snakemake_report_gathers_the_tables_and_plots_into_html(built):
    workdir, config = built
    html = workdir / "report.html"
    snakemake(workdir, config, "--report", str(html))
    text = html.read_text()
    # Snakemake's report embeds each flagged file (report() on the report stage's output)
    for name in ("tables.html", "claims.csv", "scores.csv", "budget_curves.png",
                 "retention.png", "legend.csv"):
        assert name in text, name
    assert "lrmerge report" in text  # the category the rule's report() flags give


def test_every_artifact_is_content_addressed(built):
    workdir, config = built
    results = workdir / "results"
    recipes = list(results.rglob("recipe.json"))
    plan = Plan(validate_config(config, workdir), workdir)
    built_artifacts = [a for a in plan.by_key.values() if a.rule != "evaluate"]
    assert len(recipes) == len(built_artifacts)
    for recipe_file in recipes:
        stored = read_json(recipe_file)
        assert recipe_file.parent.name == stored["digest"] == digest_of(stored["recipe"])
    for score_file in (results / "eval").rglob("scores.json"):
        stored = json.loads(score_file.read_text())
        assert score_file.parent.name == digest_of(stored["recipe"])
    assert not [p for p in results.rglob("*") if ".tmp-" in p.name], "temporary leftovers"


def test_merged_models_load_with_transformers(built):
    from transformers import AutoModelForCausalLM

    workdir, _ = built
    merged = sorted((workdir / "results" / "merge").rglob("model.safetensors"))
    assert merged
    model = AutoModelForCausalLM.from_pretrained(merged[0].parent, trust_remote_code=False)
    assert all(param.isfinite().all() for param in model.parameters())
    assert not list((workdir / "results").rglob("*.bin")), "pickle weights written"


def test_a_rerun_runs_nothing(built):
    workdir, config = built
    assert planned_jobs(workdir, config) == []


# -- the digest is the only rebuild criterion -------------------------------------------------


def _touch_tree(root: Path, seconds_ahead: float = 3600) -> int:
    """Give every file under ``root`` a new, later mtime (as a touch or a fresh clone does)."""
    stamp = time.time() + seconds_ahead
    count = 0
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.utime(path, (stamp, stamp))
            count += 1
    return count


def test_touching_the_corpora_and_every_artifact_runs_nothing(copy_of_built):
    workdir, config = copy_of_built
    corpora = workdir / "corpora"
    shutil.copytree(PROJECT / "data" / "libreoffice-help", corpora)
    moved = with_changes(config, lambda c: c["corpora"].update(
        {name: {"path": str(corpora / f"{name}.jsonl.gz")} for name in c["corpora"]}))
    # Same bytes at another path (copied without -p: new mtimes): the same artifacts.
    assert planned_jobs(workdir, moved) == []
    assert _touch_tree(corpora) > 0
    assert _touch_tree(workdir / "results", seconds_ahead=-3600) > 100  # inputs newer than outputs
    assert planned_jobs(workdir, moved) == []


def test_a_fresh_clone_of_the_project_runs_nothing(copy_of_built, tmp_path):
    workdir, config = copy_of_built
    clone = tmp_path / "clone"
    shutil.copytree(PROJECT, clone, ignore=shutil.ignore_patterns(
        ".venv*", ".git", "__pycache__", ".snakemake", "results", "logs", ".cache", "runs"))
    assert _touch_tree(clone) > 50  # every project file is new, the corpora included
    result = snakemake(workdir, config, "--dry-run", snakefile=clone / "Snakefile")
    assert "Nothing to be done" in result.stdout + result.stderr, result.stdout[-3000:]


def test_switching_a_config_back_runs_nothing_and_points_latest_at_its_report(copy_of_built):
    workdir, config = copy_of_built
    latest = workdir / "results" / "report" / "latest"
    first_report = latest.resolve()
    changed = with_changes(config, lambda c: c["merges"][0]["models"]["ct"].update(weight=0.3))
    snakemake(workdir, changed)
    assert latest.resolve() != first_report
    assert planned_jobs(workdir, config) == []
    result = snakemake(workdir, config)  # a real run with nothing to do
    assert "Nothing to be done" in result.stdout + result.stderr
    assert latest.resolve() == first_report


def test_a_deleted_artifact_is_rebuilt_alone_and_a_damaged_one_is_named(copy_of_built):
    workdir, config = copy_of_built
    (ct,) = (workdir / "results" / "ct" / "tiny" / "eu" / "2000").iterdir()
    shutil.move(ct, workdir / "ct-moved-away")
    # Everything built from it is finished: only the CT itself is missing, so only it runs.
    assert planned_jobs(workdir, config) == [("ct", str(ct.relative_to(workdir)))]
    shutil.move(workdir / "ct-moved-away", ct)
    weights = ct / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    result = snakemake(workdir, config, "--dry-run", check=False)
    assert result.returncode != 0
    assert f"{weights.relative_to(workdir)} is" in result.stdout + result.stderr
    assert "manifest says" in result.stdout + result.stderr
    verify = snakemake(workdir, config, "verify", check=False)
    assert verify.returncode != 0
    assert "DAMAGED" in verify.stdout + verify.stderr


def test_every_artifact_passes_verify(built):
    workdir, config = built
    result = snakemake(workdir, config, "verify")
    text = result.stdout + result.stderr
    assert re.search(r"\d+ artifacts under results: 0 damaged, 0 without a manifest", text), text


def test_changing_one_merge_hyperparameter_reruns_that_merge_its_evaluations_and_the_report(built):
    workdir, config = built
    changed = with_changes(config, lambda c: c["merges"][1]["models"]["ct"].update(density=0.7))
    jobs = planned_jobs(workdir, changed)
    assert Counter(rule for rule, _ in jobs) == {"merge": 3, "evaluate": 3, "report": 1}
    for rule, output in jobs:
        if rule != "report":
            assert "/ties/" in output and "ct.density0.7" in output, output


def _languages_of(output: str) -> set[str]:
    parts = output.split("/")
    return {lang for part in parts for lang in part.split("+") if lang in ("eu", "gl", "ca", "en")}


def _assert_every_job_but_the_report_names(jobs: list[tuple[str, str]], lang: str) -> None:
    for rule, output in jobs:
        if rule != "report":
            assert lang in _languages_of(output), output


def test_adding_a_language_runs_only_that_languages_jobs_and_the_report(built):
    workdir, config = built
    changed = with_changes(config, lambda c: c["languages"].update(ca={"corpus": "ca"}))
    jobs = planned_jobs(workdir, changed)
    assert Counter(rule for rule, _ in jobs) == {
        "prepare": 1,
        "evalset": 1,
        "ct": 1,
        "ctsft": 1,
        "merge": 4,  # ca with each of 2 methods, and the 2 multilingual merges now with ca
        "evaluate": 8,  # base and SFT on ca, then CT, CT-then-SFT and the 4 merges
        "report": 1,
    }
    _assert_every_job_but_the_report_names(jobs, "ca")


def test_changing_a_ct_learning_rate_reruns_that_ct_chain_only(built):
    workdir, config = built
    changed = with_changes(config, lambda c: c["languages"]["eu"].update(ct_train={"lr": 2e-3}))
    jobs = planned_jobs(workdir, changed)
    # eu's CT, its CT-then-SFT, its 2 merges and the 2 multilingual merges, their evaluations
    assert Counter(rule for rule, _ in jobs) == {
        "ct": 1,
        "ctsft": 1,
        "merge": 4,
        "evaluate": 6,
        "report": 1,
    }
    _assert_every_job_but_the_report_names(jobs, "eu")


def test_changing_the_shared_ct_settings_leaves_upstream_stages_alone(built):
    workdir, config = built
    changed = with_changes(config, lambda c: c["ct"]["train"].update(lr=2e-3))
    rules = Counter(rule for rule, _ in planned_jobs(workdir, changed))
    assert rules == {"ct": 2, "ctsft": 2, "merge": 6, "evaluate": 10, "report": 1}


@pytest.fixture
def copy_of_built(built, tmp_path):
    """The built workdir, copied, for tests that run more jobs in it."""
    workdir, config = built
    copy = tmp_path / "workflow"
    shutil.copytree(workdir, copy, symlinks=True)
    return copy, config


def test_a_grid_is_one_sweep_job_whose_variants_equal_separate_merges(copy_of_built):
    from safetensors.torch import load_file

    workdir, config = copy_of_built
    grid = with_changes(config, lambda c: c["merges"][1]["models"]["ct"].update(density=[0.3, 0.5]))
    jobs = planned_jobs(workdir, grid)
    assert Counter(rule for rule, _ in jobs) == {"merge_sweep": 3, "evaluate": 6, "report": 1}
    snakemake(workdir, grid)
    (sweep,) = (workdir / "results" / "sweep" / "tiny" / "eu" / "2000" / "ties").iterdir()
    variants = sorted(p for p in sweep.glob("*/*") if (p / "recipe.json").is_file())
    assert len(variants) == 2
    (same,) = [v for v in variants if "ct.density0.5" in v.parent.name]
    # The density-0.5 variant has the recipe, so the digest, of the merge built alone before.
    alone = workdir / "results" / "merge" / "tiny" / "eu" / "2000" / "ties" / same.parent.name
    alone = alone / same.name
    assert alone.is_dir()
    swept, single = load_file(same / "model.safetensors"), load_file(alone / "model.safetensors")
    assert swept.keys() == single.keys()
    assert all(swept[name].equal(single[name]) for name in swept)


def _merge_scores(workdir: Path, on_load: bool) -> dict[tuple, float]:
    scores = {}
    for path in (workdir / "results" / "eval" / "merge").rglob("scores.json"):
        stored = json.loads(path.read_text())
        if ("merge" in stored["recipe"]) == on_load:
            for row in stored["results"]:
                key = (stored["subject"]["path"], row["suite"], row["task"], row["metric"])
                scores[key] = row["value"]
    return scores


def test_merge_on_load_writes_no_checkpoint_and_scores_the_same(copy_of_built):
    workdir, config = copy_of_built
    on_load = with_changes(config, lambda c: c.update(merge_options={"materialize": False}))
    jobs = planned_jobs(workdir, on_load)
    assert Counter(rule for rule, _ in jobs) == {"merge_diagnostics": 6, "evaluate": 6,
                                                 "report": 1}
    snakemake(workdir, on_load)
    materialized, in_memory = _merge_scores(workdir, False), _merge_scores(workdir, True)
    assert materialized.keys() == in_memory.keys() and len(in_memory) >= 6
    for key, value in materialized.items():
        assert in_memory[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # The diagnostics still come, from a pass that writes no weights, equal to the written
    # merge's; the report matches them to the merge-on-load scores.
    diagnosed = sorted((workdir / "results" / "merge-diagnostics").rglob("diagnostics.json"))
    assert len(diagnosed) == 6
    for path in diagnosed:
        assert not list(path.parent.glob("*.safetensors"))
        written = workdir / "results" / "merge" / path.parent.relative_to(
            workdir / "results" / "merge-diagnostics")
        written = next(written.parent.glob("*/diagnostics.json"))
        assert json.loads(path.read_text()) == json.loads(written.read_text())
    rows = pd.read_csv(workdir / "results" / "report" / "latest" / "diagnostics.csv")
    assert len(set(rows["model_digest"])) == 6


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda c: c["merges"][0].update(lamda=1.0), "merges[0].lamda"),
        (lambda c: c.update(budgets=[-5]), "budgets[0]"),
        (lambda c: c["languages"]["eu"].update(corpus="basque"), "languages.eu.corpus"),
        (lambda c: c["merges"][1].update(method="tiess"), "merges[1]"),
    ],
)
def test_an_invalid_config_fails_before_any_job_naming_the_key(tmp_path, change, key):
    result = snakemake(tmp_path, with_changes(tiny_config(), change), check=False)
    assert result.returncode != 0
    assert key in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()
    assert not (tmp_path / "logs").exists()
