"""The hub presets plan the expected jobs with their GPU resources (dry run: no hub here)."""

from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path

import pytest
import yaml
from workflow_utils import PROJECT, planned_job_details


def load_preset(name: str) -> dict:
    return yaml.safe_load((PROJECT / "presets" / f"{name}.yaml").read_text())


def stand_in_corpora(workdir: Path, config: dict) -> None:
    """Tiny files where the preset expects the user's corpora (dry runs only hash them)."""
    for spec in config["corpora"].values():
        path = workdir / spec["path"]
        if not (PROJECT / spec["path"]).exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with gzip.open(path, "wt") as handle:
                handle.write('{"text": "stand-in"}\n')


@pytest.fixture
def dry_run(tmp_path):
    def run(config: dict) -> list[dict]:
        stand_in_corpora(tmp_path, config)
        return planned_job_details(tmp_path, config)

    return run


def test_tao2024_plans_ct_per_language_and_budget_on_gpus(dry_run):
    config = load_preset("tao2024-llama2-7b")
    jobs = dry_run(config)
    rules = Counter(job["rule"] for job in jobs)
    langs, budgets = len(config["languages"]), len(config["budgets"])
    assert rules["import_hf"] == 2  # Llama-2-7b and the FLAN SFT model
    assert rules["ct"] == langs * budgets
    # linear and ties one job each; ties_sv's two slacks one sweep; per language and all
    assert rules["merge"] == (langs + 1) * budgets * 2
    assert rules["merge_sweep"] == (langs + 1) * budgets
    # base and SFT per suite (7 languages + English), each CT, each of the 4 merge variants
    assert rules["evaluate"] == 2 * (langs + 1) + langs * budgets + 4 * (langs + 1) * budgets
    assert "ctsft" not in rules and "pretrain" not in rules and "tokenizer" not in rules
    assert {job["resources"]["gpu"] for job in jobs if job["rule"] == "ct"} == {"8"}
    assert {job["resources"]["gpu"] for job in jobs if job["rule"] == "evaluate"} == {"1"}
    # registry tasks bring their own data: no held-out sets are built
    assert "evalset" not in rules
    ct_outputs = {job["output"] for job in jobs if job["rule"] == "ct"}
    assert any(out.startswith("results/ct/llama2-7b/bod/1000000000/") for out in ct_outputs)


def test_tao2024_can_use_the_released_ct_checkpoints(dry_run):
    config = load_preset("tao2024-llama2-7b")
    config["budgets"] = [1000000000]
    for lang in config["languages"]:
        config["languages"][lang]["released_ct"] = [
            {"tokens": 1000000000, "id": f"pkupie/Llama-2-7b-{lang}"}
        ]
    rules = Counter(job["rule"] for job in dry_run(config))
    assert "ct" not in rules and "prepare" not in rules
    assert rules["import_hf"] == 2 + len(config["languages"])


def test_iberian_llama3_mixes_released_and_trained_ct(dry_run):
    config = load_preset("iberian-llama3")
    jobs = dry_run(config)
    rules = Counter(job["rule"] for job in jobs)
    assert rules["import_hf"] == 4  # base, instruct, Latxa, Carballo
    assert rules["ct"] == 2  # ca and es
    assert {job["resources"]["gpu"] for job in jobs if job["rule"] == "ct"} == {"4"}
    multilingual = [j["rule"] for j in jobs if "/ca+es+eu+gl/" in (j["output"] or "")]
    # linear, ties, ties_sv one job each; task arithmetic's two lambdas one sweep job
    assert Counter(multilingual) == {"merge": 3, "merge_sweep": 1, "evaluate": 5}
