"""The claims section on synthetic per-item scores whose answer is known, and the paired
statistics under it (bootstrap intervals, chance and majority rows)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from workflow.artifacts import digest_of
from workflow.report import stats
from workflow.report.claims import (
    INCONCLUSIVE,
    NOT_SUPPORTED,
    SUPPORTED,
    check_claims,
    claims_markdown,
)
from workflow.report.load import Items, load_scores
from workflow.report.tables import AVERAGE, family_tables

LANGS = ["ca", "eu"]
LOW, HIGH = 1000, 8000
N = 400  # items per language: a 95% interval of an accuracy difference is about +-0.07
MERGES = {"linear": "weight0.5", "ties": "density0.5", "ties_sv": "slack0.1-density0.5"}
GOLD = [i % 4 if i % 10 else 0 for i in range(N)]  # label 0 most frequent


def correct(accuracy: float, seed: int) -> list[float]:
    """Exactly round(accuracy * N) correct items, in a seeded order."""
    hits = np.zeros(N)
    hits[: round(accuracy * N)] = 1
    return np.random.default_rng(seed).permutation(hits).tolist()


def write_score(directory: Path, kind: str, langs: list[str], tokens: int | None,
                accuracy: dict[str, float], method: str | None = None, seed: int = 0) -> Path:
    subject = {"kind": kind, "model": "synth", "langs": langs, "tokens": tokens,
               "method": method, "hparams": MERGES.get(method or ""),
               "model_digest": digest_of([kind, langs, tokens, method])[:12]}
    results, items = [], {}
    for k, (suite, value) in enumerate(sorted(accuracy.items())):
        task = f"lrm_topic_{suite}"
        per_item = correct(value, seed + k)
        mean = float(np.mean(per_item))
        results.append({"suite": suite, "task": task, "kind": "topic", "metric": "acc",
                        "value": mean, "stderr": math.sqrt(mean * (1 - mean) / (N - 1))})
        items[task] = {"doc_id": list(range(N)), "gold": GOLD, "n_choices": [4] * N,
                       "metrics": {"acc": per_item}}
    recipe = {"stage": "evaluate", "subject": subject, "results": len(results), "seed": seed}
    path = directory / f"{digest_of(recipe)}.json"
    path.write_text(json.dumps({"digest": digest_of(recipe), "subject": subject,
                                "results": results, "items": items}))
    return path


def scenario(directory: Path, ctsft: dict[int, float], merges: dict[int, dict[str, float]],
             multi: dict[int, float]) -> list[Path]:
    """Every model at both budgets; accuracy per budget (the same in every language)."""
    paths = [write_score(directory, "base", [], None, {lang: 0.25 for lang in LANGS}, seed=1),
             write_score(directory, "sft", [], None, {lang: 0.3 for lang in LANGS}, seed=2)]
    for tokens in (LOW, HIGH):
        for i, lang in enumerate(LANGS):
            seed = tokens + 10 * i
            paths.append(write_score(directory, "ct", [lang], tokens, {lang: 0.3}, seed=seed))
            paths.append(write_score(directory, "ctsft", [lang], tokens,
                                     {lang: ctsft[tokens]}, seed=seed + 1))
            for j, method in enumerate(MERGES):
                paths.append(write_score(directory, "merge", [lang], tokens,
                                         {lang: merges[tokens][method]}, method, seed + 2 + j))
        for j, method in enumerate(MERGES):
            paths.append(write_score(directory, "merge", LANGS, tokens,
                                     {lang: multi[tokens] for lang in LANGS}, method,
                                     tokens + 50 + j))
    return paths


def diagnostics(kept_low: float, kept_high: float) -> pd.DataFrame:
    rows = [{"label": f"{method} {MERGES[method]}", "langs": lang, "tokens": tokens,
             "method": method, "model_digest": "x", "scope": "overall",
             "sft_topk_mass_kept": kept, "sign_conflict": 0.1, "trimmed": 0.5}
            for method in MERGES for lang in LANGS
            for tokens, kept in ((LOW, kept_low), (HIGH, kept_high))]
    return pd.DataFrame(rows)


def claims_of(tmp_path: Path, paths: list[Path], diag: pd.DataFrame) -> dict[str, str]:
    items: dict = {}
    frame = load_scores(paths, items)
    claims = check_claims(family_tables(frame, items), diag)
    return {claim.name: claim.verdict for claim in claims}


def test_claims_supported(tmp_path: Path) -> None:
    """Merges far above CT-then-SFT at the low budget, level at the high one; TIES-SV above
    TIES; multilingual above single; the SFT vector loses mass as the budget grows."""
    merges = {LOW: {"linear": 0.6, "ties": 0.6, "ties_sv": 0.6},
              HIGH: {"linear": 0.6, "ties": 0.5, "ties_sv": 0.7}}
    paths = scenario(tmp_path, ctsft={LOW: 0.35, HIGH: 0.6}, merges=merges,
                     multi={LOW: 0.75, HIGH: 0.8})
    verdicts = claims_of(tmp_path, paths, diagnostics(kept_low=0.9, kept_high=0.6))
    assert verdicts == {"low_budget": SUPPORTED, "saturation": SUPPORTED, "ties_sv": SUPPORTED,
                        "topk_mass": SUPPORTED, "multilingual": SUPPORTED}


def test_claims_not_supported(tmp_path: Path) -> None:
    """The demo's finding: CT-then-SFT beats every merge; the gap to it grows with budget."""
    merges = {LOW: {"linear": 0.4, "ties": 0.4, "ties_sv": 0.4},
              HIGH: {"linear": 0.5, "ties": 0.6, "ties_sv": 0.45}}
    paths = scenario(tmp_path, ctsft={LOW: 0.6, HIGH: 0.4}, merges=merges,
                     multi={LOW: 0.2, HIGH: 0.2})
    verdicts = claims_of(tmp_path, paths, diagnostics(kept_low=0.6, kept_high=0.9))
    assert verdicts == {"low_budget": NOT_SUPPORTED, "saturation": NOT_SUPPORTED,
                        "ties_sv": NOT_SUPPORTED, "topk_mass": NOT_SUPPORTED,
                        "multilingual": NOT_SUPPORTED}


def test_claims_inconclusive_within_noise(tmp_path: Path) -> None:
    """Differences of one item in 400 are noise: every verdict is inconclusive, and a run
    without diagnostics says what is missing."""
    merges = {budget: {"linear": 0.5, "ties": 0.5, "ties_sv": 0.5025} for budget in (LOW, HIGH)}
    paths = scenario(tmp_path, ctsft={LOW: 0.5, HIGH: 0.5025}, merges=merges,
                     multi={LOW: 0.5025, HIGH: 0.5})
    items: dict = {}
    frame = load_scores(paths, items)
    tables = family_tables(frame, items)
    claims = check_claims(tables, pd.DataFrame())
    assert {c.name: c.verdict for c in claims} == dict.fromkeys(
        ["low_budget", "saturation", "ties_sv", "topk_mass", "multilingual"], INCONCLUSIVE)
    text = claims_markdown(claims, tables)
    assert "needs merge diagnostics" in text and "95% paired bootstrap interval" in text


def test_claims_need_their_rows(tmp_path: Path) -> None:
    """No CT-then-SFT and one budget: the claims that need them say so."""
    paths = [p for p in scenario(tmp_path, ctsft={LOW: 0.5, HIGH: 0.5},
                                 merges={b: dict.fromkeys(MERGES, 0.5) for b in (LOW, HIGH)},
                                 multi={LOW: 0.5, HIGH: 0.5})
             if json.loads(p.read_text())["subject"]["kind"] != "ctsft"
             and json.loads(p.read_text())["subject"]["tokens"] in (None, LOW)]
    items: dict = {}
    claims = check_claims(family_tables(load_scores(paths, items), items), pd.DataFrame())
    evidence = {c.name: c.evidence for c in claims}
    assert "CT-then-SFT" in evidence["low_budget"]
    assert "two or more budgets" in evidence["saturation"]


# --------------------------------------------------------------------------- statistics


def test_bootstrap_interval_covers_known_difference() -> None:
    """A paired difference of exactly +0.1 (40 of 400 items flipped to correct): the point
    estimate is exact and the interval is about +-1.96 sqrt(0.1 * 0.9 / 400) = +-0.029 wide."""
    b = np.array(correct(0.5, 3))
    a = b.copy()
    a[np.flatnonzero(b == 0)[:40]] = 1
    diff = stats.paired_difference("acc", [(a, b)])
    assert diff is not None and diff.value == pytest.approx(0.1)
    assert diff.low > 0.06 and diff.high < 0.14 and diff.low < 0.1 < diff.high
    # unpaired noise is larger than the paired interval: pairing is what makes it tight
    assert diff.high - diff.low < 2 * 1.96 * math.sqrt(2 * 0.25 / N)


def test_bits_per_byte_is_a_ratio_of_sums() -> None:
    pairs = np.array([[-10.0, 5.0], [-30.0, 5.0]])  # loglikelihood (nats), bytes
    assert stats.score("bits_per_byte", pairs) == pytest.approx(40 / 10 / math.log(2))
    assert stats.bootstrap_se("bits_per_byte", pairs) > 0


def test_chance_and_majority() -> None:
    items = Items(np.arange(N), GOLD, [4] * N, {})
    assert stats.chance(items) == pytest.approx(0.25)
    # label 0: every tenth item, plus a quarter of the rest
    assert stats.majority(items) == pytest.approx(GOLD.count(0) / N)
    assert stats.chance(Items(np.arange(2), [None, None], [None, None], {})) is None


def test_table_has_intervals_baselines_and_average(tmp_path: Path) -> None:
    merges = {b: {"linear": 0.6, "ties": 0.5, "ties_sv": 0.7} for b in (LOW, HIGH)}
    paths = scenario(tmp_path, ctsft={LOW: 0.4, HIGH: 0.4}, merges=merges,
                     multi={LOW: 0.5, HIGH: 0.5})
    items: dict = {}
    tables = family_tables(load_scores(paths, items), items)
    table = next(t for t in tables if t.budget == LOW and not t.english)
    assert table.langs == LANGS and table.family == "topic"
    assert table.baselines["chance"][AVERAGE] == pytest.approx(0.25)
    assert table.baselines["majority"]["eu"] == pytest.approx(GOLD.count(0) / N)
    cell = table.rows["TIES-SV"][AVERAGE]
    assert cell.value == pytest.approx(0.7)
    assert cell.se == pytest.approx(math.sqrt(0.7 * 0.3 / (N - 1)) / math.sqrt(2))
    assert list(table.rows)[:4] == ["base", "SFT", "CT", "CT-then-SFT"]
