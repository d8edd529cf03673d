"""The hub presets plan the expected jobs with their GPU resources (dry run: no hub here)."""

from __future__ import annotations

import gzip
import itertools
import json
from collections import Counter
from pathlib import Path

import pytest
import yaml
from workflow_utils import PROJECT, planned_job_details

from workflow.artifacts import sha256_file
from workflow.config import validate_config
from workflow.ladder import RunShape
from workflow.plan import Plan, language_budgets

# The instruction data each preset's CT-then-SFT trains on, as its recipes pin it.
PRESET_SFT_DATA = {
    "tao2024-llama2-7b": {
        "hub": "Open-Orca/FLAN", "revision": "f9d206530506005823210949e7e18f0d603ce731",
        "subset": None, "data_files": "flan_zsopt_data/*.parquet", "split": "train"},
    "iberian-llama3": {
        "hub": "tatsu-lab/alpaca", "revision": "ad0d1bfba0420c623c7adafce3482ded744d4e21",
        "subset": None, "data_files": None, "split": "train"},
    "gemma-270m-iberian": {
        "sha256": sha256_file(PROJECT / "data" / "topic-instructions" / "en.jsonl.gz")},
}
PRESET_SFT_DATA["iberian-qwen25"] = PRESET_SFT_DATA["iberian-llama3"]
PRESET_CHAT_TEMPLATE = {"tao2024-llama2-7b": False, "iberian-llama3": "auto",
                        "iberian-qwen25": True, "gemma-270m-iberian": False}


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
    # base and SFT per suite (7 languages + English), each CT and CT-then-SFT, each of the 4
    # merge variants
    assert rules["evaluate"] == 2 * (langs + 1) + 2 * langs * budgets + 4 * (langs + 1) * budgets
    assert rules["ctsft"] == langs * budgets  # FLAN on each CT model, as the paper's baseline
    assert "sft" not in rules and "pretrain" not in rules and "tokenizer" not in rules
    assert {job["resources"]["gpu"] for job in jobs if job["rule"] == "ct"} == {"8"}
    assert {job["resources"]["gpu"] for job in jobs if job["rule"] == "ctsft"} == {"8"}
    assert {job["resources"]["gpu"] for job in jobs if job["rule"] == "evaluate"} == {"1"}
    # bits per byte on each language's held-out text and on English: one held-out set each
    assert rules["evalset"] == langs + 1
    ct_outputs = {job["output"] for job in jobs if job["rule"] == "ct"}
    assert any(out.startswith("results/ct/llama2-7b/bod/1000272691/") for out in ct_outputs)


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
    assert rules["ctsft"] == 4  # on the two trained and the two released CT models
    assert {job["resources"]["gpu"] for job in jobs if job["rule"] == "ct"} == {"4"}
    assert {job["resources"]["gpu"] for job in jobs if job["rule"] == "ctsft"} == {"4"}
    multilingual = [j["rule"] for j in jobs if "/ca+es+eu+gl/" in (j["output"] or "")]
    # linear, ties, ties_sv one job each; task arithmetic's two lambdas one sweep job
    assert Counter(multilingual) == {"merge": 3, "merge_sweep": 1, "evaluate": 5}


@pytest.mark.parametrize("name", sorted(p.stem for p in (PROJECT / "presets").glob("*.yaml")))
def test_every_preset_plans_ct_then_sft_on_its_instruction_data(name, tmp_path):
    config = load_preset(name)
    stand_in_corpora(tmp_path, config)
    validated = validate_config(config, tmp_path)
    plan = Plan(validated, workdir=tmp_path)
    ctsft = [artifact for (rule, _), artifact in plan.by_key.items() if rule == "ctsft"]
    chains = [(lang, tokens) for lang in validated["languages"]
              for tokens in language_budgets(validated, lang)]
    assert validated["ct_sft"]["enabled"] and len(ctsft) == len(chains) > 0
    assert name in PRESET_SFT_DATA, f"pin {name}'s instruction data in PRESET_SFT_DATA"
    for artifact in ctsft:
        assert artifact.recipe["dataset"] == PRESET_SFT_DATA[name]
        assert artifact.recipe["params"]["chat_template"] == PRESET_CHAT_TEMPLATE[name]


def preset_plan(name: str, tmp_path: Path) -> tuple[dict, Plan]:
    config = load_preset(name)
    stand_in_corpora(tmp_path, config)
    validated = validate_config(config, tmp_path)
    return validated, Plan(validated, workdir=tmp_path)


def artifacts(plan: Plan, rule: str) -> list:
    return [artifact for (kind, _), artifact in plan.by_key.items() if kind == rule]


def test_tao2024_trains_as_the_released_checkpoints_cards_say(tmp_path):
    """The values of pkupie/Llama-2-7b-*'s cards: one run per language, lr 3e-5 cosine to 1e-6
    over 10,240 steps of 1M tokens (2K x 512), English replay 4:1; the budgets are checkpoints
    of it, the largest at the decay's end."""
    config, plan = preset_plan("tao2024-llama2-7b", tmp_path)
    train = config["ct"]["train"]
    assert (train["lr"], train["min_lr"], train["seq_len"]) == (3.0e-5, 1.0e-6, 2048)
    assert train["batch_size"] * train["grad_accum"] == 512
    assert train["batch_size"] * train["grad_accum"] * train["seq_len"] == 1_048_576
    assert config["ct"]["replay"] == {"corpus": "en", "share": 0.2}  # 4:1 target:English
    assert config["ct"]["schedule"] == {"mode": "one_run", "steps": 10240, "tokens": None}
    shape = RunShape.of(train, 0.2)
    assert [shape.steps(b) for b in config["budgets"]] == [1193, 2386, 5964, 10240]
    assert all(shape.is_checkpoint(b) for b in config["budgets"])
    cts = artifacts(plan, "ct")
    assert len(cts) == len(config["languages"]) * len(config["budgets"])
    for ct in cts:
        assert ct.recipe["params"]["schedule"] == {"mode": "one_run", "steps": 10240}
        assert ct.recipe["params"]["replay"] == {"share": 0.2}
    # each larger budget resumes from the checkpoint below it: the ladder trains the largest
    bod = sorted((a for a in cts if "/bod/" in a.path), key=lambda a: a.recipe["params"]["tokens"])
    for lower, upper in itertools.pairwise(bod):
        assert lower.path in json.dumps(upper.inputs)
    assert not any(a.path in json.dumps(bod[0].inputs) for a in cts)


def test_tao2024_evaluates_bpb_in_the_training_script_and_belebele(tmp_path):
    config, plan = preset_plan("tao2024-llama2-7b", tmp_path)
    suites = {}
    for evaluation in artifacts(plan, "evaluate"):
        for suite, spec in evaluation.recipe["suites"].items():
            suites.setdefault(suite, set()).update(spec["tasks"])
    # bpb on the held-out text of each language's own corpus (the script it was trained in)
    assert all("bpb" in suites[lang] for lang in config["languages"])
    assert {"bpb", "belebele_eng_Latn", "arc_easy", "hellaswag"} <= suites["en"]
    # Belebele has Mongolian only in Cyrillic; MC^2 is in the traditional script (documented)
    assert "belebele_khk_Cyrl" in suites["mon"]
    assert "Cyrillic" in (PROJECT / "presets" / "tao2024-llama2-7b.yaml").read_text()
    assert {"xcopa_ta", "belebele_tam_Taml"} <= suites["tam"]
    assert len(artifacts(plan, "evalset")) == len(config["languages"]) + 1


def test_iberian_presets_use_the_real_token_counts_two_families_and_chat_templates(tmp_path):
    config, plan = preset_plan("iberian-llama3", tmp_path)
    released = {lang: spec["released_ct"][0] for lang, spec in config["languages"].items()
                if spec.get("released_ct")}
    assert {lang: (r["id"], r["tokens"]) for lang, r in released.items()} == {
        "eu": ("HiTZ/Latxa-Llama-3.1-8B", 4_200_000_000),  # Latxa's card: about 4.2B tokens
        "gl": ("proxectonos/Llama-3.1-Carballo", 20_000_000_000),  # Carballo's: about 20B
    }
    # the four languages' CT models, at their different budgets, in one multilingual merge
    multilingual = [a for a in artifacts(plan, "merge") if "/ca+es+eu+gl/" in a.path]
    assert multilingual and all("/20000000000/" in a.path for a in multilingual)
    imports = {a.path: a for a in artifacts(plan, "import_hf")}
    models = multilingual[0].inputs["models"]
    assert {imports[path].recipe["params"]["id"] for path in models if path in imports} == {
        "HiTZ/Latxa-Llama-3.1-8B", "proxectonos/Llama-3.1-Carballo",
        "meta-llama/Llama-3.1-8B-Instruct"}
    assert sum("/ct/llama31-8b/" in path and "/1000000000/" in path for path in models) == 2
    chat = {}
    for evaluation in artifacts(plan, "evaluate"):
        chat.setdefault(evaluation.recipe["subject"]["kind"], set()).add(
            evaluation.recipe["params"]["chat_template"])
    assert chat == {"base": {False}, "ct": {False}, "sft": {True}, "ctsft": {"auto"},
                    "merge": {True}}

    second, plan = preset_plan("iberian-qwen25", tmp_path)
    assert second["model"]["hf"]["id"].split("/")[0] != config["model"]["hf"]["id"].split("/")[0]
    assert second["sft"]["hf"]["id"] == "Qwen/Qwen2.5-7B-Instruct"
    assert len(artifacts(plan, "ct")) == 4  # no released Iberian Qwen2.5 bases: all CT here
    assert {a.recipe["params"]["chat_template"] for a in artifacts(plan, "evaluate")
            if a.recipe["subject"]["kind"] in ("sft", "ctsft", "merge")} == {True}
