"""Evaluate one model on per-language suites of lm-eval tasks, in one job (one model load).

A suite is a language's eval-data directory from the ``evalset`` stage (``topic.jsonl`` with
``{"text", "prompt", "label", "topic"}`` lines, ``heldout.jsonl`` with ``{"text"}`` lines,
recipe.json).
Task names in the recipe:

- ``topic``: the project's offline cross-lingual topic classification, lm-eval task
  ``lrm_topic_<suite>`` (multiple choice over the English labels; acc, acc_norm);
- ``bpb``: bits per byte on the held-out text, lm-eval task ``lrm_bpb_<suite>``
  (loglikelihood_rolling; word_perplexity, byte_perplexity, bits_per_byte);
- anything else: a task or group of lm-eval's own registry (e.g. ``belebele_eus_Latn``), which
  needs its data set on the hub or in the local HF cache.

The offline tasks are written as small YAML variants of the templates in ``workflow/tasks/``
into a task directory of the process (one per set of tasks, removed at exit); the HF datasets
cache of the job goes to a scratch directory beside the output, removed afterwards.

Chat template (``params.chat_template``: true, false or "auto"): lm-eval's own
``apply_chat_template`` option, so an instruct model is asked in the format it was tuned on
(each prompt a user turn, the answer the assistant's; with ``fewshot_as_multiturn`` the
few-shot examples are earlier turns). "auto" applies it when the model's tokenizer carries a
template; true requires one. The score file records whether it was applied and the template's
sha256 under ``chat_template``.

Fixed cost: a fresh interpreter's time goes to importing torch, transformers and lm-eval, not
to scoring, so a CPU evaluation job runs in a warm worker of its Snakemake run that imported
them once (workflow/eval_worker/, started by workflow.launch; else in the launcher's own
process). Nothing heavy is imported at module level; a process that evaluates several models
(a worker, or :func:`evaluate` called in turn) builds each set of tasks once
(:func:`make_task_manager` caches lm-eval's TaskManager, whose registry index costs ~10 s).

    python -m workflow.evaluate --recipe '<json>' --model DIR --suite eu=DIR [--suite en=DIR]
        --out scores.json [--threads N]
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from workflow.artifacts import (
    RECIPE_FILE,
    canonical_json,
    digest_of,
    parse_named_paths,
    parse_recipe_arg,
    read_json,
    write_json,
)
from workflow.corpus import iter_jsonl
from workflow.prompts import LABELS, topic_prompt

log = logging.getLogger(__name__)

# Bump when a change here changes what a stage writes (see workflow/stages.py).
STAGE_VERSIONS = {"evaluate": "2"}  # 2: per-item results ("items"); chat template
STAGE = "evaluate"
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
# Offline task kind -> (template in TASKS_DIR, data file in the suite directory).
OFFLINE_TASKS: dict[str, tuple[str, str]] = {
    "topic": ("_lrm_topic.yaml", "topic.jsonl"),
    "bpb": ("_lrm_bpb.yaml", "heldout.jsonl"),
}
PARAM_KEYS = ("limit", "batch_size", "num_fewshot", "max_length", "dtype", "chat_template",
              "fewshot_as_multiturn")
DTYPES = ("float32", "bfloat16", "float16")
CHAT_TEMPLATE_VALUES = (True, False, "auto")
SUITE_NAME = re.compile(r"^[A-Za-z0-9_]+$")
SEED = 1234


class EvaluateError(ValueError):
    """Bad recipe, arguments or eval data; the message names the key, file or value at fault."""


@dataclass(frozen=True)
class PlannedTask:
    """One lm-eval task (or registry group) to run for one suite."""

    suite: str
    name: str  # the lm-eval task name
    kind: str  # "topic" / "bpb" for ours, the registry name otherwise
    data_file: Path | None = None  # offline tasks only


def offline_task_name(kind: str, suite: str) -> str:
    return f"lrm_{kind}_{suite}"


# ----------------------------------------------------------------------------- validation


def _check_int(value: Any, key: str, minimum: int, nullable: bool) -> None:
    if value is None and nullable:
        return
    # bool is an int subclass; true/false in a recipe is a mistake, not a number.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "an integer" + (" or null" if nullable else "")
        raise EvaluateError(f"recipe params.{key} must be {kind} >= {minimum}, got {value!r}")


def validate_recipe(recipe: dict[str, Any]) -> None:
    """Check the recipe's shape up front, so a typo fails before a model is loaded."""
    if recipe.get("stage") != STAGE:
        raise EvaluateError(f"recipe stage must be {STAGE!r}, got {recipe.get('stage')!r}")
    for key in ("version", "model", "subject", "suites", "params"):
        if key not in recipe:
            raise EvaluateError(f"recipe is missing key {key!r}")
    suites = recipe["suites"]
    if not isinstance(suites, dict) or not suites:
        raise EvaluateError("recipe suites must be a non-empty object {suite: {tasks, data}}")
    for suite, spec in suites.items():
        if not SUITE_NAME.match(suite):
            raise EvaluateError(f"recipe suite name {suite!r} must match {SUITE_NAME.pattern}")
        if not isinstance(spec, dict) or "tasks" not in spec:
            raise EvaluateError(f"recipe suites.{suite} must be an object with a 'tasks' list")
        tasks = spec["tasks"]
        if not isinstance(tasks, list) or not tasks or not all(
            isinstance(t, str) and t for t in tasks
        ):
            raise EvaluateError(f"recipe suites.{suite}.tasks must be a non-empty list of names")
        if len(set(tasks)) != len(tasks):
            raise EvaluateError(f"recipe suites.{suite}.tasks has duplicates: {tasks}")
    params = recipe["params"]
    if not isinstance(params, dict):
        raise EvaluateError("recipe params must be an object")
    unknown = sorted(set(params) - set(PARAM_KEYS))
    if unknown:
        raise EvaluateError(f"recipe params has unknown keys {unknown}; known: {PARAM_KEYS}")
    missing = [key for key in PARAM_KEYS if key not in params]
    if missing:
        raise EvaluateError(f"recipe params is missing keys {missing}")
    _check_int(params["limit"], "limit", 1, nullable=True)
    _check_int(params["batch_size"], "batch_size", 1, nullable=False)
    _check_int(params["num_fewshot"], "num_fewshot", 0, nullable=False)
    _check_int(params["max_length"], "max_length", 1, nullable=True)
    if params["dtype"] not in DTYPES:
        raise EvaluateError(f"recipe params.dtype must be one of {DTYPES}, got {params['dtype']!r}")
    # `1 in (True, ...)` holds in Python: compare types too, so only true/false/"auto" pass.
    chat = params["chat_template"]
    if not any(chat == v and type(chat) is type(v) for v in CHAT_TEMPLATE_VALUES):
        raise EvaluateError(
            f"recipe params.chat_template must be true, false or \"auto\", got {chat!r}"
        )
    if not isinstance(params["fewshot_as_multiturn"], bool):
        raise EvaluateError(
            "recipe params.fewshot_as_multiturn must be true or false, "
            f"got {params['fewshot_as_multiturn']!r}"
        )


def _check_digest(directory: Path, expected: Any, what: str) -> None:
    """The recipe names its inputs by digest; a directory whose recipe.json disagrees is the
    wrong artifact (a wiring bug), so refuse it rather than score the wrong thing."""
    recipe_file = directory / RECIPE_FILE
    if expected is None or not recipe_file.is_file():
        return
    found = read_json(recipe_file).get("digest")
    if found is not None and found != expected:
        raise EvaluateError(
            f"{what} {directory} has digest {found!r} in {recipe_file.name}, "
            f"but the recipe expects {expected!r}"
        )


def _check_records(path: Path, kind: str) -> int:
    """Validate an eval JSONL file line by line; return its record count."""
    count = 0
    for number, record in iter_jsonl(path, EvaluateError):
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise EvaluateError(f"{path}:{number}: 'text' must be a non-empty string")
        if kind == "topic":
            label = record.get("label")
            if isinstance(label, bool) or not isinstance(label, int) or not (
                0 <= label < len(LABELS)
            ):
                raise EvaluateError(
                    f"{path}:{number}: 'label' must be an integer in [0, {len(LABELS)}), "
                    f"got {label!r}"
                )
            # The task reads the prompt as a field (no Jinja per document); an older evalset
            # without it would be scored on the literal word "prompt".
            if record.get("prompt") != topic_prompt(text):
                raise EvaluateError(
                    f"{path}:{number}: 'prompt' must be workflow.prompts.topic_prompt(text), "
                    f"got {record.get('prompt')!r} (an evalset from before evalset version 3?)"
                )
        count += 1
    if count == 0:
        raise EvaluateError(f"{path} holds no records")
    return count


def plan_tasks(recipe: dict[str, Any], suite_dirs: dict[str, Path]) -> list[PlannedTask]:
    """Match --suite directories to recipe suites and check every input file exists."""
    suites = recipe["suites"]
    unknown = sorted(set(suite_dirs) - set(suites))
    if unknown:
        raise EvaluateError(f"--suite {unknown} not in the recipe's suites {sorted(suites)}")
    # Suites of lm-eval registry tasks only bring their own data.
    needs_data = {s for s, spec in suites.items() if set(spec["tasks"]) & set(OFFLINE_TASKS)}
    missing = sorted(needs_data - set(suite_dirs))
    if missing:
        raise EvaluateError(f"recipe suites {missing} have no --suite NAME=DIR argument")
    planned: list[PlannedTask] = []
    for suite, spec in suites.items():
        directory = suite_dirs.get(suite)
        if directory is not None:
            if not directory.is_dir():
                raise EvaluateError(
                    f"suite {suite}: eval data directory {directory} does not exist"
                )
            _check_digest(directory, spec.get("data"), f"suite {suite}: eval data")
        for task in spec["tasks"]:
            if task not in OFFLINE_TASKS:
                planned.append(PlannedTask(suite, task, task))
                continue
            data_file = directory / OFFLINE_TASKS[task][1]
            if not data_file.is_file():
                raise EvaluateError(
                    f"suite {suite}: task {task!r} needs {data_file}, which does not exist"
                )
            _check_records(data_file, task)
            planned.append(
                PlannedTask(suite, offline_task_name(task, suite), task, data_file.resolve())
            )
    return planned


def check_model_dir(model_dir: Path, expected_digest: Any) -> None:
    for name in ("config.json", "model.safetensors"):
        if not (model_dir / name).is_file():
            # Sharded checkpoints carry an index instead of one file.
            if name == "model.safetensors" and (model_dir / f"{name}.index.json").is_file():
                continue
            raise EvaluateError(f"model directory {model_dir} lacks {name}")
    _check_digest(model_dir, expected_digest, "model")


# ----------------------------------------------------------------------------- lm-eval tasks


def write_task_yamls(planned: list[PlannedTask], dest: Path) -> None:
    """Write one lm-eval YAML per offline task: an ``include:`` of the template plus the task
    name and the suite's data file, the way lm-eval's per-language variants are written."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, text in task_yamls(planned).items():
        (dest / name).write_text(text, encoding="utf-8")


def task_yamls(planned: list[PlannedTask]) -> dict[str, str]:
    """File name -> YAML text of each offline task (see :func:`write_task_yamls`)."""
    template_labels = yaml.safe_load((TASKS_DIR / "_lrm_topic.yaml").read_text("utf-8"))[
        "doc_to_choice"
    ]
    if template_labels != LABELS:
        raise EvaluateError(
            f"{TASKS_DIR / '_lrm_topic.yaml'} doc_to_choice {template_labels} differs from "
            f"workflow.prompts.LABELS {LABELS}"
        )
    texts = {}
    for task in planned:
        if task.data_file is None:
            continue
        variant = {
            "include": str(TASKS_DIR / OFFLINE_TASKS[task.kind][0]),
            "task": task.name,
            "dataset_kwargs": {"data_files": {"test": str(task.data_file)}},
        }
        texts[f"{task.name}.yaml"] = yaml.safe_dump(variant, sort_keys=False, allow_unicode=True)
    return texts


_task_root: Path | None = None  # this process's task directories, removed at exit


def _remove_orphaned_task_roots() -> None:
    """Remove the task directories of processes that are gone without their exit hooks (a
    SIGKILLed evaluation or worker): named lrmerge-tasks-PID-…, their PID no longer running."""
    for root in Path(tempfile.gettempdir()).glob("lrmerge-tasks-*-*"):
        pid = root.name.removeprefix("lrmerge-tasks-").split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(root, ignore_errors=True)
        except PermissionError:  # another user's process: alive, and not ours to tidy
            continue


def process_task_dir(planned: list[PlannedTask]) -> Path:
    """The directory of ``planned``'s offline task YAMLs in this process, named by their
    content: evaluations of the same tasks share it, and so the TaskManager built over it."""
    global _task_root
    texts = task_yamls(planned)
    if _task_root is None:
        _remove_orphaned_task_roots()
        _task_root = Path(tempfile.mkdtemp(prefix=f"lrmerge-tasks-{os.getpid()}-"))
        atexit.register(shutil.rmtree, _task_root, True)
    dest = _task_root / hashlib.sha256(canonical_json(texts).encode()).hexdigest()[:16]
    if not dest.is_dir():
        staging = Path(tempfile.mkdtemp(dir=_task_root))
        write_task_yamls(planned, staging)
        staging.rename(dest)
    return dest


@functools.cache
def make_task_manager(task_dir: Path, with_registry: bool) -> Any:
    """lm-eval's TaskManager over ``task_dir``, built once per process and arguments (the
    YAMLs in ``task_dir`` must not change: :func:`process_task_dir` names them by content)."""
    from lm_eval.tasks import TaskManager

    # Indexing lm-eval's built-in tasks costs ~10 s; only pay it when a registry task is asked.
    return TaskManager(include_path=str(task_dir), include_defaults=with_registry)


def load_tokenizer(model_dir: Path) -> Any:
    """The model's tokenizer, loaded as lm-eval's HFLM loads it (fast, no remote code)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), revision="main",
                                         trust_remote_code=False, use_fast=True)


def resolve_chat_template(setting: bool | str, tokenizer: Any, where: str) -> str | None:
    """The chat template to apply under ``params.chat_template`` (None: none), as the text
    recorded in the score. "auto" applies the tokenizer's template when it has one."""
    template = getattr(tokenizer, "chat_template", None)
    if setting is False:
        return None
    if not template:
        if setting is True:
            raise EvaluateError(
                f"recipe params.chat_template is true but {where} has no chat template "
                "(its tokenizer's chat_template is unset); set the model role's "
                "evaluation.chat_template to auto or false"
            )
        return None
    # A tokenizer may carry several named templates; lm-eval applies the "default" one.
    return template if isinstance(template, str) else json.dumps(template, sort_keys=True)


@contextlib.contextmanager
def _without_env_report() -> Iterator[None]:
    """simple_evaluate ends with add_env_info: torch's collect_env, which runs ``pip list``
    and other commands (~1 s of a job's CPU time) for a report this stage does not keep."""
    import lm_eval.evaluator

    saved = getattr(lm_eval.evaluator, "add_env_info", None)
    if saved is None:  # a later lm-eval without it: nothing to skip
        yield
        return
    lm_eval.evaluator.add_env_info = lambda storage: None
    try:
        yield
    finally:
        lm_eval.evaluator.add_env_info = saved


@contextlib.contextmanager
def isolated_caches(scratch: Path, offline: bool) -> Iterator[None]:
    """Point the HF caches into the job's scratch directory (unless the user chose one).

    Must be entered before ``datasets`` / ``huggingface_hub`` are imported: they read these
    variables at import time. In a process that evaluates again, ``datasets`` is imported
    already: its cache directory is then repointed directly (else this job's cache would go to
    the first job's scratch directory, removed since). Registry tasks keep the user's HF_HOME:
    their data sets are downloaded once into it (and gated ones need the token stored there).
    """
    wanted = {"HF_DATASETS_CACHE": str(scratch / "hf" / "datasets")}
    if offline:
        wanted |= {
            "HF_HOME": str(scratch / "hf"),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
        }
    saved = {key: os.environ.get(key) for key in wanted}
    for key, value in wanted.items():
        if key.endswith("OFFLINE") or key not in os.environ:
            os.environ[key] = value
    datasets_config = None
    if "datasets" in sys.modules and saved["HF_DATASETS_CACHE"] is None:
        import datasets.config as datasets_config

        saved_cache = datasets_config.HF_DATASETS_CACHE
        datasets_config.HF_DATASETS_CACHE = Path(wanted["HF_DATASETS_CACHE"])
    try:
        yield
    finally:
        if datasets_config is not None:
            datasets_config.HF_DATASETS_CACHE = saved_cache
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ----------------------------------------------------------------------------- results


def _number(value: Any) -> float | None:
    """lm-eval reports a missing stderr as "N/A"; JSON has no NaN, so both become null."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _descendants(name: str, children: dict[str, list[str]]) -> list[str]:
    out = [name]
    for child in children.get(name, []):
        out += _descendants(child, children)
    return out


def collect_results(
    raw: dict[str, Any], planned: list[PlannedTask], tags: dict[str, list[str]] | None = None
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Flatten lm-eval's nested results into one row per (suite, task, metric).

    A registry group reports itself (if it aggregates) and its subtasks; a tag (``tags``: tag ->
    member tasks) reports only its members. Both are listed under the requested name's kind.
    """
    results = raw["results"]
    children = {**raw.get("group_subtasks", {}), **(tags or {})}
    rows: list[dict[str, Any]] = []
    for task in planned:
        before = len(rows)
        for name in _descendants(task.name, children):
            if name not in results:
                continue  # a group without aggregate metrics reports only its subtasks
            metrics = results[name]
            for key, value in metrics.items():
                # Metric keys read "metric,filter"; the rest (alias, name, sample_len) is
                # bookkeeping, and stderr values ride along with their metric.
                metric, comma, filter_name = key.partition(",")
                if not comma or metric.endswith("_stderr"):
                    continue
                stderr = metrics.get(f"{metric}_stderr,{filter_name}")
                # Generative tasks may carry several filters; "none" is the common default.
                label = metric if filter_name == "none" else f"{metric},{filter_name}"
                value_f = _number(value)
                if value_f is None:
                    log.warning("task %s metric %s has non-finite value %r", name, key, value)
                rows.append(
                    {
                        "suite": task.suite,
                        "task": name,
                        "kind": task.kind,
                        "metric": label,
                        "value": value_f,
                        "stderr": _number(stderr),
                    }
                )
        if len(rows) == before:
            log.warning("suite %s: task %s reported no metrics", task.suite, task.name)
    n_samples = {
        name: int(counts["effective"]) for name, counts in raw.get("n-samples", {}).items()
    }
    return rows, n_samples


def collect_items(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-item results of every task (lm-eval's ``log_samples``), for paired bootstraps in
    the report: per task, in doc order, ``doc_id``, ``gold`` (the target: an index for
    multiple choice), ``n_choices`` (null unless multiple choice) and each metric's per-item
    value (a number, or ``[loglikelihood, units]`` for the perplexity metrics)."""
    items: dict[str, dict[str, Any]] = {}
    for name, samples in (raw.get("samples") or {}).items():
        if not samples:
            continue
        first_filter = samples[0].get("filter")
        kept = sorted((s for s in samples if s.get("filter") == first_filter),
                      key=lambda s: s["doc_id"])
        metrics: dict[str, list[Any]] = {}
        for metric in kept[0].get("metrics", []):
            values = [s.get(metric) for s in kept]
            if all(_number(v) is not None for v in values):
                metrics[metric] = [float(v) for v in values]
            elif all(isinstance(v, (list, tuple)) and len(v) == 2 for v in values):
                metrics[metric] = [[float(a), float(b)] for a, b in values]
        multiple_choice = all(
            isinstance(s.get("target"), int) and len(s.get("arguments", [])) > 1 for s in kept
        )
        items[name] = {
            "doc_id": [int(s["doc_id"]) for s in kept],
            "gold": [s["target"] if multiple_choice else None for s in kept],
            "n_choices": [len(s["arguments"]) if multiple_choice else None for s in kept],
            "metrics": metrics,
        }
    return items


# ----------------------------------------------------------------------------- entry points


@dataclass(frozen=True)
class MergeOnLoad:
    """Build the model in memory from a merge recipe and its inputs; no checkpoint is read."""

    base: Path
    models: list[Path]
    allow_nonfinite: bool = False  # integrity.allow_nonfinite: merge NaN/Inf inputs anyway


def evaluate(
    recipe: dict[str, Any],
    model: str | Path | MergeOnLoad,
    suite_dirs: dict[str, Path],
    out: str | Path,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run every suite's tasks on one model and write the score file ``out`` atomically.

    ``model`` is a model directory, or a :class:`MergeOnLoad` when ``recipe["merge"]`` holds
    the merge recipe of a merged model that was not materialized.
    """
    start = time.monotonic()
    validate_recipe(recipe)
    out = Path(out)
    if isinstance(model, MergeOnLoad):
        if "merge" not in recipe:
            raise EvaluateError("merge-on-load needs the merge recipe under recipe['merge']")
        for directory in [model.base, *model.models]:
            check_model_dir(directory, None)
    else:
        model = Path(model)
        check_model_dir(model, recipe["model"])
    planned = plan_tasks(recipe, suite_dirs)
    with_registry = any(task.data_file is None for task in planned)
    params = recipe["params"]

    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.scratch-", dir=out.parent))
    try:
        task_dir = process_task_dir(planned)
        with isolated_caches(scratch, offline=not with_registry):
            raw, tags, version, template = _run_lm_eval(
                recipe, model, planned, task_dir, with_registry, params, threads
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    rows, n_samples = collect_results(raw, planned, tags)
    score = {
        "digest": digest_of(recipe),
        "recipe": recipe,
        "subject": recipe["subject"],
        "results": rows,
        "n_samples": n_samples,
        "items": collect_items(raw),
        "chat_template": {
            "applied": template is not None,
            "sha256": None if template is None else hashlib.sha256(template.encode()).hexdigest(),
        },
        "lm_eval_version": version,
        "wall_s": round(time.monotonic() - start, 3),
    }
    write_json(out, score)
    log.info("wrote %d scores to %s in %.1f s", len(rows), out, score["wall_s"])
    return score


def _run_lm_eval(
    recipe: dict[str, Any],
    model: Path | MergeOnLoad,
    planned: list[PlannedTask],
    task_dir: Path,
    with_registry: bool,
    params: dict[str, Any],
    threads: int | None,
) -> tuple[dict[str, Any], dict[str, list[str]], str, str | None]:
    """Returns lm-eval's results, the member tasks of each requested tag, its version and the
    chat template applied (None: none)."""
    # Imported here, after the cache variables are set: datasets reads them at import time.
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    if threads:
        torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    task_manager = make_task_manager(task_dir, with_registry)
    names = list(dict.fromkeys(task.name for task in planned))  # a registry task once
    # Fail before the model load, naming the suite: lm-eval's own error comes later and vaguer.
    for task in planned:
        if task.name not in task_manager.all_tasks:
            raise EvaluateError(
                f"suite {task.suite}: task {task.name!r} is neither 'topic', 'bpb' nor a task, "
                "group or tag of lm-eval's registry"
            )
    index = task_manager.task_index
    tags = {
        name: sorted(index[name].tags) for name in names if index[name].kind.name == "TAG"
    }
    if isinstance(model, MergeOnLoad):
        from workflow.merge.engine import load_merged_model

        merged, tokenizer = load_merged_model(recipe["merge"], model.base, model.models,
                                              device=device, dtype=params["dtype"],
                                              allow_nonfinite=model.allow_nonfinite)
        # The merged model takes its tokenizer (and template) from its task (SFT) model.
        template = resolve_chat_template(params["chat_template"], tokenizer, "the merged model")
        lm = HFLM(pretrained=merged, tokenizer=tokenizer, batch_size=params["batch_size"],
                  max_length=params["max_length"])
    else:
        # The tokenizer first, so a missing chat template fails before the model load.
        tokenizer = load_tokenizer(model)
        template = resolve_chat_template(params["chat_template"], tokenizer, f"model {model}")
        lm = HFLM(
            pretrained=str(model),
            tokenizer=tokenizer,
            batch_size=params["batch_size"],
            device=device,
            dtype=params["dtype"],
            trust_remote_code=False,
            max_length=params["max_length"],
        )
    log.info("evaluating %s on %s: %s (chat template: %s)", model, device, names,
             "applied" if template is not None else "none")
    with _without_env_report():
        raw = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            task_manager=task_manager,
            limit=params["limit"],
            num_fewshot=params["num_fewshot"],
            log_samples=True,  # per-item results: the report's paired bootstrap
            apply_chat_template=template is not None,
            fewshot_as_multiturn=template is not None and params["fewshot_as_multiturn"],
            random_seed=SEED,
            numpy_random_seed=SEED,
            torch_random_seed=SEED,
            fewshot_random_seed=SEED,
        )
    if raw is None:
        raise RuntimeError("lm_eval.simple_evaluate returned no results (not rank 0?)")
    return raw, tags, getattr(lm_eval, "__version__", "unknown"), template


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workflow.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="the score file's recipe (JSON)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", type=Path, help="HF-format model directory")
    which.add_argument("--merge-base", type=Path,
                       help="merge-on-load: the base model of recipe['merge']")
    parser.add_argument("--merge-models", nargs="+", type=Path, default=[],
                        help="merge-on-load: the merged models, in recipe['merge'] order")
    parser.add_argument("--suite", action="append", default=[], metavar="NAME=DIR",
                        help="a suite's eval data directory (repeatable; registry-only suites "
                        "need none)")
    parser.add_argument("--out", required=True, type=Path, help="score file to write (JSON)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="merge-on-load: merge NaN/Inf inputs instead of refusing them "
                        "(config: integrity.allow_nonfinite)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        recipe = parse_recipe_arg(args.recipe)
    except ValueError as error:
        parser.exit(2, f"evaluate: error: bad --recipe: {error}\n")
    try:
        model = args.model or MergeOnLoad(args.merge_base, args.merge_models,
                                          args.allow_nonfinite)
        suites = parse_named_paths(args.suite, "--suite")
    except ValueError as error:
        parser.exit(2, f"evaluate: error: {error}\n")
    try:
        evaluate(recipe, model, suites, args.out, args.threads)
    except EvaluateError as error:
        parser.exit(2, f"evaluate: error: {error}\n")


if __name__ == "__main__":
    main()
