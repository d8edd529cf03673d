"""Report: gather score files into a CSV, paper-style tables with intervals, the papers'
claims checked, plots, and an HTML page of the tables.

Tables are laid out like Tao et al. 2024 (Findings of EMNLP 2024), one per task family
(``workflow/tasks/families.yaml``) and CT budget: one row per method (chance and majority
class for multiple-choice tasks, base, SFT, CT, CT-then-SFT, each merge; a multilingual merge is
a row of its own), one column per target language and their average; ``0.412 ± 0.021`` is the
value ± its standard error (lm-eval's; a bootstrap over items where lm-eval gives none). Each
merge is compared with CT-then-SFT and CT, paired over the same items (a bootstrap over items
of the per-item results the evaluate stage writes). A swept merge grid is chosen on the dev
split (suites ``<lang>_dev``) and its chosen point marked in the test tables; the papers'
claims are checked on the run (``claims.py``).

Usage::

    python -m workflow.report --scores results/eval/**/scores.json \\
        [--train-metrics results/ct/**/metrics.json ...] [--recipe '<json>'] --out results/report
    python -m workflow.report timings benchmarks/
    python -m workflow.report plan CONFIG.yaml

The first writes ``scores.csv``, ``table.md`` (and the same as ``tables.html``),
``claims.csv``, ``legend.csv``, ``budget_curves.png``, ``retention.png``, ``bpb_vs_acc.png``,
``diagnostics.csv`` and ``merge_diagnostics.png`` (from ``--diagnostics`` files of merged
models; and ``recipe.json`` when ``--recipe`` is given) into ``--out``. The second prints, as a
markdown table, the total and mean wall time per stage from Snakemake ``benchmark:`` TSV files,
the stage being the first path component under the directory. The third prints which tables
and plots a config's report will hold, without running anything.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from workflow.artifacts import (
    atomic_dir,
    atomic_file,
    parse_recipe_arg,
    point_latest,
    read_json,
    write_recipe,
)
from workflow.report.claims import check_claims, claims_markdown
from workflow.report.html import markdown_to_html
from workflow.report.load import (
    MISSING,
    ItemIndex,
    ReportError,
    format_tokens,
    load_diagnostics,
    load_score_file,
    load_scores,
    load_train_metrics,
    short_labels,
)
from workflow.report.plan import report_plan
from workflow.report.plots import (
    plot_bpb_vs_acc,
    plot_budget_curves,
    plot_merge_diagnostics,
    plot_retention,
)
from workflow.report.tables import (
    comparisons_markdown,
    diagnostics_markdown,
    family_tables,
    legend_markdown,
    table_markdown,
    table_title,
    training_markdown,
)
from workflow.report.timings import benchmark_timings, timings_markdown

__all__ = ["ReportError", "format_tokens", "load_score_file", "load_scores", "write_report",
           "benchmark_timings", "main"]

log = logging.getLogger("workflow.report")

# Bump when a change here changes what a stage writes (see workflow/stages.py).
# 2: task-family tables with intervals, baselines, paired comparisons, claims, tables.html.
STAGE_VERSIONS = {"report": "2"}

LEGEND = ("Columns: target language, and their average (avg). Base and SFT rows do not depend "
          f"on the budget. value \u00b1 standard error: lm-eval's, or for metrics it gives none "
          "(bits per byte) a bootstrap over items (1000 resamples). *chance*: 1 / number of "
          "choices; *majority*: always the most frequent gold answer of the eval set. Bold: "
          "best in the column, separated from every other row beyond the 95% interval "
          "(|a \u2212 b| > 1.96 \u221a(se_a\u00b2 + se_b\u00b2)); no bold when none is. "
          f"{MISSING}: not evaluated. \u2020: mean of several models with the same label. "
          "Comparisons: merge \u2212 reference on the same items, [95% paired bootstrap "
          "interval]; bold when it excludes zero.")


def render_markdown(scores: pd.DataFrame, items: ItemIndex, train: pd.DataFrame | None = None,
                    diagnostics: pd.DataFrame | None = None) -> tuple[str, list[Any]]:
    """table.md, and the claims of the first base model."""
    parts = ["# Results", "", LEGEND, ""]
    claims: list[Any] = []
    for model, frame in scores.groupby("model", sort=True):
        tables = family_tables(frame, items)
        parts += [f"## {model}", ""]
        diag = diagnostics if diagnostics is not None else pd.DataFrame()
        if len(diag):
            diag = diag[diag["model_digest"].isin(set(frame["model_digest"]))]
        model_claims = check_claims(tables, diag)
        claims = claims or model_claims
        parts += [claims_markdown(model_claims, tables), ""]
        legend = legend_markdown(frame)
        if legend.count("\n") > 1:
            parts += ["### Row labels", "", legend, ""]
        for table in tables:
            parts += [f"### {table_title(table)}", "", table_markdown(table), ""]
            if not table.english:
                comparisons = comparisons_markdown(table)
                if comparisons:
                    parts += [comparisons, ""]
    if train is not None and len(train):
        parts += ["## Training", "", training_markdown(train, scores), ""]
    return "\n".join(parts), claims


def write_report(score_paths: Sequence[str | Path], out: str | Path,
                 train_metrics_paths: Sequence[str | Path] = (),
                 recipe: dict[str, Any] | None = None,
                 diagnostics_paths: Sequence[str | Path] = ()) -> pd.DataFrame:
    """Write the report's files into ``out``; returns the scores."""
    if not score_paths:
        raise ReportError("no score files given (--scores)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items: ItemIndex = {}
    scores = load_scores(score_paths, items)
    log.info("%d score files, %d results, %d models, per-item results for %d", len(score_paths),
             len(scores), scores["model_digest"].nunique(), len(items))
    untimed = scores[(scores["langs"] != "") & scores["tokens"].isna()]
    if len(untimed):  # no budget column can hold them: say so rather than drop them silently
        log.warning("adapted models without a token budget are in scores.csv but not in the "
                    "tables: %s", sorted(set(untimed["model_digest"])))
    train = load_train_metrics(train_metrics_paths) if train_metrics_paths else None
    with atomic_file(out / "scores.csv") as handle:
        scores.to_csv(handle, index=False)
    diagnostics = load_diagnostics(diagnostics_paths, scores)
    shorts = short_labels(scores)
    markdown, claims = render_markdown(scores, items, train, diagnostics)
    if len(diagnostics):
        markdown += "\n" + diagnostics_markdown(diagnostics, shorts)
    with atomic_file(out / "table.md") as handle:
        handle.write(markdown)
    with atomic_file(out / "tables.html") as handle:
        handle.write(markdown_to_html(markdown))
    with atomic_file(out / "claims.csv") as handle:
        pd.DataFrame([vars(claim) for claim in claims],
                     columns=["name", "statement", "verdict", "evidence"]).to_csv(handle,
                                                                                   index=False)
    with atomic_file(out / "legend.csv") as handle:
        pd.DataFrame([{"label": short, "recipe": full} for full, short in shorts.items()]
                     ).to_csv(handle, index=False)
    with atomic_file(out / "diagnostics.csv") as handle:
        diagnostics.to_csv(handle, index=False)
    tables = [table for _, frame in scores.groupby("model", sort=True)
              for table in family_tables(frame, items)]
    plot_budget_curves(tables, out / "budget_curves.png")
    plot_retention(tables, out / "retention.png")
    plot_bpb_vs_acc(scores, shorts, out / "bpb_vs_acc.png")
    plot_merge_diagnostics(diagnostics, shorts, out / "merge_diagnostics.png")
    if recipe is not None:
        write_recipe(out, recipe)
    return scores


# name -> (description, its one argument, that argument's help, what prints the answer)
SUBCOMMANDS: dict[str, tuple[str, str, str, Callable[[Path], str]]] = {
    "timings": ("Wall time per stage from Snakemake benchmark TSV files.", "bench_dir",
                "directory searched recursively",
                lambda path: timings_markdown(benchmark_timings(path))),
    "plan": ("The tables and plots a config's report will hold (nothing is run or validated).",
             "config", "a config file (config.yaml, a preset)", report_plan),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv[:1] and argv[0] in SUBCOMMANDS:
        description, name, help_text, run = SUBCOMMANDS[argv[0]]
        parser = argparse.ArgumentParser(prog=f"python -m workflow.report {argv[0]}",
                                         description=description)
        parser.add_argument(name, type=Path, help=help_text)
        print(run(getattr(parser.parse_args(argv[1:]), name)))
        return 0
    parser = argparse.ArgumentParser(prog="python -m workflow.report",
                                     description=(__doc__ or "").split("\n\n")[0])
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
