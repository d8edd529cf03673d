"""The selection protocol: a dev split of the held-out documents, dev suites for the merges of
a swept grid, the grid point chosen on dev and marked in the test table, and the claims using
only the chosen point."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from test_report_claims import LANGS, LOW, MERGES, write_score
from workflow_utils import PROJECT, tiny_config

from workflow.config import validate_config
from workflow.corpus import dev_or_test
from workflow.data import DEV_FRACTION, evalset
from workflow.plan import Plan
from workflow.prompts import TOPICS
from workflow.report.claims import SUPPORTED, check_claims
from workflow.report.load import load_scores
from workflow.report.tables import family_tables, table_markdown


def test_dev_split_is_disjoint_from_test_and_never_touches_train(tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    records = [{"text": f"held-out paragraph number {i}", "split": "test",
                "topic": TOPICS[i % len(TOPICS)]} for i in range(200)]
    records += [{"text": f"training paragraph {i}", "split": "train"} for i in range(50)]
    records += [{"text": "marked dev paragraph", "split": "dev", "topic": TOPICS[0]}]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
    recipe = {"stage": "evalset", "version": "2",
              "params": {"heldout_fraction": 0.05, "max_topic_docs": None,
                         "max_heldout_docs": None}}
    evalset(recipe, corpus, tmp_path / "out")

    def texts(path: Path) -> set[str]:
        return {json.loads(line)["text"] for line in path.read_text().splitlines()}

    test = texts(tmp_path / "out" / "topic.jsonl")
    dev = texts(tmp_path / "out" / "dev" / "topic.jsonl")
    assert not test & dev and len(test) + len(dev) == 201
    assert "marked dev paragraph" in dev and not any("training" in t for t in test | dev)
    assert dev == {t for t in test | dev if dev_or_test(t, DEV_FRACTION) == "dev"} | {
        "marked dev paragraph"}
    assert 60 < len(dev) < 140  # about DEV_FRACTION of 200
    assert texts(tmp_path / "out" / "dev" / "heldout.jsonl") == dev


def test_grid_merges_get_dev_suites(tmp_path: Path) -> None:
    config = tiny_config()
    config["merges"].append({"method": "ties_sv", "slack": [0.1, 0.2],
                             "models": {"ct": {"weight": 1.0, "density": 0.5},
                                        "sft": {"weight": 1.0, "density": 0.5}}})
    plan = Plan(validate_config(config, PROJECT), tmp_path)
    seen = 0
    for artifact in plan.evaluations:
        subject, suites = artifact.recipe["subject"], artifact.recipe["suites"]
        dev = sorted(s for s in suites if s.endswith("_dev"))
        if subject["method"] != "ties_sv":  # no grid: no dev evaluation
            assert not dev, subject
            continue
        seen += 1
        assert dev == [f"{lang}_dev" for lang in subject["langs"]]
        for suite in dev:
            lang = suite.removesuffix("_dev")
            assert suites[suite] == {"tasks": ["topic", "bpb"], "data": suites[lang]["data"]}
            assert artifact.cli["suite"][suite] == artifact.inputs["suite"][lang] + "/dev"
    assert seen == 2 * 3  # eu, gl and the multilingual merge, two grid points each


def test_grid_point_chosen_on_dev_reported_on_test(tmp_path: Path) -> None:
    """ties_sv #1 wins on test, #2 on dev: #2 is marked, and the claims see #2 only."""
    paths = []
    for i, lang in enumerate(LANGS):
        paths.append(write_score(tmp_path, "ctsft", [lang], LOW, {lang: 0.4}, seed=10 + i))
        for point, (test, dev) in enumerate([(0.9, 0.3), (0.6, 0.7)], start=1):
            path = write_score(tmp_path, "merge", [lang], LOW,
                               {lang: test, f"{lang}_dev": dev}, "ties_sv", seed=20 + 3 * i + point)
            data = json.loads(path.read_text())
            data["subject"]["hparams"] = f"slack0.{point}"
            data["subject"]["model_digest"] = f"{lang}{point}".ljust(12, "0")
            path.write_text(json.dumps(data))
            paths.append(path)
    items: dict = {}
    frame = load_scores(paths, items)
    assert set(frame.loc[frame["suite"].str.endswith("_dev"), "split"]) == {"dev"}
    tables = family_tables(frame, items)
    table = next(t for t in tables if not t.english)
    assert table.selected == {"TIES-SV #2"}
    assert table.langs == LANGS  # the dev suites are no columns
    assert "| TIES-SV #2 \u2713 |" in table_markdown(table)
    claims = {c.name: c for c in check_claims(tables, pd.DataFrame())}
    assert claims["low_budget"].verdict == SUPPORTED
    assert "TIES-SV #2" in claims["low_budget"].evidence
    assert "TIES-SV #1" not in claims["low_budget"].evidence
    assert MERGES["ties_sv"]  # the shared fixture's grid names stay in step
