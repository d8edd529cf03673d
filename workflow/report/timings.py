"""Wall time per stage from Snakemake ``benchmark:`` TSV files
(``python -m workflow.report timings benchmarks/``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from workflow.report.load import MISSING, ReportError


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
