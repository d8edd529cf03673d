"""Plots: budget curves and English retention per task family, faceted per method family
(one panel per merge method, with base, SFT, CT and CT-then-SFT as references in each), short
labels (the legend table in table.md maps them to recipes), legends outside the data."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: cluster nodes and CI have no display

import matplotlib.pyplot as plt
import pandas as pd

from workflow.artifacts import atomic_file
from workflow.report.load import DIAGNOSTIC_METRICS, ENGLISH, format_tokens, languages
from workflow.report.stats import Z95
from workflow.report.tables import AVERAGE, FamilyTable

REFERENCE_KINDS = ("base", "sft", "ct", "ctsft")


def _colors(labels: Iterable[str]) -> dict[str, Any]:
    """tab10 without its grey, which the CT and CT-then-SFT reference lines use."""
    palette = [plt.get_cmap("tab10")(i) for i in range(10) if i != 7]
    palette += [plt.get_cmap("tab20")(i) for i in range(1, 20, 2) if i != 15]  # lighter shades
    return {label: palette[i % len(palette)] for i, label in enumerate(dict.fromkeys(labels))}


def _save(fig: Any, path: Path) -> None:
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _empty_figure(path: Path, message: str) -> None:
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.text(0.5, 0.5, message, ha="center", va="center")
    ax.set_axis_off()
    _save(fig, path)


def _legend(fig: Any, axes: Iterable[Any]) -> None:
    """One legend for all panels, right of the figure, in first-seen order."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="center left",
               bbox_to_anchor=(1.0, 0.5), fontsize="small", frameon=False)


def _method_family(label: str, kind: str) -> str:
    """The panel a row belongs to: its merge method (grid points and multilingual together)."""
    return label.split(" #")[0].removesuffix(" multi") if kind == "merge" else "reference"


def _series(by_budget: list[FamilyTable], label: str) -> tuple[list[int], list[float],
                                                                 list[float]]:
    xs, ys, errs = [], [], []
    for table in by_budget:
        cell = table.rows.get(label, {}).get(AVERAGE)
        if cell is not None and table.budget is not None:
            xs.append(table.budget)
            ys.append(cell.value)
            errs.append(0.0 if math.isnan(cell.se) else Z95 * cell.se)
    return xs, ys, errs


def plot_budget_curves(tables: list[FamilyTable], path: str | Path) -> None:
    """Per family (rows) and merge method (columns): the average over target languages
    against the CT budget, 95% error bars; references (base, SFT dashed; CT, CT-then-SFT
    grey) in every panel."""
    path = Path(path)
    target = [t for t in tables if not t.english and t.budget is not None]
    families = list(dict.fromkeys(t.family for t in target))
    if not families:
        _empty_figure(path, "no scores of adapted models at a CT budget")
        return
    panels = list(dict.fromkeys(_method_family(label, kind) for t in target
                                for label, kind in t.kinds.items() if kind == "merge"))
    panels = panels or ["reference"]
    fig, axes = plt.subplots(len(families), len(panels), squeeze=False,
                             figsize=(3.6 * len(panels), 3.0 * len(families)))
    colors = _colors(label for t in target for label in t.rows)
    for r, family in enumerate(families):
        by_budget = sorted((t for t in target if t.family == family), key=lambda t: t.budget)
        first = by_budget[0]
        budgets = [t.budget for t in by_budget]
        for c, panel in enumerate(panels):
            ax = axes[r][c]
            for label, kind in first.kinds.items():
                if kind in ("base", "sft"):
                    cell = first.rows[label].get(AVERAGE)
                    if cell is not None:
                        ax.axhline(cell.value, ls="--", lw=1, color=colors[label], label=label)
            labels = {label: kind for t in by_budget for label, kind in t.kinds.items()}
            for label, kind in labels.items():
                if kind in ("base", "sft"):
                    continue
                if kind in ("ct", "ctsft"):
                    style = {"color": "0.55" if kind == "ct" else "0.25", "ls": "-", "lw": 1}
                elif _method_family(label, kind) == panel:
                    style = {"color": colors[label], "ls": ":" if label.endswith(" multi")
                             else "-", "lw": 1.6}
                else:
                    continue
                xs, ys, errs = _series(by_budget, label)
                if xs:
                    ax.errorbar(xs, ys, yerr=errs, marker="o", ms=3, capsize=2, label=label,
                                **style)
            if len(budgets) > 1 and budgets[0] > 0 and budgets[-1] / budgets[0] > 10:
                ax.set_xscale("log")
            ax.set_xticks(budgets, [format_tokens(b) for b in budgets])
            ax.minorticks_off()
            ax.grid(alpha=0.3)
            ax.set_title(f"{family}: {panel}", fontsize="medium")
            if c == 0:
                ax.set_ylabel(f"{first.metric}, mean of {len(first.langs)} languages")
            if r == len(families) - 1:
                ax.set_xlabel("CT tokens")
    _legend(fig, axes.flat)
    fig.tight_layout()
    _save(fig, path)


def plot_retention(tables: list[FamilyTable], path: str | Path) -> None:
    """Per family (rows) and budget (columns): each model's target-language score (x, mean
    over languages) against its English score (y), 95% error bars both ways."""
    path = Path(path)
    pairs = []
    for target in tables:
        if target.english:
            continue
        english = next((t for t in tables if t.english and t.family == target.family
                        and t.budget == target.budget), None)
        if english is not None:
            pairs.append((target, english))
    if not pairs:
        _empty_figure(path, "needs a family scored on the target languages and on English")
        return
    families = list(dict.fromkeys(t.family for t, _ in pairs))
    spans = list(dict.fromkeys(t.budget for t, _ in pairs))
    fig, axes = plt.subplots(len(families), len(spans), squeeze=False,
                             figsize=(4.2 * len(spans), 3.6 * len(families)))
    colors = _colors(label for t, _ in pairs for label in t.rows)
    markers = {"base": "s", "sft": "D", "ct": "^", "ctsft": "v", "merge": "o"}
    for ax in axes.flat:
        ax.set_visible(False)
    for target, english in pairs:
        ax = axes[families.index(target.family)][spans.index(target.budget)]
        ax.set_visible(True)
        for label, kind in target.kinds.items():
            x = target.rows[label].get(AVERAGE)
            y = english.rows.get(label, {}).get(AVERAGE)
            if x is None or y is None:
                continue
            ax.errorbar([x.value], [y.value], xerr=[0 if math.isnan(x.se) else Z95 * x.se],
                        yerr=[0 if math.isnan(y.se) else Z95 * y.se],
                        marker=markers.get(kind, "o"), ms=5, color=colors[label], label=label,
                        mfc="none" if label.endswith(" multi") else colors[label], capsize=2)
        budget = "" if target.budget is None else f" @ {format_tokens(target.budget)}"
        ax.set_title(f"{target.family}{budget}", fontsize="medium")
        ax.set_xlabel(f"{target.metric} on target languages (mean)")
        ax.set_ylabel(f"{english.metric} on English")
        ax.grid(alpha=0.3)
    _legend(fig, axes.flat)
    fig.tight_layout()
    _save(fig, path)


def plot_bpb_vs_acc(scores: pd.DataFrame, shorts: dict[str, str], path: str | Path) -> None:
    """Per model: target-language bits per byte (x) against English topic accuracy (y)."""
    path = Path(path)
    langs = languages(scores)
    bpb = scores[(scores["family"] == "bpb") & (scores["metric"] == "bits_per_byte")]
    acc = scores[(scores["family"] == "topic") & (scores["metric"] == "acc")
                 & (scores["suite"] == ENGLISH)]
    english_acc = acc.groupby("model_digest")["value"].mean()
    if bpb.empty or english_acc.empty or not langs:
        _empty_figure(path, "needs target-language bpb and English topic accuracy")
        return
    colors = _colors(shorts[label] for label in scores["label"])
    fig, axes = plt.subplots(1, len(langs), figsize=(4.2 * len(langs), 3.6), squeeze=False)
    for ax, lang in zip(axes[0], langs, strict=True):
        on_lang = bpb[bpb["suite"] == lang]
        # A model belongs to a language's panel if it was not adapted at all or adapted to it.
        adapted = on_lang["langs"].map(lambda value, lang=lang: not value
                                       or lang in value.split("+"))
        points = on_lang[adapted].groupby("model_digest").agg(
            x=("value", "mean"), label=("label", "first"), tokens=("tokens", "first"))
        points = points.join(english_acc.rename("y"), how="inner")
        for label, group in points.groupby("label", sort=False):
            name = shorts[label]
            ax.scatter(group["x"], group["y"], color=colors[name], label=name, s=24)
            for _, point in group.iterrows():
                if not pd.isna(point["tokens"]):
                    ax.annotate(format_tokens(point["tokens"]), (point["x"], point["y"]),
                                fontsize=6, alpha=0.6, xytext=(3, 3), textcoords="offset points")
        ax.set_title(lang)
        ax.set_xlabel(f"bits per byte on {lang} (lower is better)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("English topic accuracy")
    _legend(fig, axes[0])
    fig.tight_layout()
    _save(fig, path)


def plot_merge_diagnostics(diagnostics: pd.DataFrame, shorts: dict[str, str],
                           path: str | Path) -> None:
    """Each diagnostic against CT budget, one line per merge method and language."""
    path = Path(path)
    overall = diagnostics[diagnostics["scope"] == "overall"] if len(diagnostics) else diagnostics
    if overall.empty:
        _empty_figure(path, "no merge diagnostics")
        return
    names = [shorts.get(label, label) for label in sorted(set(overall["label"]))]
    colors = _colors(names)
    fig, axes = plt.subplots(1, len(DIAGNOSTIC_METRICS), figsize=(4.2 * len(DIAGNOSTIC_METRICS),
                                                                  3.4), squeeze=False)
    for ax, metric in zip(axes[0], DIAGNOSTIC_METRICS, strict=True):
        for (label, langs), group in overall.groupby(["label", "langs"], sort=True):
            curve = group.dropna(subset=["tokens", metric]).sort_values("tokens")
            name = shorts.get(label, label)
            if len(curve):
                ax.plot(curve["tokens"].astype(float), curve[metric].astype(float), marker="o",
                        color=colors[name], label=name, ls="-" if "+" not in str(langs) else ":")
        ax.set_title(metric.replace("_", " "))
        ax.set_xlabel("CT tokens")
        ax.grid(alpha=0.3)
    _legend(fig, axes[0])
    fig.tight_layout()
    _save(fig, path)

