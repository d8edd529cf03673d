"""The papers' claims, checked on this run's scores: computed, never hand-written.

Each claim is a comparison of paired scores (the same test items under two models, a
bootstrap over items gives the 95% interval of the difference) on the primary task family
(the first multiple-choice family with target-language scores, e.g. topic or belebele),
averaged over the target languages, or a trend in the merge diagnostics. Verdicts:

- "supported": the interval lies entirely on the claim's side of zero;
- "not supported": it lies entirely on the other side;
- "inconclusive": it contains zero, or the run lacks what the claim needs (said why).

The claims (Tao et al. 2024; Valero et al. 2026):

1. merging >= CT-then-SFT at the lowest budget (all single-language merges pooled);
2. the gain of merging over CT-then-SFT shrinks from the lowest to the highest budget;
3. TIES-SV >= TIES at the highest budget;
4. the loss of the SFT vector's top-k mass (1 - sft_topk_mass_kept) grows with the budget;
5. multilingual merging >= single-language merging (same method, every budget).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from workflow.report import stats
from workflow.report.load import format_tokens, lower_is_better
from workflow.report.tables import FamilyTable, paired_items
from workflow.tasks import load_families

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"


@dataclass(frozen=True)
class Claim:
    name: str
    statement: str
    verdict: str
    evidence: str


def _verdict(diff: stats.Difference | None) -> str:
    """For a difference oriented so that > 0 is what the claim says."""
    if diff is None:
        return INCONCLUSIVE
    if diff.low > 0:
        return SUPPORTED
    if diff.high < 0:
        return NOT_SUPPORTED
    return INCONCLUSIVE


def primary_tables(tables: list[FamilyTable]) -> dict[int | None, FamilyTable]:
    """Budget -> target-language table of the primary family."""
    families = load_families()
    target = [t for t in tables if not t.english and t.langs]
    mc = [t for t in target if getattr(families.get(t.family), "multiple_choice", False)]
    chosen = (mc or target)[:1]
    if not chosen:
        return {}
    family = chosen[0].family
    return {t.budget: t for t in target if t.family == family}


def _single_merges(table: FamilyTable, method: str | None = None) -> list[str]:
    """Single-language merge rows; of a swept grid only the point chosen on dev (the best of
    a grid on test would flatter merging)."""
    labels = [label for label, kind in table.kinds.items()
              if kind == "merge" and not label.endswith(" multi")
              and (method is None or label.split(" #")[0] == method)]
    out = []
    for label in labels:
        grid = [other for other in labels if other.split(" #")[0] == label.split(" #")[0]]
        if len(grid) > 1 and set(grid) & table.selected and label not in table.selected:
            continue
        out.append(label)
    return out


Pair = tuple[np.ndarray, np.ndarray]


def _pairs(table: FamilyTable, label: str, reference: str) -> list[tuple[str, Pair]] | None:
    """(language, paired per-item values) of label vs reference, every language, or None."""
    pairs = paired_items(table, label, reference)
    if any(pair is None for pair in pairs.values()):
        return None
    return list(pairs.items())


def _pooled(metric: str, groups: list[tuple[float, list[tuple[str, Pair]]]]
            ) -> stats.Difference | None:
    """sum_g weight_g * mean over languages of (a - b); oriented so that higher is better."""
    pairs, weights, keys = [], [], []
    sign = -1.0 if lower_is_better(metric) else 1.0
    for weight, langs in groups:
        for lang, (a, b) in langs:
            pairs.append((a, b))
            weights.append(sign * weight / len(langs))
            keys.append(lang)
    return stats.paired_difference(metric, pairs, weights, keys) if pairs else None


def _describe(diff: stats.Difference | None, what: str) -> str:
    if diff is None:
        return f"{what}: no paired per-item results"
    return f"{what} = {diff.text()} (95% paired bootstrap interval, {diff.n} item pairs)"


def merging_vs_ctsft_low(by_budget: dict[int | None, FamilyTable]) -> Claim:
    statement = "Merging >= CT-then-SFT at low budgets (lowest budget, merges pooled)"
    budgets = sorted(b for b in by_budget if b is not None)
    if not budgets:
        return Claim("low_budget", statement, INCONCLUSIVE, "no CT budgets in this run")
    table = by_budget[budgets[0]]
    merges = _single_merges(table)
    if "CT-then-SFT" not in table.rows or not merges:
        return Claim("low_budget", statement, INCONCLUSIVE,
                     "needs CT-then-SFT and single-language merges (ct_sft.enabled, merges)")
    groups = [(1.0 / len(merges), p) for m in merges if (p := _pairs(table, m, "CT-then-SFT"))]
    if len(groups) != len(merges):
        return Claim("low_budget", statement, INCONCLUSIVE, "no per-item results to pair")
    groups = [(1.0 / len(groups), p) for _, p in groups]
    diff = _pooled(table.metric, groups)
    each = "; ".join(f"{m} {_pooled(table.metric, [(1.0, p)]).text()}"  # type: ignore[union-attr]
                     for m, (_, p) in zip(merges, groups, strict=True))
    evidence = (_describe(diff, f"{table.family} {table.metric}, merges \u2212 CT-then-SFT at "
                          f"{format_tokens(budgets[0])}, mean over {', '.join(table.langs)}")
                + f". Per merge: {each}")
    return Claim("low_budget", statement, _verdict(diff), evidence)


def _gain_groups(table: FamilyTable, weight: float) -> list[tuple[float, list]] | None:
    merges = _single_merges(table)
    reference = "CT-then-SFT" if "CT-then-SFT" in table.rows else "CT"
    groups = []
    for merge in merges:
        pairs = _pairs(table, merge, reference)
        if pairs is None:
            return None
        groups.append((weight / len(merges), pairs))
    return groups or None


def gains_saturate(by_budget: dict[int | None, FamilyTable]) -> Claim:
    statement = ("The gains of merging saturate as the budget grows (gain over CT-then-SFT, "
                 "else CT, smaller at the highest budget than at the lowest)")
    budgets = sorted(b for b in by_budget if b is not None)
    if len(budgets) < 2:
        return Claim("saturation", statement, INCONCLUSIVE, "needs two or more budgets")
    low, high = by_budget[budgets[0]], by_budget[budgets[-1]]
    gain_low, gain_high = _gain_groups(low, 1.0), _gain_groups(high, 1.0)
    if not gain_low or not gain_high:
        return Claim("saturation", statement, INCONCLUSIVE,
                     "needs merges and a CT-then-SFT or CT baseline with per-item results at "
                     "both budgets")
    # the claim: gain(high) - gain(low) < 0, so orient as gain(low) - gain(high)
    shrink = _pooled(low.metric, [*gain_low, *[(-w, p) for w, p in gain_high]])
    at_low, at_high = _pooled(low.metric, gain_low), _pooled(low.metric, gain_high)
    evidence = "; ".join([
        _describe(at_low, f"gain at {format_tokens(budgets[0])}"),
        _describe(at_high, f"gain at {format_tokens(budgets[-1])}"),
        _describe(shrink, "shrinkage (low \u2212 high)"),
    ])
    return Claim("saturation", statement, _verdict(shrink), evidence)


def ties_sv_vs_ties(by_budget: dict[int | None, FamilyTable]) -> Claim:
    statement = "TIES-SV >= TIES at high budgets (highest budget)"
    budgets = sorted(b for b in by_budget if b is not None)
    if not budgets:
        return Claim("ties_sv", statement, INCONCLUSIVE, "no CT budgets in this run")
    table = by_budget[budgets[-1]]
    sv, ties = _single_merges(table, "TIES-SV"), _single_merges(table, "TIES")
    if not sv or not ties:
        return Claim("ties_sv", statement, INCONCLUSIVE, "needs TIES-SV and TIES merges")
    groups = []
    for a in sv:
        for b in ties:
            pairs = _pairs(table, a, b)
            if pairs is None:
                return Claim("ties_sv", statement, INCONCLUSIVE, "no per-item results to pair")
            groups.append((1.0 / (len(sv) * len(ties)), pairs))
    diff = _pooled(table.metric, groups)
    return Claim("ties_sv", statement, _verdict(diff), _describe(
        diff, f"TIES-SV \u2212 TIES at {format_tokens(budgets[-1])}, {table.family} "
        f"{table.metric}, mean over {', '.join(table.langs)}"))


def topk_mass_loss_grows(diagnostics: pd.DataFrame) -> Claim:
    statement = "The loss of the SFT vector's top-k mass grows with the budget"
    overall = diagnostics[(diagnostics["scope"] == "overall")
                          & diagnostics["sft_topk_mass_kept"].notna()] \
        if len(diagnostics) else diagnostics
    if overall.empty or overall["tokens"].nunique() < 2:
        return Claim("topk_mass", statement, INCONCLUSIVE,
                     "needs merge diagnostics (sft_topk_mass_kept) at two or more budgets")
    low, high = overall["tokens"].min(), overall["tokens"].max()
    grows = shrinks = 0
    for _, group in overall.groupby(["label", "langs"]):
        kept = group.set_index("tokens")["sft_topk_mass_kept"].astype(float)
        if low in kept.index and high in kept.index:
            change = (1 - kept[high]) - (1 - kept[low])
            grows += change > 0
            shrinks += change < 0
    mean_low = overall.loc[overall["tokens"] == low, "sft_topk_mass_kept"].astype(float).mean()
    mean_high = overall.loc[overall["tokens"] == high, "sft_topk_mass_kept"].astype(float).mean()
    total = grows + shrinks
    verdict = SUPPORTED if total and grows == total else NOT_SUPPORTED if total and \
        shrinks == total else INCONCLUSIVE
    evidence = (f"mean top-k mass kept {mean_low:.3f} at {format_tokens(low)}, {mean_high:.3f} "
                f"at {format_tokens(high)}; the loss grew for {grows} and shrank for {shrinks} "
                "of the merges present at both budgets (a deterministic quantity: no interval; "
                "supported only when it grew for every merge)")
    return Claim("topk_mass", statement, verdict, evidence)


def multilingual_vs_single(by_budget: dict[int | None, FamilyTable]) -> Claim:
    statement = "Multilingual merging >= single-language merging (same method, every budget)"
    groups = []
    methods = set()
    for table in by_budget.values():
        for multi in [label for label, kind in table.kinds.items()
                      if kind == "merge" and label.endswith(" multi")]:
            base = multi.removesuffix(" multi")
            chosen = base in table.selected or multi in table.selected
            swept = any(label.startswith(base.split(" #")[0] + " #") for label in table.rows)
            if base in table.rows and (chosen or not swept or not table.selected):
                pairs = _pairs(table, multi, base)
                if pairs is not None:
                    groups.append(pairs)
                    methods.add(base)
    if not groups:
        return Claim("multilingual", statement, INCONCLUSIVE,
                     "needs multilingual and single-language merges of the same method with "
                     "per-item results")
    metric = next(iter(by_budget.values())).metric
    diff = _pooled(metric, [(1.0 / len(groups), p) for p in groups])
    return Claim("multilingual", statement, _verdict(diff), _describe(
        diff, f"multilingual \u2212 single-language ({', '.join(sorted(methods))}), pooled over "
        f"{len(groups)} method x budget pairs"))


CHECKS: tuple[Callable[..., Claim], ...] = (merging_vs_ctsft_low, gains_saturate, ties_sv_vs_ties)


def check_claims(tables: list[FamilyTable], diagnostics: pd.DataFrame) -> list[Claim]:
    by_budget = primary_tables(tables)
    claims = [check(by_budget) for check in CHECKS]
    claims.append(topk_mass_loss_grows(diagnostics))
    claims.append(multilingual_vs_single(by_budget))
    return claims


def claims_markdown(claims: list[Claim], tables: list[FamilyTable]) -> str:
    by_budget = primary_tables(tables)
    family = next(iter(by_budget.values())).family if by_budget else "none"
    lines = ["## The papers' claims, checked", "",
             f"Computed from this run (primary family: {family}; a difference > 0 favours the "
             "claim). Supported: the 95% interval excludes zero on the claim's side; not "
             "supported: on the other side; inconclusive: it contains zero, or the run lacks "
             "what the claim needs.", "",
             "| claim | verdict | evidence |", "|---|---|---|"]
    for claim in claims:
        lines.append(f"| {claim.statement} | **{claim.verdict}** | {claim.evidence} |")
    return "\n".join(lines) + "\n"
