"""The report stage on synthetic score files: CSV rows, methods x languages table cells with
intervals, bold only beyond noise, plots, timings."""

from __future__ import annotations

import json
import math
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
        if line.strip():  # a heading, or the caption line of a comparison table
            heading = line.lstrip("#").strip()
    return tables


def find_table(tables: dict[str, pd.DataFrame], *words: str) -> pd.DataFrame:
    hits = [h for h in tables if all(w in h for w in words)]
    assert len(hits) == 1, (words, list(tables))
    return tables[hits[0]]


SHORT = {"ties": "TIES", "linear": "Linear"}
TITLES = {"topic": "Topic classification (English labels)",
          "bpb": "Bits per byte on held-out text", "xnli_eu": "xnli_eu"}


def short_label(subject: dict) -> str:
    names = {"base": "base", "sft": "SFT", "ct": "CT", "ctsft": "CT-then-SFT"}
    label = names.get(subject["kind"]) or SHORT[subject["method"]]
    return label + (" multi" if len(subject["langs"]) > 1 else "")


def expected_cells(expected: list, task_kind: str, metric: str, english: bool,
                   tokens: int) -> dict:
    """The documented cell rule, restated independently of the implementation:
    (row, language) -> (value, stderr)."""
    cells = {}
    for subject, results, _ in expected:
        for lang in LANGS:
            if subject["langs"] and (subject["tokens"] != tokens or (
                    len(subject["langs"]) == 1 and subject["langs"] != [lang])):
                continue
            suite = "en" if english else lang
            for r in results:
                if (r["kind"], r["metric"], r["suite"]) == (task_kind, metric, suite):
                    cells[(short_label(subject), lang)] = (r["value"], r["stderr"])
    return cells


def cell_text(value: float, stderr: float | None) -> str:
    return f"{value:.3f}" + ("" if stderr is None else f" \u00b1 {stderr:.3f}")


@pytest.mark.parametrize("tokens", BUDGETS)
@pytest.mark.parametrize(("task_kind", "metric", "english"), [
    ("topic", "acc", False), ("bpb", "bits_per_byte", False), ("topic", "acc", True),
    ("xnli_eu", "acc", False),
])
def test_table_cells(report: dict, task_kind: str, metric: str, english: bool,
                     tokens: int) -> None:
    where = "English (retention" if english else "the target language"
    table = find_table(parse_tables((report["out"] / "table.md").read_text()),
                       f"{TITLES[task_kind]} on {where}", f"CT budget {format_tokens(tokens)} ",
                       f"{metric};")
    cells = expected_cells(report["expected"], task_kind, metric, english, tokens)
    rows = sorted({label for label, _ in cells})
    assert sorted(table.index) == rows
    langs = ["eu"] if task_kind == "xnli_eu" else LANGS  # a family scored on eu only
    assert list(table.columns) == [*sorted(langs), "avg"]
    if task_kind != "xnli_eu":
        assert list(table.index[:4]) == ["base", "SFT", "CT", "CT-then-SFT"]
    for label in table.index:
        for lang in langs:
            text = table.at[label, lang].strip("*")
            want = cells.get((label, lang))
            assert text == (MISSING if want is None else cell_text(*want)), (label, lang)
        # the average column: the mean over languages, the standard error of a mean of
        # independent test sets (English: one test set, so the mean error)
        found = [cells.get((label, lang)) for lang in langs]
        if any(f is None for f in found):
            assert table.at[label, "avg"] == MISSING
            continue
        mean = sum(v for v, _ in found) / len(found)
        errors = [e for _, e in found]
        if None in errors:
            want_avg = f"{mean:.3f}"
        else:
            se = sum(errors) / len(errors) if english \
                else math.sqrt(sum(e * e for e in errors)) / len(errors)
            want_avg = cell_text(mean, se)
        assert table.at[label, "avg"].strip("*") == want_avg, label
    # Bold only for a best row separated from every other by 1.96 sqrt(se_a^2 + se_b^2):
    # with equal errors of 0.01 that is a lead of more than 0.028; bits per byte has no error.
    for lang in langs:
        values = {label: cells[(label, lang)] for label in table.index if (label, lang) in cells}
        lower = metric == "bits_per_byte"
        ranked = sorted(values, key=lambda label: values[label][0], reverse=not lower)
        best_value, best_se = values[ranked[0]]
        separated = best_se is not None and len(ranked) > 1 and all(
            abs(best_value - values[o][0]) > 1.96 * math.hypot(best_se, values[o][1])
            for o in ranked[1:])
        for label in table.index:
            bold = table.at[label, lang].startswith("**")
            assert bold == (separated and label == ranked[0]), (label, lang)


def test_table_specific_cells(report: dict) -> None:
    """A few cells spelled out, as a reader would check them against the score files."""
    tables = parse_tables((report["out"] / "table.md").read_text())
    topic = find_table(tables, "Topic classification", "on the target language",
                       "CT budget 20k ")
    by_key = {(s["kind"], s["method"], tuple(s["langs"]), s["tokens"]): r
              for s, r, _ in report["expected"]}

    def topic_value(key: tuple, suite: str) -> str:
        return next(cell_text(r["value"], r["stderr"]) for r in by_key[key]
                    if r["kind"] == "topic" and r["suite"] == suite)

    assert topic.at["base", "eu"].strip("*") == topic_value(("base", None, (), None), "eu")
    topic100 = find_table(tables, "Topic classification", "on the target language",
                          "CT budget 100k ")
    assert topic100.at["CT", "ca"].strip("*") == topic_value(("ct", None, ("ca",), 100000), "ca")
    assert topic.at["TIES multi", "ca"].strip("*") == topic_value(
        ("merge", "ties", ("eu", "ca"), 20000), "ca")
    assert topic.at["Linear", "eu"].strip("*") == topic_value(
        ("merge", "linear", ("eu",), 20000), "eu")
    assert topic.at["Linear", "ca"] == MISSING and topic.at["Linear", "avg"] == MISSING
    assert "Linear" not in topic100.index
    legend = tables["Row labels"]
    assert legend.at["TIES multi", "hyperparameters"] == "`density0.5-lambda1.0`"
    assert legend.at["TIES multi", "languages"] == "eu+ca"
    training = tables["Training"]
    assert list(training.index) == ["CT"]
    assert training.at["CT", "langs"] == "eu" and training.at["CT", "budget"] == "20k"
    assert training.at["CT", "tokens trained"] == "20,480"
    assert training.at["CT", "final loss"] == "3.211"
    # no per-item results in these files: no baseline rows, comparisons say "not evaluated"
    assert "*chance*" not in topic.index
    html = (report["out"] / "tables.html").read_text()
    assert "<table>" in html and "Topic classification" in html


def test_plots_are_png(report: dict) -> None:
    for name in ("budget_curves.png", "retention.png", "bpb_vs_acc.png"):
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
