"""Task families: the registry, the planner's expansion per language, a language-indexed
multiple-choice family over local JSON files run through lm-eval into the report's methods x
languages table (with chance and majority rows), and a hub preset's report plan."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_resume import tiny_model
from workflow_utils import PROJECT, tiny_config

from workflow.artifacts import digest_of
from workflow.config import validate_config
from workflow.plan import Plan
from workflow.report.load import load_scores
from workflow.report.tables import AVERAGE, build_family_table, table_markdown
from workflow.tasks import FamilyError, family_task, parse_families

FAMILY_DIR = PROJECT / "tests" / "tasks" / "lrm_mc"
LANGS = ["eu", "gl"]


def test_family_tasks_per_language() -> None:
    assert family_task("belebele", "eu") == "belebele_eus_Latn"
    assert family_task("belebele", "mon") == "belebele_khk_Cyrl"
    assert family_task("xcopa", "tam") == "xcopa_ta"
    assert family_task("xcopa", "it") == "xcopa_it"  # a code the family shares
    assert family_task("topic", "eu") == "topic"
    with pytest.raises(FamilyError, match="unknown task family 'belbele'"):
        family_task("belbele", "eu")


@pytest.mark.parametrize(("spec", "message"), [
    ({"task": "belebele", "metric": "acc"}, r"needs a \{code\} placeholder"),
    ({"task": "x_{code}"}, r"families.bad.metric must be a non-empty string"),
    ({"task": "x_{code}", "metric": "acc", "langs": []}, r"unknown keys \['langs'\]"),
    ({"task": "x_{code}", "metric": "acc", "codes": {"eu": 3}}, "must map language codes"),
])
def test_bad_registry_names_the_key(spec: dict, message: str) -> None:
    with pytest.raises(FamilyError, match=message):
        parse_families({"families": {"bad": spec}}, "families.yaml")


def test_planner_expands_a_family_per_language(tmp_path: Path) -> None:
    config = tiny_config()
    config["evaluation"]["families"] = ["lrm_mc", "topic"]
    plan = Plan(validate_config(config, PROJECT), tmp_path)
    suites: dict[str, set[str]] = {}
    for artifact in plan.evaluations:
        for suite, spec in artifact.recipe["suites"].items():
            suites.setdefault(suite, set()).update(spec["tasks"])
    assert suites == {"eu": {"topic", "bpb", "lrm_mc_eu"}, "gl": {"topic", "bpb", "lrm_mc_gl"},
                      "en": {"topic", "lrm_mc_en"}}  # topic once: the family and the task agree


def _score_file(directory: Path, subject: dict, raw: dict) -> Path:
    from workflow.evaluate import PlannedTask, collect_items, collect_results

    planned = [PlannedTask(s, family_task("lrm_mc", s), family_task("lrm_mc", s))
               for s in [*LANGS, "en"]]
    rows, _ = collect_results(raw, planned)
    recipe = {"stage": "evaluate", "subject": subject}
    path = directory / f"{digest_of(recipe)}.json"
    path.write_text(json.dumps({"digest": digest_of(recipe), "subject": subject,
                                "results": rows, "items": collect_items(raw)}))
    return path


@pytest.fixture(scope="module")
def family_scores(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], dict]:
    """The lrm_mc family on eu, gl and en, scored by lm-eval on a tiny random model."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tmp = tmp_path_factory.mktemp("family")
    model = tiny_model(tmp)
    tasks = tmp / "tasks"
    tasks.mkdir()
    for lang in [*LANGS, "en"]:
        variant = {"include": str(FAMILY_DIR / "_lrm_mc.yaml"), "task": f"lrm_mc_{lang}",
                   "dataset_kwargs": {"data_files": {"test": str(FAMILY_DIR / f"{lang}.jsonl")}}}
        (tasks / f"lrm_mc_{lang}.yaml").write_text(yaml.safe_dump(variant))
    raw = lm_eval.simple_evaluate(
        model=HFLM(pretrained=str(model), tokenizer=str(model), batch_size=8, device="cpu"),
        tasks=[f"lrm_mc_{lang}" for lang in [*LANGS, "en"]],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    subject = {"kind": "base", "model": "tiny", "langs": [], "tokens": None, "method": None,
               "hparams": None, "model_digest": "0" * 12}
    paths = [_score_file(tmp, subject, raw)]
    for lang in LANGS:  # the same model filed as a CT model per language: a second row
        ct = {**subject, "kind": "ct", "langs": [lang], "tokens": 1000,
              "model_digest": f"{lang:0<12}"}
        paths.append(_score_file(tmp, ct, raw))
    return paths, raw


def test_local_family_through_lm_eval_into_the_table(family_scores) -> None:
    paths, raw = family_scores
    items: dict = {}
    frame = load_scores(paths, items)
    assert set(frame["family"]) == {"lrm_mc"}
    table = build_family_table(frame, items, "lrm_mc", 1000, english=False)
    assert table.langs == LANGS and table.metric == "acc"
    for lang in LANGS:
        reported = raw["results"][f"lrm_mc_{lang}"]["acc,none"]
        cell = table.rows["base"][lang]
        assert cell.value == pytest.approx(reported)
        # the per-item results the evaluate stage keeps reproduce lm-eval's aggregate
        assert cell.items is not None and cell.items.metrics["acc"].mean() == pytest.approx(
            reported)
        assert table.rows["CT"][lang].value == pytest.approx(reported)
    # three choices per item; the data's answers are 6 x "0", 4 x "1", 2 x "2"
    assert table.baselines["chance"] == pytest.approx({"eu": 1 / 3, "gl": 1 / 3, AVERAGE: 1 / 3})
    assert table.baselines["majority"] == pytest.approx({"eu": 0.5, "gl": 0.5, AVERAGE: 0.5})
    markdown = table_markdown(table)
    assert "| *chance* | *0.333* | *0.333* | *0.333* |" in markdown
    assert "| model | eu | gl | avg |" in markdown
    english = build_family_table(frame, items, "lrm_mc", 1000, english=True)
    assert english.rows["CT"]["eu"].value == pytest.approx(raw["results"]["lrm_mc_en"]["acc,none"])


def test_report_plan_of_a_hub_preset() -> None:
    proc = subprocess.run([sys.executable, "-m", "workflow.report", "plan",
                           "presets/tao2024-llama2-7b.yaml"], cwd=PROJECT, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "## belebele (acc)" in out
    assert "columns ben | bod | mon | ory | tam | tel | uig | avg" in out
    assert "mon: belebele_khk_Cyrl" in out and "## xcopa (acc)" in out
