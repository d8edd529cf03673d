"""Methods x languages tables with intervals, baseline rows and paired comparisons.

For every task family (``workflow/tasks/families.yaml``; a task outside the registry is a family
of its own) and CT budget: one row per method (base, SFT, CT, CT-then-SFT, each merge; a
multilingual merge is a row of its own), one column per target language and their average.
The English table scores the same models on English (task retention); its column is the
language the model was adapted to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from workflow.report import stats
from workflow.report.load import (
    DEV_SUFFIX,
    DIAGNOSTIC_METRICS,
    ENGLISH,
    MISSING,
    ItemIndex,
    Items,
    budgets,
    family_metric,
    format_tokens,
    languages,
    lower_is_better,
    short_labels,
)
from workflow.tasks import load_families

AVERAGE = "avg"
BASELINES = ("chance", "majority")


@dataclass(frozen=True)
class Cell:
    """One table cell: the mean of ``models`` results, its standard error, and the per-item
    results when the cell is one model's (for paired bootstraps)."""

    value: float
    se: float
    models: int
    items: Items | None = None


@dataclass
class FamilyTable:
    family: str
    metric: str
    budget: int | None
    english: bool
    langs: list[str]
    rows: dict[str, dict[str, Cell]] = field(default_factory=dict)  # label -> column -> cell
    kinds: dict[str, str] = field(default_factory=dict)  # label -> subject kind
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)  # chance/majority
    selected: set[str] = field(default_factory=set)  # grid points chosen on dev

    @property
    def lower(self) -> bool:
        return lower_is_better(self.metric)

    def column(self, column: str) -> dict[str, Cell]:
        return {label: cells[column] for label, cells in self.rows.items() if column in cells}


def cell_selector(frame: pd.DataFrame, label: str, kind: str, langs: str, lang: str,
                  budget: int | None) -> pd.Series:
    """Which results of ``frame`` fill the row (label, kind, langs) in the column (lang,
    budget)."""
    chosen = (frame["label"] == label) & (frame["kind"] == kind)
    if not langs:  # base / SFT: one model, the same in every budget column
        return chosen
    if "+" not in langs:  # single-language model: the column picks the language
        chosen &= frame["langs"] == lang
    if budget is not None:
        chosen &= frame["tokens"].eq(budget).fillna(False).astype(bool)
    return chosen


def _cell(hits: pd.DataFrame, items: ItemIndex) -> Cell:
    ses = []
    per_item = None
    for hit in hits.itertuples():
        found = items.get((hit.score_digest, hit.suite, hit.task))
        se = hit.stderr
        if found is not None and hit.metric in found.metrics:
            per_item = found if len(hits) == 1 else None
            if pd.isna(se):  # lm-eval gives none for perplexities: bootstrap over items
                se = stats.bootstrap_se(hit.metric, found.metrics[hit.metric])
        ses.append(float("nan") if se is None or pd.isna(se) else float(se))
    se = math.sqrt(sum(s * s for s in ses)) / len(ses)
    return Cell(float(hits["value"].mean()), se, len(hits), per_item)


def _baseline(on_suite: pd.DataFrame, items: ItemIndex) -> dict[str, float]:
    for hit in on_suite.itertuples():
        found = items.get((hit.score_digest, hit.suite, hit.task))
        if found is not None:
            values = {"chance": stats.chance(found), "majority": stats.majority(found)}
            return {name: value for name, value in values.items() if value is not None}
    return {}


def build_family_table(frame: pd.DataFrame, items: ItemIndex, family: str, budget: int | None,
                       english: bool) -> FamilyTable:
    """One base model's scores (``frame``) as a methods x languages table."""
    metric = family_metric(frame, family)
    scored = frame[(frame["family"] == family) & (frame["metric"] == metric)]
    dev, scored = scored[scored["split"] == "dev"], scored[scored["split"] == "test"]
    langs = languages(frame)
    table = FamilyTable(family, metric, budget, english, [])
    shorts = short_labels(frame)
    table.selected = select_on_dev(dev, shorts, langs, budget, lower_is_better(metric))
    rows = frame.drop_duplicates("label")[["label", "kind", "langs"]]
    multiple_choice = getattr(load_families().get(family), "multiple_choice", False) \
        or family not in load_families()
    for lang in langs:
        on_suite = scored[scored["suite"] == (ENGLISH if english else lang)]
        if on_suite.empty:
            continue
        table.langs.append(lang)
        if multiple_choice and metric.startswith("acc"):
            for name, value in _baseline(on_suite, items).items():
                table.baselines.setdefault(name, {})[lang] = value
        for row in rows.itertuples():
            hits = on_suite[cell_selector(on_suite, row.label, row.kind, row.langs, lang,
                                          budget)]
            if len(hits):
                short = shorts[row.label]
                table.rows.setdefault(short, {})[lang] = _cell(hits, items)
                table.kinds[short] = row.kind
    order = [shorts[label] for label in rows["label"]]
    table.rows = {label: table.rows[label] for label in order if label in table.rows}
    for cells in table.rows.values():
        if table.langs and all(lang in cells for lang in table.langs):
            values = [cells[lang] for lang in table.langs]
            # Target columns are different test sets (independent errors); English columns
            # share one, so their errors are taken as fully correlated (an upper bound).
            se = float(np.mean([c.se for c in values])) if english \
                else math.sqrt(sum(c.se**2 for c in values)) / len(values)
            cells[AVERAGE] = Cell(float(np.mean([c.value for c in values])), se,
                                  max(c.models for c in values))
    for values in table.baselines.values():
        if table.langs and all(lang in values for lang in table.langs):
            values[AVERAGE] = float(np.mean([values[lang] for lang in table.langs]))
    return table


def select_on_dev(dev: pd.DataFrame, shorts: dict[str, str], langs: list[str],
                  budget: int | None, lower: bool) -> set[str]:
    """The grid point of each swept merge method (one per method, single-language and
    multilingual apart) with the best dev score, averaged over the languages every point has."""
    merges = dev[dev["kind"] == "merge"]
    if budget is not None:
        merges = merges[merges["tokens"].eq(budget).fillna(False).astype(bool)]
    multi = merges["langs"].str.contains("+", regex=False)
    chosen = set()
    for _, group in merges.groupby([merges["method"], multi]):
        per_label: dict[str, dict[str, float]] = {}
        for label, rows in group.groupby("label"):
            per_lang = per_label.setdefault(str(label), {})
            for lang in langs:
                on = rows[rows["suite"] == f"{lang}{DEV_SUFFIX}"]
                on = on[(on["langs"] == lang) | on["langs"].str.contains("+", regex=False)]
                if len(on):
                    per_lang[lang] = float(on["value"].mean())
        shared = [lang for lang in langs if all(lang in v for v in per_label.values())]
        if len(per_label) < 2 or not shared:
            continue
        score = {label: float(np.mean([v[lang] for lang in shared]))
                 for label, v in per_label.items()}
        ranked = sorted(score, key=lambda label: score[label], reverse=not lower)
        chosen.add(shorts[ranked[0]])
    return chosen


def family_tables(frame: pd.DataFrame, items: ItemIndex) -> list[FamilyTable]:
    """Every family x budget x (target, English) table with at least one row, core families
    first (the registry's order), then the rest alphabetically."""
    registered = list(load_families())
    present = set(frame["family"])
    order = [f for f in registered if f in present] + sorted(present - set(registered))
    spans = budgets(frame[frame["langs"] != ""]) or [None]
    tables = []
    for family in order:
        for english in (False, True):
            for budget in spans:
                table = build_family_table(frame, items, family, budget, english)
                adapted = any(kind not in ("base", "sft") for kind in table.kinds.values())
                # base and SFT alone (no budget matters): one table, not one per budget
                if table.rows and (adapted or budget == spans[0]):
                    tables.append(table)
    return tables


# --------------------------------------------------------------------------- formatting


def format_value(value: float) -> str:
    if value is None or math.isnan(value):
        return MISSING
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3f}"


def format_cell(cell: Cell) -> str:
    text = format_value(cell.value)
    if not math.isnan(cell.se):
        text += f" \u00b1 {format_value(cell.se)}"
    if cell.models > 1:
        text += "\u2020"  # dagger: see the legend
    return text


def best_labels(table: FamilyTable, column: str) -> set[str]:
    """The best row of a column, when it beats every other row beyond the interval."""
    cells = {label: cell for label, cell in table.column(column).items()
             if not math.isnan(cell.value)}
    if len(cells) < 2:
        return set()
    ranked = sorted(cells, key=lambda label: cells[label].value, reverse=not table.lower)
    best = cells[ranked[0]]
    if all(stats.separated((best.value, best.se), (cells[o].value, cells[o].se))
           for o in ranked[1:]):
        return {ranked[0]}
    return set()


def table_title(table: FamilyTable) -> str:
    family = load_families().get(table.family)
    name = family.title if family else table.family
    better = "lower" if table.lower else "higher"
    where = "English (retention; column: the model's language)" if table.english \
        else "the target language"
    budget = f", CT budget {format_tokens(table.budget)}" if table.budget is not None else ""
    return f"{name} on {where}{budget} ({table.family}, {table.metric}; {better} is better)"


def table_markdown(table: FamilyTable) -> str:
    columns = [*table.langs, AVERAGE]
    lines = ["| model | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for name in BASELINES:
        if name in table.baselines:
            values = table.baselines[name]
            lines.append(f"| *{name}* | " + " | ".join(
                f"*{format_value(values[c])}*" if c in values else MISSING for c in columns)
                + " |")
    best = {column: best_labels(table, column) for column in columns}
    for label, cells in table.rows.items():
        shown = label + (" \u2713" if label in table.selected else "")
        parts = []
        for column in columns:
            if column not in cells:
                parts.append(MISSING)
                continue
            text = format_cell(cells[column])
            parts.append(f"**{text}**" if label in best[column] else text)
        lines.append(f"| {shown} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- paired comparisons

REFERENCES = ("CT-then-SFT", "CT")


def paired_items(table: FamilyTable, label: str, reference: str
                 ) -> dict[str, tuple[np.ndarray, np.ndarray] | None]:
    """Per language, the per-item values of label and reference over the items both scored
    (None where either has no per-item results)."""
    out = {}
    for lang in table.langs:
        a = table.rows.get(label, {}).get(lang)
        b = table.rows.get(reference, {}).get(lang)
        out[lang] = stats.aligned(a.items, b.items, table.metric) \
            if a and b and a.items and b.items else None
    return out


def compare(table: FamilyTable, label: str, reference: str
            ) -> dict[str, stats.Difference | None]:
    """label - reference per language (paired over items) and over the languages' average."""
    out: dict[str, stats.Difference | None] = {}
    pairs = []
    for lang, pair in paired_items(table, label, reference).items():
        out[lang] = stats.paired_difference(table.metric, [pair], keys=[lang]) if pair else None
        if pair:
            pairs.append(pair)
    complete = len(pairs) == len(table.langs) and len(pairs) > 1
    out[AVERAGE] = stats.paired_difference(table.metric, pairs, keys=table.langs) \
        if complete else None
    return out


def comparisons_markdown(table: FamilyTable) -> str:
    """Each merge against CT-then-SFT and CT: difference [95% paired bootstrap interval]."""
    merges = [label for label, kind in table.kinds.items() if kind == "merge"]
    columns = [*table.langs, AVERAGE]
    parts = []
    for reference in REFERENCES:
        if reference not in table.rows or not merges:
            continue
        lines = [f"merge \u2212 {reference}:", "", "| merge | " + " | ".join(columns) + " |",
                 "|" + "---|" * (len(columns) + 1)]
        for label in merges:
            diffs = compare(table, label, reference)
            cells = []
            for column in columns:
                diff = diffs.get(column)
                text = MISSING if diff is None else diff.text()
                cells.append(f"**{text}**" if diff is not None and diff.excludes_zero() else text)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- other tables


# TIES-SV is not the paper's published formula: say so wherever its rows appear (README, Merge
# methods, gives the same reading).
TIES_SV_NOTE = (
    "TIES-SV (ties_sv) is this project's reading of Tao et al. 2024's slack variable, not a "
    "formula from the paper: per tensor, with tau_i = theta_i - theta_base trimmed to its top "
    "density magnitudes and v_i = w_i tau_i, the elected sign is gamma = sign(sum_i v_i) (+1 at "
    "0), except on the SFT model's top-slack |tau_sft| entries with v_sft != 0, where it is "
    "sign(v_sft); theta = theta_base + lambda * sum_i v_i [sign v_i = gamma] / "
    "sum_i w_i [sign v_i = gamma]. slack = 0 is TIES.")


def legend_markdown(frame: pd.DataFrame) -> str:
    """Short row label -> the full recipe it stands for."""
    shorts = short_labels(frame)
    rows = frame.drop_duplicates("label")
    lines = ["| label | method | hyperparameters | languages |", "|---|---|---|---|"]
    for row in rows.itertuples():
        if row.kind != "merge":
            continue
        langs = row.langs if "+" in (row.langs or "") else "one at a time"
        lines.append(f"| {shorts[row.label]} | {row.method} | `{row.hparams or 'default'}` "
                     f"| {langs} |")
    if "ties_sv" in set(rows["method"]):
        lines += ["", TIES_SV_NOTE]
    return "\n".join(lines)


def training_markdown(train: pd.DataFrame, scores: pd.DataFrame) -> str:
    subjects = scores.drop_duplicates("model_digest").set_index("model_digest")
    shorts = short_labels(scores)
    header = ["model", "langs", "budget", "tokens trained", "steps", "trained tokens/s",
              "input tokens/s", "wall (s)", "final loss", "peak RSS (MB)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def fmt(value: Any, spec: str) -> str:
        return MISSING if value is None or pd.isna(value) else format(value, spec)

    for _, row in train.iterrows():
        subject = subjects.loc[row["model_digest"]] if row["model_digest"] in subjects.index \
            else None
        label = shorts[subject["label"]] if subject is not None else row["path"]
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


def diagnostics_markdown(diagnostics: pd.DataFrame, shorts: dict[str, str]) -> str:
    overall = diagnostics[diagnostics["scope"] == "overall"].copy()
    overall["merge"] = [shorts.get(label, label) + ("" if "+" in str(langs) else f" ({langs})")
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
