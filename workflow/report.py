"""Report: gather score files into a CSV, paper-style markdown tables and plots.

Tables are laid out like Tao et al. 2024 (Findings of EMNLP 2024): one row per model family
(base, SFT, CT, CT-then-SFT, each merge method + hyperparameters; a multilingual merge is a row
of its own), one column per target language x CT token budget ("eu@20k").

Usage::

    python -m workflow.report --scores results/scores/**/scores.json \
        [--train-metrics results/ct/**/metrics.json ...] [--recipe '<json>'] --out results/report
    python -m workflow.report timings benchmarks/

The first writes ``scores.csv``, ``table.md``, ``budget_curves.png``, ``bpb_vs_acc.png``,
``diagnostics.csv`` and ``merge_diagnostics.png`` (from ``--diagnostics`` files of merged
models; and ``recipe.json`` when ``--recipe`` is given) into ``--out``. The second prints, as a
markdown table, the total and mean wall time per stage from Snakemake ``benchmark:`` TSV files,
the stage being the first path component under the directory.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: cluster nodes and CI have no display

import matplotlib.pyplot as plt
import pandas as pd

from workflow.artifacts import (
    atomic_dir,
    atomic_file,
    merged_model_digest,
    parse_recipe_arg,
    point_latest,
    read_json,
    write_recipe,
)

log = logging.getLogger("workflow.report")

# Bump when a change here changes what a stage writes (see workflow/stages.py).
STAGE_VERSIONS = {"report": "1"}
SUBJECT_KINDS = ("base", "sft", "ct", "ctsft", "merge")
KIND_LABELS = {"base": "base", "sft": "SFT", "ct": "CT", "ctsft": "CT-then-SFT"}
ENGLISH = "en"
COLUMNS = [
    "kind", "model", "langs", "tokens", "method", "hparams", "model_digest",
    "suite", "task", "task_kind", "metric", "value", "stderr", "score_digest", "label",
]
# Metrics where a smaller number is the better model.
LOWER_IS_BETTER = ("bits_per_byte", "byte_perplexity", "word_perplexity", "perplexity", "loss")
MISSING = "\u2013"  # en dash, as in the paper's tables


class ReportError(ValueError):
    """An input file that cannot be read as documented; the message names the file."""


# --------------------------------------------------------------------------- reading inputs


def _fail(path: Path, where: str, message: str) -> ReportError:
    return ReportError(f"{path}: {where} {message}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_subject(path: Path, subject: Any) -> dict[str, Any]:
    if not isinstance(subject, dict):
        raise _fail(path, "'subject'", f"must be an object, got {type(subject).__name__}")
    kind = subject.get("kind")
    if kind not in SUBJECT_KINDS:
        raise _fail(path, "subject.kind", f"must be one of {list(SUBJECT_KINDS)}, got {kind!r}")
    for key in ("model", "model_digest"):
        if not isinstance(subject.get(key), str) or not subject[key]:
            raise _fail(path, f"subject.{key}", f"must be a non-empty string, got "
                        f"{subject.get(key)!r}")
    langs = subject.get("langs")
    if not isinstance(langs, list) or not all(isinstance(x, str) and x for x in langs):
        raise _fail(path, "subject.langs", f"must be a list of language codes, got {langs!r}")
    tokens = subject.get("tokens")
    if tokens is not None and (not isinstance(tokens, int) or isinstance(tokens, bool)
                               or tokens < 0):
        raise _fail(path, "subject.tokens", f"must be a non-negative integer or null, got "
                    f"{tokens!r}")
    for key in ("method", "hparams"):
        if subject.get(key) is not None and not isinstance(subject[key], str):
            raise _fail(path, f"subject.{key}", f"must be a string or null, got "
                        f"{subject[key]!r}")
    if kind in ("ct", "ctsft", "merge") and not langs:
        raise _fail(path, "subject.langs", f"must name the language(s) of a {kind} model")
    if kind == "merge" and not subject.get("method"):
        raise _fail(path, "subject.method", "must name the merge method of a merge model")
    return subject


def load_score_file(path: str | Path) -> list[dict[str, Any]]:
    """One flat row per result of a score file written by ``workflow.evaluate``."""
    path = Path(path)
    try:
        data = read_json(path)
    except (OSError, ValueError) as error:
        raise ReportError(f"{path}: cannot read score file as JSON: {error}") from error
    if not isinstance(data, dict):
        raise _fail(path, "top level", f"must be a JSON object, got {type(data).__name__}")
    for key in ("digest", "subject", "results"):
        if key not in data:
            raise _fail(path, f"'{key}'", "is missing")
    if not isinstance(data["digest"], str):
        raise _fail(path, "'digest'", f"must be a string, got {data['digest']!r}")
    subject = _check_subject(path, data["subject"])
    if not isinstance(data["results"], list):
        raise _fail(path, "'results'", "must be a list")
    langs = list(subject["langs"])
    rows = []
    for i, result in enumerate(data["results"]):
        where = f"results[{i}]"
        if not isinstance(result, dict):
            raise _fail(path, where, "must be an object")
        for key in ("suite", "task", "kind", "metric"):
            if not isinstance(result.get(key), str) or not result[key]:
                raise _fail(path, f"{where}.{key}", f"must be a non-empty string, got "
                            f"{result.get(key)!r}")
        if not _is_number(result.get("value")):
            raise _fail(path, f"{where}.value", f"must be a number, got {result.get('value')!r}")
        stderr = result.get("stderr")
        if stderr is not None and not _is_number(stderr):
            raise _fail(path, f"{where}.stderr", f"must be a number or null, got {stderr!r}")
        rows.append({
            "kind": subject["kind"],
            "model": subject["model"],
            "langs": "+".join(langs),
            "tokens": subject.get("tokens"),
            "method": subject.get("method"),
            "hparams": subject.get("hparams"),
            "model_digest": subject["model_digest"],
            "suite": result["suite"],
            "task": result["task"],
            "task_kind": result["kind"],
            "metric": result["metric"],
            "value": float(result["value"]),
            "stderr": None if stderr is None else float(stderr),
            "score_digest": data["digest"],
            "label": row_label(subject["kind"], subject.get("method"), subject.get("hparams"),
                               langs),
        })
    return rows


def load_scores(paths: Iterable[str | Path]) -> pd.DataFrame:
    """All score files as one long table (columns ``COLUMNS``), in a stable order."""
    rows = [row for path in paths for row in load_score_file(path)]
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["tokens"] = frame["tokens"].astype("Int64")  # nullable: keeps "20000", not "20000.0"
    frame["value"] = frame["value"].astype(float)
    frame["stderr"] = frame["stderr"].astype(float)
    frame["_order"] = [_row_order(r.kind, r.method, r.hparams, r.langs) for r in frame.itertuples()]
    frame = frame.sort_values(["model", "_order", "langs", "tokens", "model_digest", "suite",
                               "task", "metric"], na_position="first", kind="stable")
    return frame.drop(columns="_order").reset_index(drop=True)


TRAIN_COLUMNS = ["tokens_budget", "tokens_trained", "steps", "wall_s", "tokens_per_s",
                 "input_tokens_per_s", "final_loss", "peak_rss_mb"]


def load_train_metrics(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Training metrics files, each with the digest from the ``recipe.json`` beside it."""
    rows = []
    for path in map(Path, paths):
        try:
            data = read_json(path)
        except (OSError, ValueError) as error:
            raise ReportError(f"{path}: cannot read training metrics as JSON: {error}") from error
        if not isinstance(data, dict):
            raise _fail(path, "top level", f"must be a JSON object, got {type(data).__name__}")
        row: dict[str, Any] = {"path": str(path.parent)}
        for key in TRAIN_COLUMNS:
            value = data.get(key)
            if value is not None and not _is_number(value):
                raise _fail(path, f"'{key}'", f"must be a number or null, got {value!r}")
            row[key] = value
        recipe_file = path.parent / "recipe.json"
        digest = None
        if recipe_file.is_file():
            try:
                digest = read_json(recipe_file).get("digest")
            except (OSError, ValueError, AttributeError) as error:
                raise ReportError(f"{recipe_file}: cannot read recipe: {error}") from error
        row["model_digest"] = digest
        rows.append(row)
    return pd.DataFrame(rows, columns=["path", "model_digest", *TRAIN_COLUMNS])


# --------------------------------------------------------------------------- labels and order


def format_tokens(tokens: int | None) -> str:
    """20000 -> "20k", 1500000 -> "1.5M", 2000000000 -> "2B": the paper's column style."""
    if tokens is None or pd.isna(tokens):
        return "?"
    tokens = int(tokens)
    for scale, suffix in ((10**9, "B"), (10**6, "M"), (10**3, "k")):
        if tokens >= scale:
            return f"{tokens / scale:.15g}{suffix}"  # exact: 12345 -> 12.345k, never rounded
    return str(tokens)


def row_label(kind: str, method: str | None, hparams: str | None, langs: Sequence[str]) -> str:
    """The table row a model belongs to; several languages make a row of their own."""
    if kind == "merge":
        label = " ".join(part for part in (method, hparams) if part)
    else:
        label = KIND_LABELS[kind]
        if kind != "base" and kind != "sft" and (method or hparams):
            label += " " + " ".join(part for part in (method, hparams) if part)
    if len(langs) > 1:
        label += f" ({'+'.join(langs)})"
    return label


def _row_order(kind: str, method: Any, hparams: Any, langs: str) -> tuple:
    multi = "+" in (langs or "")
    return (SUBJECT_KINDS.index(kind), multi, str(method or ""), str(hparams or ""))


def lower_is_better(metric: str) -> bool:
    return any(name in metric for name in LOWER_IS_BETTER)


# --------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class TableSpec:
    task_kind: str
    metric: str
    english: bool  # score every model on suite "en" instead of the column's language
    title: str


def _languages(frame: pd.DataFrame) -> list[str]:
    """Target languages: those models were adapted to, else the non-English suites scored."""
    langs = sorted({lang for value in frame["langs"] if value for lang in value.split("+")})
    if not langs:
        langs = sorted(set(frame["suite"]) - {ENGLISH})
    return langs


def _budgets(frame: pd.DataFrame) -> list[int]:
    return sorted(int(t) for t in frame["tokens"].dropna().unique())


def _column_label(lang: str, budget: int | None) -> str:
    return lang if budget is None else f"{lang}@{format_tokens(budget)}"


def _cell_selector(frame: pd.DataFrame, row: pd.Series, lang: str, budget: int | None
                   ) -> pd.Series:
    """Which results of ``frame`` fill row ``row`` in the column (``lang``, ``budget``)."""
    same_row = (frame["label"] == row["label"]) & (frame["kind"] == row["kind"])
    if not row["langs"]:  # base / SFT: one model, the same in every budget column
        return same_row
    if "+" in row["langs"]:  # multilingual model: the row fixes the languages
        chosen = same_row
    else:
        chosen = same_row & (frame["langs"] == lang)
    if budget is not None:
        chosen &= frame["tokens"].eq(budget).fillna(False).astype(bool)
    return chosen


def build_table(frame: pd.DataFrame, spec: TableSpec) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(mean value, number of results averaged) per row label x language@budget column.

    ``frame`` holds one base model's scores. Empty languages are dropped; a row that is empty
    everywhere is dropped.
    """
    scored = frame[(frame["task_kind"] == spec.task_kind) & (frame["metric"] == spec.metric)]
    rows = frame.drop_duplicates("label")[["label", "kind", "langs"]]
    langs, budgets = _languages(frame), _budgets(frame[frame["langs"] != ""])
    values: dict[str, dict[str, float]] = {}
    counts: dict[str, dict[str, int]] = {}
    for lang in langs:
        suite = ENGLISH if spec.english else lang
        on_suite = scored[scored["suite"] == suite]
        for budget in budgets or [None]:
            column = _column_label(lang, budget)
            values[column], counts[column] = {}, {}
            for _, row in rows.iterrows():
                hits = on_suite[_cell_selector(on_suite, row, lang, budget)]
                if len(hits):
                    values[column][row["label"]] = float(hits["value"].mean())
                    counts[column][row["label"]] = len(hits)
    table = pd.DataFrame(values, index=list(rows["label"]), dtype=float)
    count = pd.DataFrame(counts, index=list(rows["label"])).reindex_like(table)
    # Keep a language's budget columns together: drop a language only if it has no value at all.
    has_value = table.notna().any()
    filled_langs = {column.split("@")[0] for column in table.columns if has_value[column]}
    keep = [column for column in table.columns if column.split("@")[0] in filled_langs]
    table, count = table[keep], count[keep]
    filled = table.notna().any(axis=1)
    return table[filled], count[filled]


def format_value(value: float) -> str:
    if math.isnan(value):
        return MISSING
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3f}"


def table_markdown(table: pd.DataFrame, count: pd.DataFrame, metric: str) -> str:
    """A markdown table; the best value per column (two or more filled) is bold."""
    lower = lower_is_better(metric)
    header = ["model", *table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    best = table.min() if lower else table.max()
    for label, row in table.iterrows():
        cells = [str(label)]
        for column, value in row.items():
            text = format_value(value)
            if not math.isnan(value):
                if count.at[label, column] > 1:
                    text += "\u2020"  # dagger: see the legend
                if table[column].notna().sum() > 1 and value == best[column]:
                    text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_specs(frame: pd.DataFrame) -> list[TableSpec]:
    """The (task kind, metric) tables worth printing, core ones first."""
    specs = [
        TableSpec("topic", "acc", False, "Topic accuracy on the target language "
                  "(topic, acc; higher is better)"),
        TableSpec("bpb", "bits_per_byte", False, "Bits per byte on the target language "
                  "(bpb, bits_per_byte; lower is better)"),
        TableSpec("topic", "acc", True, "English retention: topic accuracy on English "
                  "(topic, acc; higher is better)"),
        TableSpec("bpb", "bits_per_byte", True, "English bits per byte "
                  "(bpb, bits_per_byte; lower is better)"),
    ]
    # lm-eval registry tasks: one table each, with acc when the task reports it.
    for task_kind in sorted(set(frame["task_kind"]) - {"topic", "bpb"}):
        metrics = sorted(set(frame.loc[frame["task_kind"] == task_kind, "metric"]))
        metric = "acc" if "acc" in metrics else metrics[0]
        better = "lower" if lower_is_better(metric) else "higher"
        for english, where in ((False, "the target language"), (True, "English")):
            specs.append(TableSpec(task_kind, metric, english,
                                   f"{task_kind} on {where} ({task_kind}, {metric}; "
                                   f"{better} is better)"))
    return specs


def _training_markdown(train: pd.DataFrame, scores: pd.DataFrame) -> str:
    subjects = scores.drop_duplicates("model_digest").set_index("model_digest")
    header = ["model", "langs", "budget", "tokens trained", "steps", "trained tokens/s",
              "input tokens/s", "wall (s)", "final loss", "peak RSS (MB)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def fmt(value: Any, spec: str) -> str:
        return MISSING if value is None or pd.isna(value) else format(value, spec)

    for _, row in train.iterrows():
        subject = subjects.loc[row["model_digest"]] if row["model_digest"] in subjects.index \
            else None
        label = subject["label"] if subject is not None else row["path"]
        langs = subject["langs"] if subject is not None else ""
        lines.append("| " + " | ".join([
            str(label), langs or MISSING,
            MISSING if pd.isna(row["tokens_budget"]) else format_tokens(row["tokens_budget"]),
            fmt(row["tokens_trained"], ",.0f"), fmt(row["steps"], ".0f"),
            fmt(row["tokens_per_s"], ",.0f"), fmt(row["input_tokens_per_s"], ",.0f"),
            fmt(row["wall_s"], ".1f"),
            fmt(row["final_loss"], ".3f"), fmt(row["peak_rss_mb"], ",.0f"),
        ]) + " |")
    return "\n".join(lines)


def render_markdown(scores: pd.DataFrame, train: pd.DataFrame | None = None) -> str:
    legend = ("Columns are target language @ CT token budget. Base and SFT rows do not depend "
              f"on the budget. {MISSING}: not evaluated. Bold: best in the column. "
              "\u2020: mean of several models with the same label. "
              "Standard errors are in scores.csv.")
    parts = ["# Results", "", legend, ""]
    for model, frame in scores.groupby("model", sort=True):
        parts += [f"## {model}", ""]
        for spec in table_specs(frame):
            table, count = build_table(frame, spec)
            if table.empty:
                continue
            parts += [f"### {spec.title}", "", table_markdown(table, count, spec.metric), ""]
    if train is not None and len(train):
        parts += ["## Training", "", _training_markdown(train, scores), ""]
    return "\n".join(parts)


# --------------------------------------------------------------------------- plots


def _colors(labels: Iterable[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    return {label: cmap(i % 10) for i, label in enumerate(dict.fromkeys(labels))}


def _save(fig: Any, path: Path) -> None:
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _empty_figure(path: Path, message: str) -> None:
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.text(0.5, 0.5, message, ha="center", va="center")
    ax.set_axis_off()
    _save(fig, path)


def _legend(fig: Any, axes: Iterable[Any], order: list[str]) -> None:
    """One legend for all panels, in table row order (base, SFT, CT, ..., merges)."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    labels = sorted(handles, key=lambda label: order.index(label) if label in order else 0)
    fig.legend([handles[label] for label in labels], labels, loc="center left",
               bbox_to_anchor=(1.0, 0.5), fontsize="small", frameon=False)


def _prefix(model: str, label: str, several: bool) -> str:
    return f"{model}: {label}" if several else label


def plot_budget_curves(scores: pd.DataFrame, path: str | Path) -> None:
    """Target-language topic accuracy against CT budget: one panel per language."""
    path = Path(path)
    topic = scores[(scores["task_kind"] == "topic") & (scores["metric"] == "acc")]
    langs = _languages(scores)
    if topic.empty or not langs:
        _empty_figure(path, "no topic accuracy scores")
        return
    several = scores["model"].nunique() > 1
    colors = _colors(_prefix(m, lab, several)
                     for m, lab in zip(topic["model"], topic["label"], strict=True))
    fig, axes = plt.subplots(1, len(langs), figsize=(4.8 * len(langs), 3.8), squeeze=False,
                             sharey=True)
    budgets = _budgets(scores[scores["langs"] != ""])
    for ax, lang in zip(axes[0], langs, strict=True):
        on_lang = topic[topic["suite"] == lang]
        for (model, label), group in on_lang.groupby(["model", "label"], sort=False):
            name = _prefix(model, label, several)
            if group["kind"].iloc[0] in ("base", "sft"):
                ax.axhline(group["value"].mean(), ls="--", lw=1.2, color=colors[name],
                           label=name)
                continue
            if "+" not in group["langs"].iloc[0]:
                group = group[group["langs"] == lang]
            curve = group.dropna(subset=["tokens"]).groupby("tokens")["value"].mean()
            if len(curve):
                ax.plot(curve.index.astype(float), curve.values, marker="o", color=colors[name],
                        label=name)
        ax.set_title(lang)
        ax.set_xlabel("CT tokens")
        if len(budgets) > 1 and budgets[0] > 0 and budgets[-1] / budgets[0] > 10:
            ax.set_xscale("log")
        if budgets:
            ax.set_xticks(budgets, [format_tokens(b) for b in budgets])
            ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("topic accuracy (target language)")
    _legend(fig, axes[0], list(colors))
    fig.tight_layout()
    _save(fig, path)


def plot_bpb_vs_acc(scores: pd.DataFrame, path: str | Path) -> None:
    """Per model: target-language bits per byte (x) against English topic accuracy (y)."""
    path = Path(path)
    langs = _languages(scores)
    bpb = scores[(scores["task_kind"] == "bpb") & (scores["metric"] == "bits_per_byte")]
    acc = scores[(scores["task_kind"] == "topic") & (scores["metric"] == "acc")
                 & (scores["suite"] == ENGLISH)]
    english_acc = acc.groupby("model_digest")["value"].mean()
    if bpb.empty or english_acc.empty or not langs:
        _empty_figure(path, "needs target-language bpb and English topic accuracy")
        return
    several = scores["model"].nunique() > 1
    colors = _colors(_prefix(m, lab, several)
                     for m, lab in zip(scores["model"], scores["label"], strict=True))
    fig, axes = plt.subplots(1, len(langs), figsize=(4.8 * len(langs), 3.8), squeeze=False)
    for ax, lang in zip(axes[0], langs, strict=True):
        on_lang = bpb[bpb["suite"] == lang]
        # A model belongs to a language's panel if it was not adapted at all or adapted to it.
        adapted = on_lang["langs"].map(lambda value, lang=lang: not value
                                       or lang in value.split("+"))
        points = on_lang[adapted].groupby("model_digest").agg(
            x=("value", "mean"), label=("label", "first"), model=("model", "first"),
            tokens=("tokens", "first"))
        points = points.join(english_acc.rename("y"), how="inner")
        for label, group in points.groupby("label", sort=False):
            name = _prefix(group["model"].iloc[0], label, several)
            ax.scatter(group["x"], group["y"], color=colors[name], label=name, s=28)
            for _, point in group.iterrows():
                note = label if pd.isna(point["tokens"]) else format_tokens(point["tokens"])
                ax.annotate(note, (point["x"], point["y"]), fontsize=6, alpha=0.6,
                            xytext=(3, 3), textcoords="offset points")
        ax.set_title(lang)
        ax.set_xlabel(f"bits per byte on {lang} (lower is better)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("English topic accuracy")
    _legend(fig, axes[0], list(colors))
    fig.tight_layout()
    _save(fig, path)


# --------------------------------------------------------------------------- entry points


# The paper's analysis (Tao et al. 2024, section 5): how much of the SFT task vector's most
# important mass survives the merge, and how often CT and SFT disagree in sign.
DIAGNOSTIC_METRICS = ("sft_topk_mass_kept", "sign_conflict", "trimmed")


def load_diagnostics(paths: Iterable[str | Path], scores: pd.DataFrame) -> pd.DataFrame:
    """One row per merged model x scope ("overall", "layer N") with the diagnostic ratios.

    Each ``diagnostics.json`` is matched to its model's scores by the digest of the merge
    recipe beside it, which gives the readable fields (languages, budget, method)."""
    subjects = scores.drop_duplicates("model_digest").set_index("model_digest")
    rows = []
    for path in map(Path, paths):
        try:
            data = read_json(path)
            digest = merged_model_digest(read_json(path.parent / "recipe.json")["recipe"])
        except (OSError, ValueError, KeyError, AttributeError) as error:
            raise ReportError(f"{path}: cannot read merge diagnostics: {error}") from error
        if digest not in subjects.index:
            log.warning("%s: no scores for model %s; left out of the diagnostics", path, digest)
            continue
        subject = subjects.loc[digest]
        scopes = [("overall", data.get("overall", {}))]
        scopes += [(f"layer {name}", values) for name, values in data.get("layers", {}).items()]
        for scope, values in scopes:
            rows.append({
                "label": subject["label"], "langs": subject["langs"],
                "tokens": subject["tokens"], "method": subject["method"],
                "model_digest": digest, "scope": scope,
                **{metric: values.get(metric) for metric in DIAGNOSTIC_METRICS},
            })
    return pd.DataFrame(rows)


def diagnostics_markdown(diagnostics: pd.DataFrame) -> str:
    overall = diagnostics[diagnostics["scope"] == "overall"].copy()
    overall["merge"] = [f"{label} ({langs})" if "+" not in str(label) else label
                        for label, langs in zip(overall["label"], overall["langs"], strict=True)]
    lines = ["## Merge diagnostics (overall)", "",
             "Share of the SFT task vector's top-k mass kept by the merge, CT/SFT sign-conflict "
             "rate, share of entries trimmed (`diagnostics.csv` has them per layer).", "",
             "| merge | budget | " + " | ".join(DIAGNOSTIC_METRICS) + " |",
             "|---|---|" + "---|" * len(DIAGNOSTIC_METRICS)]
    for _, row in overall.sort_values(["merge", "tokens"]).iterrows():
        cells = [MISSING if pd.isna(row[m]) else format_value(row[m]) for m in DIAGNOSTIC_METRICS]
        lines.append(f"| {row['merge']} | {format_tokens(row['tokens'])} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_merge_diagnostics(diagnostics: pd.DataFrame, path: str | Path) -> None:
    """Each diagnostic against CT budget, one line per merge method and language."""
    path = Path(path)
    overall = diagnostics[diagnostics["scope"] == "overall"] if len(diagnostics) else diagnostics
    if overall.empty:
        _empty_figure(path, "no merge diagnostics")
        return
    colors = _colors(sorted(set(overall["label"])))
    fig, axes = plt.subplots(1, len(DIAGNOSTIC_METRICS), figsize=(5 * len(DIAGNOSTIC_METRICS), 3.8),
                             squeeze=False)
    for ax, metric in zip(axes[0], DIAGNOSTIC_METRICS, strict=True):
        for (label, langs), group in overall.groupby(["label", "langs"], sort=True):
            curve = group.dropna(subset=["tokens", metric]).sort_values("tokens")
            if len(curve):
                ax.plot(curve["tokens"].astype(float), curve[metric].astype(float), marker="o",
                        color=colors[label], label=label,
                        ls="-" if "+" not in str(langs) else ":")
        ax.set_title(metric.replace("_", " "))
        ax.set_xlabel("CT tokens")
        ax.grid(alpha=0.3)
    _legend(fig, axes[0], list(colors))
    fig.tight_layout()
    _save(fig, path)


def write_report(score_paths: Sequence[str | Path], out: str | Path,
                 train_metrics_paths: Sequence[str | Path] = (),
                 recipe: dict[str, Any] | None = None,
                 diagnostics_paths: Sequence[str | Path] = ()) -> pd.DataFrame:
    """Write scores.csv, table.md and the plots into ``out``; returns the scores."""
    if not score_paths:
        raise ReportError("no score files given (--scores)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scores = load_scores(score_paths)
    log.info("%d score files, %d results, %d models", len(score_paths), len(scores),
             scores["model_digest"].nunique())
    untimed = scores[(scores["langs"] != "") & scores["tokens"].isna()]
    if len(untimed):  # no budget column can hold them: say so rather than drop them silently
        log.warning("adapted models without a token budget are in scores.csv but not in the "
                    "tables: %s", sorted(set(untimed["model_digest"])))
    train = load_train_metrics(train_metrics_paths) if train_metrics_paths else None
    with atomic_file(out / "scores.csv") as handle:
        scores.to_csv(handle, index=False)
    diagnostics = load_diagnostics(diagnostics_paths, scores)
    with atomic_file(out / "table.md") as handle:
        handle.write(render_markdown(scores, train))
        if len(diagnostics):
            handle.write("\n" + diagnostics_markdown(diagnostics))
    with atomic_file(out / "diagnostics.csv") as handle:
        diagnostics.to_csv(handle, index=False)
    plot_budget_curves(scores, out / "budget_curves.png")
    plot_bpb_vs_acc(scores, out / "bpb_vs_acc.png")
    plot_merge_diagnostics(diagnostics, out / "merge_diagnostics.png")
    if recipe is not None:
        write_recipe(out, recipe)
    return scores


def benchmark_timings(bench_dir: str | Path) -> pd.DataFrame:
    """Per stage: jobs, total / mean / max wall seconds and peak max_rss from benchmark TSVs."""
    bench_dir = Path(bench_dir)
    if not bench_dir.is_dir():
        raise ReportError(f"{bench_dir}: benchmark directory does not exist")
    rows = []
    for path in sorted(bench_dir.rglob("*.tsv")):
        try:
            table = pd.read_csv(path, sep="\t", na_values=["-", "NA"])
        except (OSError, ValueError) as error:
            raise ReportError(f"{path}: cannot read benchmark TSV: {error}") from error
        if "s" not in table.columns or table.empty:
            raise ReportError(f"{path}: not a Snakemake benchmark file (needs an 's' column "
                              f"and a row), columns {list(table.columns)}")
        seconds = pd.to_numeric(table["s"], errors="coerce")
        if seconds.isna().any():
            raise ReportError(f"{path}: column 's' holds a non-number")
        rss = pd.to_numeric(table.get("max_rss"), errors="coerce") if "max_rss" in table \
            else pd.Series([float("nan")])
        relative = path.relative_to(bench_dir)
        stage = relative.parts[0] if len(relative.parts) > 1 else relative.stem
        # Snakemake's `repeat()` writes one row per repetition: a job costs their mean.
        rows.append({"stage": stage, "s": float(seconds.mean()), "max_rss": rss.max()})
    if not rows:
        raise ReportError(f"{bench_dir}: no benchmark .tsv files found")
    jobs = pd.DataFrame(rows)
    summary = jobs.groupby("stage").agg(jobs=("s", "size"), total_s=("s", "sum"),
                                        mean_s=("s", "mean"), max_s=("s", "max"),
                                        max_rss_mb=("max_rss", "max"))
    return summary.sort_values("total_s", ascending=False)


def _hms(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def timings_markdown(summary: pd.DataFrame) -> str:
    header = ["stage", "jobs", "total (s)", "total (h:m:s)", "mean (s)", "max (s)",
              "max RSS (MB)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def rss(value: float) -> str:
        return MISSING if pd.isna(value) else f"{value:.0f}"

    for stage, row in summary.iterrows():
        lines.append(f"| {stage} | {int(row['jobs'])} | {row['total_s']:.2f} | "
                     f"{_hms(row['total_s'])} | {row['mean_s']:.2f} | {row['max_s']:.2f} | "
                     f"{rss(row['max_rss_mb'])} |")
    total, jobs = summary["total_s"].sum(), int(summary["jobs"].sum())
    lines.append(f"| **all** | {jobs} | {total:.2f} | {_hms(total)} | {total / jobs:.2f} | "
                 f"{summary['max_s'].max():.2f} | {rss(summary['max_rss_mb'].max())} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv[:1] == ["timings"]:
        parser = argparse.ArgumentParser(prog="python -m workflow.report timings",
                                         description="Wall time per stage from Snakemake "
                                         "benchmark TSV files.")
        parser.add_argument("bench_dir", type=Path, help="directory searched recursively")
        args = parser.parse_args(argv[1:])
        print(timings_markdown(benchmark_timings(args.bench_dir)))
        return 0
    parser = argparse.ArgumentParser(prog="python -m workflow.report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--scores", nargs="+", default=[], type=Path,
                        help="score JSON files written by workflow.evaluate")
    parser.add_argument("--inputs", type=Path, default=None,
                        help="a JSON file listing scores, train_metrics and diagnostics files "
                        "(the workflow's way: thousands of paths exceed a command line)")
    parser.add_argument("--train-metrics", nargs="*", default=[], type=Path,
                        help="metrics.json files from training stages (optional)")
    parser.add_argument("--diagnostics", nargs="*", default=[], type=Path,
                        help="diagnostics.json files of merged models (optional)")
    parser.add_argument("--recipe", type=parse_recipe_arg, default=None,
                        help="the report artifact's recipe JSON; written as recipe.json")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    args = parser.parse_args(argv)
    scores, metrics, diagnostics = args.scores, args.train_metrics, args.diagnostics
    if args.inputs is not None:
        listed = read_json(args.inputs)
        scores = [*scores, *listed["scores"]]
        metrics = [*metrics, *listed["train_metrics"]]
        diagnostics = [*diagnostics, *listed["diagnostics"]]
    if not scores:
        parser.error("give score files: --scores or --inputs")
    if args.recipe is None:
        write_report(scores, args.out, metrics, None, diagnostics)
        return 0
    # A workflow report is an artifact: built whole under a temporary name, then published,
    # and results/report/latest points at it.
    with atomic_dir(args.out) as tmp:
        write_report(scores, tmp, metrics, args.recipe, diagnostics)
    point_latest(args.out)
    return 0



if __name__ == "__main__":
    sys.exit(main())
