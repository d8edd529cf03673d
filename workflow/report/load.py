"""Reading the report's inputs: score files (with per-item results), training metrics and merge
diagnostics; row labels and the order of rows."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from workflow.artifacts import merged_model_digest, read_json
from workflow.tasks import load_families, task_index

log = logging.getLogger("workflow.report")

SUBJECT_KINDS = ("base", "sft", "ct", "ctsft", "merge")
KIND_LABELS = {"base": "base", "sft": "SFT", "ct": "CT", "ctsft": "CT-then-SFT"}
# Short names of merge methods in tables and plots; the legend table gives the full recipe.
METHOD_NAMES = {"linear": "Linear", "task_arithmetic": "TA", "ties": "TIES", "ties_sv": "TIES-SV",
                "ties_yadav": "TIES-Yadav", "dare_ties": "DARE-TIES", "dare_linear": "DARE",
                "slerp": "SLERP"}
ENGLISH = "en"
COLUMNS = [
    "kind", "model", "langs", "tokens", "method", "hparams", "model_digest",
    "suite", "task", "task_kind", "metric", "value", "stderr", "score_digest", "label",
    "family", "split",
]
DEV_SUFFIX = "_dev"  # suite "<lang>_dev": the dev split of a language's offline tasks
# Metrics where a smaller number is the better model.
LOWER_IS_BETTER = ("bits_per_byte", "byte_perplexity", "word_perplexity", "perplexity", "loss")
MISSING = "\u2013"  # en dash, as in the paper's tables


class ReportError(ValueError):
    """An input file that cannot be read as documented; the message names the file."""


@dataclass(frozen=True)
class Items:
    """One task's per-item results in one score file (``workflow.evaluate``'s ``items``)."""

    doc_id: np.ndarray
    gold: list[Any]
    n_choices: list[Any]
    metrics: dict[str, np.ndarray]  # (n,) values, or (n, 2) [loglikelihood, units] pairs


# (score digest, suite, task) -> Items
ItemIndex = dict[tuple[str, str, str], Items]


def _fail(path: Path, where: str, message: str) -> ReportError:
    return ReportError(f"{path}: {where} {message}")


def _read_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON file whose top level must be an object; errors name the file and ``what``."""
    try:
        data = read_json(path)
    except (OSError, ValueError) as error:
        raise ReportError(f"{path}: cannot read {what} as JSON: {error}") from error
    if not isinstance(data, dict):
        raise _fail(path, "top level", f"must be a JSON object, got {type(data).__name__}")
    return data


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


def _check_items(path: Path, items: Any) -> dict[str, Items]:
    """``items`` of a score file (absent in files written before evaluate version 2)."""
    if items is None:
        return {}
    if not isinstance(items, dict):
        raise _fail(path, "'items'", "must be an object {task: per-item results}")
    out = {}
    for task, spec in items.items():
        where = f"items.{task}"
        if not isinstance(spec, dict) or not isinstance(spec.get("doc_id"), list):
            raise _fail(path, where, "must be an object with a 'doc_id' list")
        n = len(spec["doc_id"])
        metrics = {}
        for metric, values in (spec.get("metrics") or {}).items():
            try:
                array = np.asarray(values, dtype=float)
            except (TypeError, ValueError) as error:
                raise _fail(path, f"{where}.metrics.{metric}", f"is not numeric: {error}") from None
            if len(array) != n or array.ndim not in (1, 2):
                raise _fail(path, f"{where}.metrics.{metric}",
                            f"must hold {n} values (one per doc_id), got shape {array.shape}")
            metrics[metric] = array
        gold = spec.get("gold") or [None] * n
        n_choices = spec.get("n_choices") or [None] * n
        if len(gold) != n or len(n_choices) != n:
            raise _fail(path, where, f"gold and n_choices must hold {n} entries")
        out[task] = Items(np.asarray(spec["doc_id"], dtype=np.int64), list(gold),
                          list(n_choices), metrics)
    return out


def _family_of(task: str, task_kind: str, index: dict[str, tuple[str, str]]) -> str:
    """A result's task family: the registry's (by task, then by the requested name), the
    offline kind (topic, bpb), else the requested task itself (a family of one)."""
    for name in (task, task_kind):
        if name in index:
            return index[name][0]
    return task_kind


def load_score_file(path: str | Path, items: ItemIndex | None = None) -> list[dict[str, Any]]:
    """One flat row per result of a score file written by ``workflow.evaluate``; its per-item
    results go into ``items`` when given."""
    path = Path(path)
    data = _read_object(path, "score file")
    for key in ("digest", "subject", "results"):
        if key not in data:
            raise _fail(path, f"'{key}'", "is missing")
    if not isinstance(data["digest"], str):
        raise _fail(path, "'digest'", f"must be a string, got {data['digest']!r}")
    subject = _check_subject(path, data["subject"])
    if not isinstance(data["results"], list):
        raise _fail(path, "'results'", "must be a list")
    per_task = _check_items(path, data.get("items"))
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
        if items is not None and result["task"] in per_task:
            items[(data["digest"], result["suite"], result["task"])] = per_task[result["task"]]
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


def load_scores(paths: Iterable[str | Path], items: ItemIndex | None = None) -> pd.DataFrame:
    """All score files as one long table (columns ``COLUMNS``), in a stable order."""
    rows = [row for path in paths for row in load_score_file(path, items)]
    frame = pd.DataFrame(rows, columns=COLUMNS)
    index = task_index(sorted(set(frame["suite"])))
    frame["family"] = [_family_of(task, kind, index)
                       for task, kind in zip(frame["task"], frame["task_kind"], strict=True)]
    frame["split"] = ["dev" if suite.endswith(DEV_SUFFIX) else "test" for suite in frame["suite"]]
    frame["tokens"] = frame["tokens"].astype("Int64")  # nullable: keeps "20000", not "20000.0"
    frame["value"] = frame["value"].astype(float)
    frame["stderr"] = frame["stderr"].astype(float)
    frame["_order"] = [_row_order(r.kind, r.method, r.hparams, r.langs) for r in frame.itertuples()]
    frame = frame.sort_values(["model", "_order", "langs", "tokens", "model_digest", "suite",
                               "task", "metric"], na_position="first", kind="stable")
    return frame.drop(columns="_order").reset_index(drop=True)


def family_metric(frame: pd.DataFrame, family: str) -> str:
    """The metric a family's tables report: the registry's, else acc, else the first."""
    metrics = sorted(set(frame.loc[frame["family"] == family, "metric"]))
    registered = load_families().get(family)
    if registered is not None and registered.metric in metrics:
        return registered.metric
    return "acc" if "acc" in metrics else metrics[0]


TRAIN_COLUMNS = ["tokens_budget", "tokens_trained", "steps", "wall_s", "tokens_per_s",
                 "input_tokens_per_s", "final_loss", "peak_rss_mb"]


def load_train_metrics(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Training metrics files, each with the digest from the ``recipe.json`` beside it."""
    rows = []
    for path in map(Path, paths):
        data = _read_object(path, "training metrics")
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
    return pd.DataFrame(rows, columns=["label", "langs", "tokens", "method", "model_digest",
                                       "scope", *DIAGNOSTIC_METRICS])


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
    """The full name of the row a model belongs to; several languages make a row of their own."""
    if kind == "merge":
        label = " ".join(part for part in (method, hparams) if part)
    else:
        label = KIND_LABELS[kind]
        if kind != "base" and kind != "sft" and (method or hparams):
            label += " " + " ".join(part for part in (method, hparams) if part)
    if len(langs) > 1:
        label += f" ({'+'.join(langs)})"
    return label


def short_labels(frame: pd.DataFrame) -> dict[str, str]:
    """Full row label -> a short one for tables and plots: the method's name, ``#k`` for the
    k-th point of a swept grid, ``multi`` for a multilingual merge (``legend_rows`` maps
    them back)."""
    rows = frame.drop_duplicates("label")[["label", "kind", "method", "hparams", "langs"]]
    grids: dict[tuple[str, bool], list[str]] = {}
    for row in rows.itertuples():
        if row.kind == "merge":
            multi = "+" in (row.langs or "")
            hparams = grids.setdefault((row.method, multi), [])
            if row.hparams not in hparams:
                hparams.append(row.hparams)
    short = {}
    for row in rows.itertuples():
        if row.kind != "merge":
            short[row.label] = row.label
            continue
        multi = "+" in (row.langs or "")
        name = METHOD_NAMES.get(row.method, row.method)
        variants = grids[(row.method, multi)]
        if len(variants) > 1:
            name += f" #{variants.index(row.hparams) + 1}"
        short[row.label] = name + (" multi" if multi else "")
    return short


def _row_order(kind: str, method: Any, hparams: Any, langs: str) -> tuple:
    multi = "+" in (langs or "")
    return (SUBJECT_KINDS.index(kind), multi, str(method or ""), str(hparams or ""))


def lower_is_better(metric: str) -> bool:
    return any(name in metric for name in LOWER_IS_BETTER)


def languages(frame: pd.DataFrame) -> list[str]:
    """Target languages: those models were adapted to, else the non-English suites scored."""
    langs = sorted({lang for value in frame["langs"] if value for lang in value.split("+")})
    if not langs:
        langs = sorted(s for s in set(frame["suite"]) - {ENGLISH} if not s.endswith(DEV_SUFFIX))
    return langs


def budgets(frame: pd.DataFrame) -> list[int]:
    return sorted(int(t) for t in frame["tokens"].dropna().unique())
