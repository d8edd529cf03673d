"""``python -m workflow.report plan CONFIG``: which tables and plots a config's report will
hold, from the config alone (no corpus, model or hub is touched, nothing is validated beyond
what the layout needs): the tasks each language suite runs (families expanded), grouped by
task family."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workflow.config import read_config_file
from workflow.tasks import family_task, load_families, task_index

ENGLISH = "en"
OFFLINE = ("topic", "bpb")


def suite_tasks(config: dict[str, Any]) -> dict[str, list[str]]:
    """Suite (language, and English) -> the tasks the planner gives it."""
    evaluation = config.get("evaluation") or {}
    families = evaluation.get("families", [])
    suites: dict[str, list[str]] = {}
    for lang, spec in sorted(config["languages"].items()):
        corpus = (spec or {}).get("corpus")
        tasks = list((spec or {}).get("tasks", evaluation.get("tasks", list(OFFLINE))))
        tasks += [t for t in (family_task(f, lang) for f in families) if corpus or t not in OFFLINE]
        suites[lang] = list(dict.fromkeys(tasks))
    english = evaluation.get("english", ENGLISH)
    tasks = list(evaluation.get("english_tasks", ["topic"]))
    tasks += [t for t in (family_task(f, ENGLISH) for f in families) if english or t not in OFFLINE]
    suites[ENGLISH] = list(dict.fromkeys(tasks))
    return suites


def report_plan(path: str | Path) -> str:
    config = read_config_file(path)
    suites = suite_tasks(config)
    langs = [s for s in suites if s != ENGLISH]
    index = task_index(list(suites))
    layout: dict[str, dict[str, list[str]]] = {}  # family -> suite -> tasks
    for suite, tasks in suites.items():
        for task in tasks:
            family = index[task][0] if task in index else task
            layout.setdefault(family, {}).setdefault(suite, []).append(task)
    budgets = sorted({b for spec in config["languages"].values()
                      for b in (spec or {}).get("budgets", config.get("budgets", []))})
    ct_sft = (config.get("ct_sft") or {}).get("enabled", True)
    rows = ["chance, majority (multiple choice)", "base", "SFT", "CT"]
    rows += ["CT-then-SFT"] if ct_sft else []
    for entry in config.get("merges", []):
        rows.append(f"{entry['method']} (one per grid point; 'multi' for all languages)")
    registered = load_families()
    lines = [f"# Report plan for {path}", "",
             f"Target languages: {', '.join(langs)}; budgets: "
             f"{', '.join(str(b) for b in budgets)}; rows: {'; '.join(rows)}.", ""]
    for family, by_suite in layout.items():
        family_spec = registered.get(family)
        metric = family_spec.metric if family_spec else "acc (else its first metric)"
        target = [s for s in langs if s in by_suite]
        lines.append(f"## {family} ({metric})")
        if target:
            tasks = ", ".join(f"{s}: {', '.join(by_suite[s])}" for s in target)
            lines.append(f"- target table per budget ({len(budgets)}): columns "
                         f"{' | '.join(target)} | avg ({tasks})")
            lines.append("- paired comparisons: each merge \u2212 CT-then-SFT and \u2212 CT, "
                         "per language and avg")
            lines.append("- budget_curves.png: a row of panels, one per merge method")
        if ENGLISH in by_suite:
            lines.append(f"- English retention table per budget: columns {' | '.join(langs)} | "
                         f"avg ({ENGLISH}: {', '.join(by_suite[ENGLISH])})")
            if target:
                lines.append("- retention.png: target (x) vs English (y), a panel per budget")
        if family_spec is None and len(by_suite) == 1:
            lines.append("- (not in workflow/tasks/families.yaml: a family of its own)")
        lines.append("")
    grids = [entry["method"] for entry in config.get("merges", [])
             if any(isinstance(v, list) for v in entry.values())
             or any(isinstance(v, list) for m in (entry.get("models") or {}).values()
                    for v in (m or {}).values())]
    offline = any(set(tasks) & set(OFFLINE) for suite, tasks in suites.items() if suite in langs)
    if grids:
        lines.append(f"Swept grids: {', '.join(grids)}: "
                     + ("scored on the dev split too, one point chosen on dev and marked \u2713"
                        if offline else "no offline target task, so no dev split: every point "
                        "is reported and none is marked chosen"))
        lines.append("")
    lines.append("Always: the claims section (computed), scores.csv, claims.csv, legend.csv, "
                 "tables.html, bpb_vs_acc.png (needs bpb and English topic), "
                 "merge_diagnostics.png.")
    return "\n".join(lines)
