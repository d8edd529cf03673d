"""Load and validate the workflow configuration before any job runs.

Validation has two layers: the JSON schema (types, unknown keys, defaults, via
``snakemake.utils.validate``) and the rules that span keys (a language names a defined corpus,
a corpus file exists, a merge's parameters suit its method). Every error is one sentence that
names the config key at fault.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator

SCHEMA_PATH = Path(__file__).parent / "schemas" / "config.schema.yaml"
PROJECT_DIR = Path(__file__).resolve().parent.parent
OFFLINE_TASKS = ("topic", "bpb")


class ConfigError(ValueError):
    """A config value the workflow cannot run with; the message names the key."""


def _key_path(parts: Any) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<top level>"


def load_schema() -> dict[str, Any]:
    with open(SCHEMA_PATH, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def _schema_error(config: dict[str, Any]) -> str | None:
    """The most relevant schema violation as one sentence naming its key, or None."""
    validator = Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.path), str(e.path)))
    if not errors:
        return None
    error = errors[0]
    where = _key_path(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        key = f"{where}.{unknown[0]}" if where != "<top level>" and unknown else unknown[0]
        return f"config key '{key}' is not a known key{hint}"
    if error.validator == "required":
        return f"config key '{where}' is missing a required entry: {error.message}"
    return f"config key '{where}': {error.message}"


def resolve_path(path: str, workdir: Path) -> Path:
    """Relative paths resolve against the working directory, else the project directory."""
    candidate = Path(path)
    if candidate.is_absolute():
        return candidate
    for root in (workdir, PROJECT_DIR):
        if (root / candidate).exists():
            return (root / candidate).resolve()
    return (workdir / candidate).resolve()


def validate_config(config: dict[str, Any], workdir: str | Path = ".") -> dict[str, Any]:
    """Return a validated copy of ``config`` with defaults filled; raise ConfigError."""
    from snakemake.utils import validate as snakemake_validate

    config = copy.deepcopy(config)
    message = _schema_error(config)
    if message:
        raise ConfigError(message)
    snakemake_validate(config, str(SCHEMA_PATH), set_default=True)
    _check_cross_keys(config, Path(workdir))
    return config


def _check_cross_keys(config: dict[str, Any], workdir: Path) -> None:
    corpora = config["corpora"]

    def need_corpus(name: str, key: str) -> None:
        if name not in corpora:
            known = ", ".join(sorted(corpora))
            raise ConfigError(f"config key '{key}': corpus '{name}' is not defined (have: {known})")

    for name, corpus in corpora.items():
        path = resolve_path(corpus["path"], workdir)
        if not path.is_file():
            raise ConfigError(f"config key 'corpora.{name}.path': file not found: {path}")
    from workflow.plan import ENGLISH_SUITE, language_budgets, released_ct, suite_corpus_and_tasks

    for lang, spec in config["languages"].items():
        if "corpus" in spec:
            need_corpus(spec["corpus"], f"languages.{lang}.corpus")
            continue
        trained = [t for t in language_budgets(config, lang) if not released_ct(config, lang, t)]
        if trained:
            raise ConfigError(
                f"config key 'languages.{lang}.corpus': needed to train CT at budget "
                f"{trained[0]} (or give a released_ct entry with that many tokens)"
            )
    for suite in [*config["languages"], ENGLISH_SUITE]:
        corpus, tasks = suite_corpus_and_tasks(config, suite)
        if set(tasks) & set(OFFLINE_TASKS):
            key = "evaluation.english" if suite == ENGLISH_SUITE else f"languages.{suite}.corpus"
            if corpus is None:
                raise ConfigError(f"config key '{key}': the topic and bpb tasks need a corpus")
            need_corpus(corpus, key)

    model = config["model"]
    if model["source"] == "scratch":
        scratch = model["scratch"]
        for part in ("tokenizer", "pretrain"):
            for name in scratch[part]["mix"]:
                need_corpus(name, f"model.scratch.{part}.mix.{name}")
        arch = scratch["architecture"]
        if arch["hidden_size"] % arch["num_heads"]:
            raise ConfigError(
                "config key 'model.scratch.architecture.hidden_size': must be divisible by "
                f"num_heads ({arch['hidden_size']} % {arch['num_heads']} != 0)"
            )
    elif model["source"] == "hf" and "hf" not in model:
        raise ConfigError("config key 'model.hf': required when model.source is 'hf'")

    sft = config["sft"]
    if sft["source"] == "train":
        need_corpus(sft["corpus"], "sft.corpus")
    elif "hf" not in sft:
        raise ConfigError("config key 'sft.hf': required when sft.source is 'hf'")

    replay = config["ct"]["replay"]
    if replay:
        need_corpus(replay["corpus"], "ct.replay.corpus")
    train_schema = Draft202012Validator(load_schema()["$defs"]["train"])
    for lang, spec in config["languages"].items():
        merged = {**config["ct"]["train"], **spec.get("ct_train", {})}
        for error in train_schema.iter_errors(merged):
            where = ".".join(str(part) for part in error.absolute_path)
            raise ConfigError(f"config key 'languages.{lang}.ct_train.{where}': {error.message}")
    for section, train in _train_sections(config):
        if train["min_lr"] > train["lr"]:
            raise ConfigError(f"config key '{section}.min_lr': must not exceed lr ({train['lr']})")

    from workflow.plan import merge_variants

    for index, entry in enumerate(config["merges"]):
        try:
            merge_variants(entry)
        except ValueError as error:
            raise ConfigError(f"config key 'merges[{index}]': {error}") from None


def _train_sections(config: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    sections = [("ct.train", config["ct"]["train"]), ("sft.train", config["sft"]["train"])]
    for lang, spec in config["languages"].items():
        if "ct_train" in spec:
            sections.append(
                (f"languages.{lang}.ct_train", {**config["ct"]["train"], **spec["ct_train"]})
            )
    if config["model"]["source"] == "scratch":
        sections.append(
            ("model.scratch.pretrain.train", config["model"]["scratch"]["pretrain"]["train"])
        )
    return sections


def load_config_file(path: str | Path, workdir: str | Path = ".") -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return validate_config(yaml.safe_load(handle) or {}, workdir)
