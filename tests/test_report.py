"""The report stage on synthetic score files: CSV rows, table cells, plots, timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from workflow.artifacts import digest_of, write_recipe
from workflow.report import ReportError, format_tokens, load_score_file

ROOT = Path(__file__).resolve().parents[1]
LANGS = ["eu", "ca"]
BUDGETS = [20000, 100000]
TIES = ("ties", "density0.5-lambda1.0")
MISSING = "\u2013"  # en dash
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "workflow.report", *args], check=False,
                          cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def make_subject(kind: str, langs: list[str], tokens: int | None = None,
                 method: str | None = None, hparams: str | None = None) -> dict:
    return {"kind": kind, "langs": langs, "tokens": tokens, "method": method,
            "hparams": hparams}


def subjects() -> list[dict]:
    """base, SFT, CT, CT-then-SFT and merges over 2 languages x 2 budgets, some cells missing."""
    found = [make_subject("base", []), make_subject("sft", [])]
    for lang in LANGS:
        for tokens in BUDGETS:
            found.append(make_subject("ct", [lang], tokens))
            found.append(make_subject("ctsft", [lang], tokens))
            found.append(make_subject("merge", [lang], tokens, *TIES))
    # A second merge method evaluated at one cell only: the other cells must read "missing".
    found.append(make_subject("merge", ["eu"], 20000, "linear", "weight0.5"))
    for tokens in BUDGETS:  # one multilingual merge per budget
        found.append(make_subject("merge", ["eu", "ca"], tokens, *TIES))
    for subject in found:
        subject["model"] = "tiny-llama"
        subject["model_digest"] = digest_of(model_recipe(subject))
        subject["path"] = f"results/{subject['kind']}/{subject['model_digest']}"
    return found


def model_recipe(subject: dict) -> dict:
    """A stand-in for the recipe of the model a subject names."""
    keys = ("kind", "model", "langs", "tokens", "method", "hparams")
    return {"stage": subject["kind"], "params": {key: subject[key] for key in keys}}


def label_of(subject: dict) -> str:
    names = {"base": "base", "sft": "SFT", "ct": "CT", "ctsft": "CT-then-SFT"}
    label = names.get(subject["kind"]) or f"{subject['method']} {subject['hparams']}"
    if len(subject["langs"]) > 1:
        label += " (" + "+".join(subject["langs"]) + ")"
    return label


def make_result(suite: str, task: str, kind: str, metric: str, value: float,
                stderr: float | None) -> dict:
    return {"suite": suite, "task": task, "kind": kind, "metric": metric, "value": value,
            "stderr": stderr}


def results_for(index: int, subject: dict) -> list[dict]:
    """Distinct 3-decimal values, so each table cell identifies exactly one result."""
    results = []
    for j, suite in enumerate(["eu", "ca", "en"]):
        base = 0.2 + 0.01 * index + 0.003 * j
        results.append(make_result(suite, f"lrm_topic_{suite}", "topic", "acc", round(base, 3),
                                   0.01))
        results.append(make_result(suite, f"lrm_bpb_{suite}", "bpb", "bits_per_byte",
                                   round(1.0 + base, 3), None))
    if subject["kind"] in ("base", "ct"):  # an lm-eval registry task, two metrics
        value = round(0.5 + 0.01 * index, 3)
        results.append(make_result("eu", "xnli_eu", "xnli_eu", "acc", value, 0.02))
        results.append(make_result("eu", "xnli_eu", "xnli_eu", "acc_norm", 0.4, 0.02))
    return results


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("report")
    files, expected = [], []
    for index, subject in enumerate(subjects()):
        results = results_for(index, subject)
        recipe = {"stage": "evaluate", "version": "1", "params": {"i": index}}
        path = tmp / "scores" / f"{index:02d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"digest": digest_of(recipe), "recipe": recipe,
                                    "subject": subject, "results": results,
                                    "n_samples": {}, "wall_s": 1.5}))
        files.append(str(path))
        expected.append((subject, results, digest_of(recipe)))
    # Training metrics of the CT eu@20k model, linked through the recipe.json beside it.
    ct = next(s for s in subjects() if s["kind"] == "ct" and s["langs"] == ["eu"]
              and s["tokens"] == 20000)
    model_dir = tmp / "models" / "ct-eu-20k"
    model_dir.mkdir(parents=True)
    write_recipe(model_dir, model_recipe(ct))
    assert json.loads((model_dir / "recipe.json").read_text())["digest"] == ct["model_digest"]
    (model_dir / "metrics.json").write_text(json.dumps({
        "tokens_budget": 20000, "tokens_trained": 20480, "steps": 40, "wall_s": 4.4,
        "tokens_per_s": 4654.5, "final_loss": 3.2109, "peak_rss_mb": 812.0}))
    out = tmp / "out"
    run_cli("--scores", *files, "--train-metrics", str(model_dir / "metrics.json"),
            "--recipe", json.dumps({"stage": "report", "version": "1", "params": {}}),
            "--out", str(out))
    return {"out": out, "expected": expected}


def parse_tables(markdown: str) -> dict[str, pd.DataFrame]:
    """Heading -> table of cell strings, indexed by the first column."""
    tables, heading, lines = {}, None, []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            lines.append([cell.strip() for cell in line.strip("|").split("|")])
            continue
        if lines:
            header, body = lines[0], lines[2:]
            tables[heading] = pd.DataFrame(body, columns=header).set_index(header[0])
            lines = []
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
    return tables


def find_table(tables: dict[str, pd.DataFrame], *words: str) -> pd.DataFrame:
    hits = [h for h in tables if all(w in h for w in words)]
    assert len(hits) == 1, (words, list(tables))
    return tables[hits[0]]


def expected_cells(expected: list, task_kind: str, metric: str, english: bool) -> dict:
    """The documented cell rule, restated independently of the implementation."""
    cells = {}
    for subject, results, _ in expected:
        for lang in LANGS:
            for tokens in BUDGETS:
                if subject["langs"] and (subject["tokens"] != tokens or (
                        len(subject["langs"]) == 1 and subject["langs"] != [lang])):
                    continue
                suite = "en" if english else lang
                for r in results:
                    if (r["kind"], r["metric"], r["suite"]) == (task_kind, metric, suite):
                        cells[(label_of(subject), f"{lang}@{format_tokens(tokens)}")] = r["value"]
    return cells


def test_scores_csv_rows_and_columns(report: dict) -> None:
    frame = pd.read_csv(report["out"] / "scores.csv", keep_default_na=False)
    assert list(frame.columns) == [
        "kind", "model", "langs", "tokens", "method", "hparams", "model_digest", "suite",
        "task", "task_kind", "metric", "value", "stderr", "score_digest", "label"]
    assert len(frame) == sum(len(results) for _, results, _ in report["expected"])
    for subject, results, score_digest in report["expected"]:
        rows = frame[frame["score_digest"] == score_digest]
        assert len(rows) == len(results)
        assert set(rows["kind"]) == {subject["kind"]}
        assert set(rows["model_digest"]) == {subject["model_digest"]}
        assert set(rows["langs"]) == {"+".join(subject["langs"])}
        assert set(rows["tokens"].astype(str)) == {"" if subject["tokens"] is None
                                                   else str(subject["tokens"])}
        assert set(rows["label"]) == {label_of(subject)}
        got = sorted(zip(rows["task"], rows["metric"], rows["value"].astype(float),
                         strict=True))
        assert got == sorted((r["task"], r["metric"], r["value"]) for r in results)
    assert (report["out"] / "recipe.json").is_file()


@pytest.mark.parametrize(("words", "task_kind", "metric", "english"), [
    (("Topic accuracy on the target language",), "topic", "acc", False),
    (("Bits per byte on the target language", "lower is better"), "bpb", "bits_per_byte",
     False),
    (("English retention",), "topic", "acc", True),
    (("xnli_eu on the target language", "acc;"), "xnli_eu", "acc", False),
])
def test_table_cells(report: dict, words: tuple, task_kind: str, metric: str,
                     english: bool) -> None:
    table = find_table(parse_tables((report["out"] / "table.md").read_text()), *words)
    cells = expected_cells(report["expected"], task_kind, metric, english)
    rows = sorted({label for label, _ in cells})
    assert sorted(table.index) == rows
    if task_kind == "xnli_eu":  # only eu is scored: the ca columns are dropped
        assert list(table.columns) == ["eu@20k", "eu@100k"]
    else:
        assert list(table.columns) == ["ca@20k", "ca@100k", "eu@20k", "eu@100k"]  # languages sorted
    assert list(table.index[:4]) == ["base", "SFT", "CT", "CT-then-SFT"][:len(table.index[:4])] \
        or task_kind == "xnli_eu"
    for label in table.index:
        for column in table.columns:
            text = table.at[label, column].strip("*")
            want = cells.get((label, column))
            assert text == (MISSING if want is None else f"{want:.3f}"), (label, column)
    # The best value of each column is bold: smallest for bits per byte, largest otherwise.
    for column in table.columns:
        values = {label: float(text.strip("*")) for label, text in table[column].items()
                  if text != MISSING}
        if len(values) > 1:
            best = (min if metric == "bits_per_byte" else max)(values, key=values.get)
            assert table.at[best, column].startswith("**"), column


def test_table_specific_cells(report: dict) -> None:
    """A few cells spelled out, as a reader would check them against the score files."""
    tables = parse_tables((report["out"] / "table.md").read_text())
    topic = find_table(tables, "Topic accuracy on the target language")
    by_key = {(s["kind"], s["method"], tuple(s["langs"]), s["tokens"]): r
              for s, r, _ in report["expected"]}

    def topic_value(key: tuple, suite: str) -> str:
        return next(f"{r['value']:.3f}" for r in by_key[key]
                    if r["kind"] == "topic" and r["suite"] == suite)

    base = topic_value(("base", None, (), None), "eu")
    assert topic.at["base", "eu@20k"].strip("*") == base == topic.at["base", "eu@100k"].strip("*")
    assert topic.at["CT", "ca@100k"].strip("*") == topic_value(("ct", None, ("ca",), 100000), "ca")
    multi = "ties density0.5-lambda1.0 (eu+ca)"
    assert topic.at[multi, "ca@20k"].strip("*") == topic_value(
        ("merge", "ties", ("eu", "ca"), 20000), "ca")
    assert topic.at["linear weight0.5", "eu@20k"].strip("*") == topic_value(
        ("merge", "linear", ("eu",), 20000), "eu")
    assert topic.at["linear weight0.5", "ca@20k"] == MISSING
    training = tables["Training"]
    assert list(training.index) == ["CT"]
    assert training.at["CT", "langs"] == "eu" and training.at["CT", "budget"] == "20k"
    assert training.at["CT", "tokens trained"] == "20,480"
    assert training.at["CT", "final loss"] == "3.211"


def test_plots_are_png(report: dict) -> None:
    for name in ("budget_curves.png", "bpb_vs_acc.png"):
        data = (report["out"] / name).read_bytes()
        assert data[:8] == PNG_MAGIC, name
        assert len(data) > 20_000, (name, len(data))  # axes, lines and legend, not a blank


def test_malformed_score_file_names_file(tmp_path: Path) -> None:
    good = {"digest": "abc", "subject": {"kind": "ct", "model": "m", "langs": ["eu"],
                                         "tokens": 10, "method": None, "hparams": None,
                                         "model_digest": "d"},
            "results": [{"suite": "eu", "task": "t", "kind": "topic", "metric": "acc",
                         "value": 0.5, "stderr": None}]}
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(good))
    assert load_score_file(path)[0]["value"] == 0.5
    bad_value = json.loads(json.dumps(good))
    bad_value["results"][0]["value"] = "high"
    bad_kind = json.loads(json.dumps(good))
    bad_kind["subject"]["kind"] = "lora"
    for name, data, fragment in [("value.json", bad_value, "results[0].value"),
                                 ("kind.json", bad_kind, "subject.kind"),
                                 ("missing.json", {"digest": "x", "subject": {}}, "'results'")]:
        bad = tmp_path / name
        bad.write_text(json.dumps(data))
        with pytest.raises(ReportError, match=str(bad)) as error:
            load_score_file(bad)
        assert fragment in str(error.value)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    proc = run_cli("--scores", str(path), str(broken), "--out", str(tmp_path / "out"),
                   check=False)
    assert proc.returncode != 0
    assert str(broken) in proc.stderr
    assert not (tmp_path / "out" / "scores.csv").exists()


def test_timings(tmp_path: Path) -> None:
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    files = {
        "ct/tiny/eu/20000.tsv": [(10.0, 500.5)],
        "ct/tiny/ca/20000.tsv": [(30.0, 700.0)],
        "merge/ties/eu.tsv": [(2.0, 100.0), (4.0, 120.0)],  # repeat(): a job costs the mean
        "evaluate/base.tsv": [(5.0, None)],
    }
    for name, rows in files.items():
        path = tmp_path / "bench" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        body = "".join(f"{s}\t0:00:{int(s):02d}\t{'-' if r is None else r}\t1\t1\t1\t0\t0\t0\t1\n"
                       for s, r in rows)
        path.write_text(header + body)
    proc = run_cli("timings", str(tmp_path / "bench"))
    table = parse_tables(proc.stdout)[None]
    assert list(table.index) == ["ct", "evaluate", "merge", "**all**"]  # by total time
    assert table.at["ct", "jobs"] == "2"
    assert table.at["ct", "total (s)"] == "40.00" and table.at["ct", "mean (s)"] == "20.00"
    assert table.at["ct", "max RSS (MB)"] == "700"
    assert table.at["merge", "total (s)"] == "3.00" and table.at["merge", "jobs"] == "1"
    assert table.at["evaluate", "max RSS (MB)"] == MISSING
    assert table.at["**all**", "total (s)"] == "48.00"
    assert table.at["**all**", "total (h:m:s)"] == "0:00:48"
    empty = run_cli("timings", str(tmp_path / "nothing"), check=False)
    assert empty.returncode != 0 and "nothing" in empty.stderr
