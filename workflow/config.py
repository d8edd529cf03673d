"""Load and validate the workflow configuration before any job runs.

Reading is strict: a duplicate key or a YAML syntax error names the file and line (Snakemake's
own loader keeps the last duplicate silently and reports no line), and ``--config`` values
that Snakemake leaves as strings inside lists and mappings are typed as YAML would type them.

Validation has two layers: the JSON schema (types, unknown keys, defaults) and the rules that
span keys (a language names a defined corpus, a corpus file exists, a local model directory
holds safetensors, a merge's parameters suit its method). The schema is the one source of
defaults: stages validate their recipes against the same fragments (:func:`validate_fragment`),
and the merge parameters in it come from the merge method registry. Every error is one sentence
that names the config key (or file and line) at fault.

    python -m workflow.config FILE [FILE ...]   check config files as the workflow would
"""

from __future__ import annotations

import copy
import functools
import json
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError

SCHEMA_PATH = Path(__file__).parent / "schemas" / "config.schema.yaml"
PROJECT_DIR = Path(__file__).resolve().parent.parent
OFFLINE_TASKS = ("topic", "bpb")
# Keys of a merges entry that are not merge parameters.
MERGE_ENTRY_KEYS = ("method", "models", "single", "multilingual")
# Files that make a local directory loadable as a model by the import stage.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ConfigError(ValueError):
    """A config value the workflow cannot run with; the message names the key."""


# --------------------------------------------------------------------------------------------
# Strict YAML
# --------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2's scalars: only true/false are booleans (a language code
    ``no`` stays a string) and ``1e-5`` is a float (YAML 1.1 wants ``1.0e-5``)."""


_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _key_path(parts: Any) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<top level>"


def _duplicate_keys(node: yaml.Node, path: list[Any], where: str) -> None:
    """Raise ConfigError at the first mapping key given twice (YAML would keep the last)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                line = key.start_mark.line + 1
                if key.value in seen:
                    raise ConfigError(
                        f"{where}:{line}: duplicate key '{_key_path([*path, key.value])}' "
                        f"(first given at line {seen[key.value]}); YAML would silently keep "
                        "only the last one"
                    )
                seen[key.value] = line
                _duplicate_keys(value, [*path, key.value], where)
            else:
                _duplicate_keys(value, path, where)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _duplicate_keys(item, [*path, index], where)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config file's mapping, read strictly (no validation): duplicate keys, YAML syntax
    errors and a non-mapping top level raise ConfigError naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8 ({exc.reason})") from None
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}
        _duplicate_keys(node, [], str(path))
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark else ""
        problem = exc.problem or "syntax error"
        if exc.context and exc.context_mark:
            problem += f", {exc.context} started at line {exc.context_mark.line + 1}"
        raise ConfigError(f"{path}{line}: not valid YAML ({problem})") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys")
    if data.get("__use_yte__"):
        # A YTE template: Snakemake renders it; duplicates were checked above on its source.
        from snakemake.common.configfile import load_configfile

        return load_configfile(str(path))
    return data


def _typed_scalar(text: str) -> Any:
    """``text`` typed as a plain YAML scalar would be (number, bool, null), else unchanged."""
    loader = _StrictLoader("")
    try:
        tag = loader.resolve(yaml.ScalarNode, text, (True, False))
        if tag == "tag:yaml.org,2002:str":
            return text
        return loader.construct_object(yaml.ScalarNode(tag, text))
    finally:
        loader.dispose()


def typed_overrides(overrides: Any) -> Any:
    """``--config`` values typed as YAML types them: Snakemake's parse_config reads a list or
    mapping value with YAML's BaseLoader, which leaves every number and bool in it a string
    (``budgets=[1000,2000]`` gives ``['1000', '2000']``). Quoting is lost by then, so a quoted
    number inside a list becomes a number too."""
    if isinstance(overrides, Mapping):
        return {key: typed_overrides(value) for key, value in overrides.items()}
    if isinstance(overrides, list | tuple):
        return [typed_overrides(value) for value in overrides]
    if isinstance(overrides, str):
        return _typed_scalar(overrides)
    return overrides


def _merge_into(config: dict[str, Any], update: Mapping[str, Any]) -> None:
    """Snakemake's update_config: mappings merge key by key, anything else replaces."""
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(config.get(key), dict):
            _merge_into(config[key], value)
        else:
            config[key] = copy.deepcopy(dict(value) if isinstance(value, Mapping) else value)


def load_workflow_config(
    configfiles: Sequence[str | Path], overrides: Mapping[str, Any], workdir: str | Path = "."
) -> dict[str, Any]:
    """The run's validated config as Snakemake composes it: the config files in order, each
    merged into the last, then the ``--config`` overrides; but read strictly and typed."""
    config: dict[str, Any] = {}
    for path in configfiles:
        _merge_into(config, read_config_file(path))
    _merge_into(config, typed_overrides(dict(overrides)))
    return validate_config(config, workdir)


def load_config_file(path: str | Path, workdir: str | Path = ".") -> dict[str, Any]:
    """One config file, read strictly and validated with defaults filled."""
    return validate_config(read_config_file(path), workdir)


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


def _merge_param_properties() -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Schema properties of every global and per-model merge parameter in the registry, and the
    method names: the config accepts exactly what some method accepts."""
    from workflow.merge.methods import MERGE_METHODS, REQUIRED

    kinds = {bool: {"$ref": "#/$defs/bool_or_grid"}, float: {"$ref": "#/$defs/number_or_grid"},
             int: {"type": "integer"}}
    tables: tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]] = ({}, {})
    for method in MERGE_METHODS.values():
        for table, specs in zip(tables, (method.params, method.model_params), strict=True):
            for spec in specs:
                entry = table.setdefault(spec.name, {"kind": spec.kind, "methods": []})
                if entry["kind"] is not spec.kind:
                    raise TypeError(f"merge parameter {spec.name!r} has two kinds in the registry")
                default = "required" if spec.default is REQUIRED else json.dumps(spec.default)
                entry["methods"].append(f"{method.name} ({default})")
    properties = []
    for table in tables:
        properties.append({
            name: {**kinds[entry["kind"]],
                   "description": "Used by (default): " + ", ".join(entry["methods"]) + "."}
            for name, entry in sorted(table.items())
        })
    clash = set(properties[0]) & set(MERGE_ENTRY_KEYS)
    if clash:
        raise TypeError(f"merge parameter(s) {sorted(clash)} clash with merges entry keys")
    return properties[0], properties[1], sorted(MERGE_METHODS)


@functools.cache
def _schema() -> dict[str, Any]:
    with open(SCHEMA_PATH, encoding="utf-8") as handle:
        schema = yaml.safe_load(handle)
    global_params, model_params, methods = _merge_param_properties()
    entry = schema["properties"]["merges"]["items"]["properties"]
    entry.update(global_params)
    entry["method"]["enum"] = methods
    schema["$defs"]["per_model_params"]["properties"] = model_params
    Draft202012Validator.check_schema(schema)
    return schema


def load_schema() -> dict[str, Any]:
    """The config schema with the merge registry's parameters filled in (a copy: mutate
    freely)."""
    return copy.deepcopy(_schema())


def _fragment_schema(name: str | None) -> dict[str, Any]:
    schema = _schema()
    if name is None:
        return schema
    if name not in schema["$defs"]:
        raise KeyError(f"the config schema has no fragment $defs/{name}")
    return {**schema["$defs"][name], "$defs": schema["$defs"]}


def _fill_defaults(validator, props, instance, schema):  # noqa: ANN001 (jsonschema hook)
    """The ``properties`` keyword that also fills each missing key's default (a copy)."""
    if isinstance(instance, dict):
        for key, sub in props.items():
            if isinstance(sub, dict) and "default" in sub and key not in instance:
                instance[key] = copy.deepcopy(sub["default"])
    yield from Draft202012Validator.VALIDATORS["properties"](validator, props, instance, schema)


_DefaultFilling = validators.extend(Draft202012Validator, {"properties": _fill_defaults})


@functools.cache
def _validators(name: str | None) -> tuple[Draft202012Validator, Draft202012Validator]:
    """(checking, default-filling) validators of the whole schema or one $defs fragment."""
    schema = _fragment_schema(name)
    return Draft202012Validator(schema), _DefaultFilling(schema)


def _innermost(error: ValidationError) -> ValidationError:
    """For a oneOf/anyOf failure, the failure inside the alternative the value was meant for
    (the one whose type it has), so the message names the deepest key: ``lora.dropout``
    rather than ``lora``."""
    while error.validator in ("oneOf", "anyOf") and error.context:
        branches: dict[Any, list[ValidationError]] = {}
        for sub in error.context:
            branches.setdefault(sub.relative_schema_path[0], []).append(sub)
        meant = [
            subs for subs in branches.values()
            if not any(s.validator in ("type", "const", "enum") and not s.relative_path
                       for s in subs)
        ]
        if len(meant) != 1:
            break
        error = max(meant[0], key=lambda sub: len(sub.relative_path))
    return error


def _describe(error: ValidationError, prefix: Sequence[Any] = ()) -> str:
    """A schema violation as ``'key' is ...`` or ``'key': message``, for one sentence."""
    error = _innermost(error)
    parts = [*prefix, *error.absolute_path]
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        return f"'{_key_path([*parts, *unknown[:1]])}' is not a known key{hint}"
    if error.validator == "required":
        missing = [key for key in error.validator_value if key not in error.instance]
        return f"'{_key_path([*parts, *missing[:1]])}' is required"
    if error.validator in ("oneOf", "anyOf") and error.schema.get("description"):
        return (f"'{_key_path(parts)}': {error.instance!r} is not valid here "
                f"({error.schema['description'].rstrip('.')})")
    return f"'{_key_path(parts)}': {error.message}"


def _first_error(name: str | None, value: Any) -> ValidationError | None:
    checking, _ = _validators(name)
    errors = sorted(checking.iter_errors(value), key=lambda e: (len(e.path), str(e.path)))
    return errors[0] if errors else None


def _check_train(train: dict[str, Any]) -> tuple[str, str] | None:
    """Rules of a train fragment that span its keys: (key, message) of the first broken one."""
    if train["min_lr"] > train["lr"]:
        return "min_lr", f"must not exceed lr ({train['min_lr']} > {train['lr']})"
    if train["lora"] is not None and train["fsdp"] is not None:
        return "fsdp", "cannot be combined with lora (peft LoRA is trained without FSDP here)"
    return None


# Cross-key rules of a $defs fragment, run after its defaults are filled.
FRAGMENT_CHECKS: dict[str, Callable[[dict[str, Any]], tuple[str, str] | None]] = {
    "train": _check_train,
}


def validate_fragment(name: str, value: Any, where: str) -> Any:
    """``value`` checked against the schema's ``$defs/<name>``, defaults filled, as at parse
    time: the one validation contract stages use for their recipes. Raises ConfigError naming
    ``where`` (the recipe key at fault)."""
    value = copy.deepcopy(value)
    error = _first_error(name, value)
    if error is not None:
        raise ConfigError(_describe(error, where.split(".")))
    _validators(name)[1].validate(value)
    if name in FRAGMENT_CHECKS and (problem := FRAGMENT_CHECKS[name](value)):
        raise ConfigError(f"'{where}.{problem[0]}': {problem[1]}")
    return value


# --------------------------------------------------------------------------------------------
# The whole config
# --------------------------------------------------------------------------------------------


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
    config = copy.deepcopy(config)
    error = _first_error(None, config)
    if error is not None:
        raise ConfigError(f"config key {_describe(error)}")
    _validators(None)[1].validate(config)
    _check_cross_keys(config, Path(workdir))
    return config


# A hub repo id: "name" or "org/name" of [A-Za-z0-9._-], not starting or ending with . or -.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?/)?"
                     r"[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?$", re.ASCII)


def looks_like_local_path(model_id: str) -> bool:
    """True unless ``model_id`` can only be a hub repo id: absolute, ./, ../ or ~ paths, more
    than one '/', and names the hub refuses are local paths."""
    return (
        model_id.startswith(("/", ".", "~", "\\"))
        or model_id.count("/") > 1
        or "--" in model_id
        or ".." in model_id
        or not _HUB_ID.match(model_id)
    )


def check_model_source(model_id: str, key: str, workdir: Path) -> None:
    """A hub id passes (the import job fetches it); a local directory must hold what the import
    stage loads: config.json, safetensors weights and a tokenizer."""
    local = Path(model_id).expanduser()
    if not local.is_absolute():
        local = workdir / local
    if local.is_dir():
        names = {path.name for path in local.iterdir()}
        if "config.json" not in names:
            raise ConfigError(f"config key '{key}': local model directory {local} has no "
                              "config.json (write it with save_pretrained)")
        if not any(name.endswith(".safetensors") for name in names):
            if any(name.endswith(".bin") for name in names):
                raise ConfigError(
                    f"config key '{key}': local model directory {local} holds only PyTorch "
                    ".bin weights, which are never loaded here (pickle); convert them once with "
                    "transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained("
                    "dir, safe_serialization=True)"
                )
            raise ConfigError(f"config key '{key}': local model directory {local} has no "
                              "*.safetensors weights")
        if not names & set(TOKENIZER_FILES):
            raise ConfigError(f"config key '{key}': local model directory {local} has no "
                              f"tokenizer (one of {', '.join(TOKENIZER_FILES)})")
    elif local.exists():
        raise ConfigError(f"config key '{key}': {local} is a file, not a model directory")
    elif looks_like_local_path(model_id):
        raise ConfigError(f"config key '{key}': local model directory not found: {local} "
                          "(a hub id has the form org/name)")


def _hub_models(config: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(config key, id) of every hub or local model the run imports."""
    if config["model"]["source"] == "hf" and "hf" in config["model"]:
        yield "model.hf.id", config["model"]["hf"]["id"]
    if config["sft"]["source"] == "hf" and "hf" in config["sft"]:
        yield "sft.hf.id", config["sft"]["hf"]["id"]
    for lang, spec in config["languages"].items():
        for index, release in enumerate(spec.get("released_ct", [])):
            yield f"languages.{lang}.released_ct[{index}].id", release["id"]


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
    if sft["source"] == "hf" and "hf" not in sft:
        raise ConfigError("config key 'sft.hf': required when sft.source is 'hf'")
    if sft["source"] == "train" or config["ct_sft"]["enabled"]:  # both train on sft.data
        from workflow.instructions import InstructionDataError, check_spec, source_kind

        data = sft["data"]
        try:
            local = source_kind(data) == "path"
            check_spec(data, resolve_path(data["path"], workdir) if local else None)
        except InstructionDataError as error:
            raise ConfigError(f"config key {error}") from None
    for key, model_id in _hub_models(config):
        check_model_source(model_id, key, workdir)

    replay = config["ct"]["replay"]
    if replay:
        need_corpus(replay["corpus"], "ct.replay.corpus")
    for section, stage, train in _train_sections(config):
        try:
            checked = validate_fragment("train", train, section)
        except ConfigError as error:
            raise ConfigError(f"config key {error}") from None
        _check_processes(config, section, stage, checked)

    from workflow.plan import merge_variants

    for index, entry in enumerate(config["merges"]):
        try:
            merge_variants(entry)
        except ValueError as error:
            raise ConfigError(f"config key 'merges[{index}]': {error}") from None


def _check_processes(config: dict[str, Any], section: str, stage: str, train: dict) -> None:
    """grad_accum counts micro-batches over all of a job's processes (one per GPU on each of
    its nodes), so the trainer refuses one that does not divide; refuse it here, before any
    job."""
    resources = config["resources"]

    def setting(key: str, default: int) -> tuple[int, str]:
        source = stage if key in resources.get(stage, {}) else "default"
        return resources.get(source, {}).get(key, default), f"resources.{source}.{key}"

    (gpus, gpu_key), (nodes, node_key) = setting("gpu", 0), setting("nodes", 1)
    processes = max(1, gpus) * max(1, nodes)
    if train["grad_accum"] % processes:
        across = f" on each of {nodes} nodes ({node_key})" if nodes > 1 else ""
        raise ConfigError(
            f"config key '{section}.grad_accum': {train['grad_accum']} must be a multiple of "
            f"the {processes} processes of a {stage} job: {gpus} GPUs ({gpu_key}){across}"
        )


def _train_sections(config: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(config key, training stage, train settings) of every training the run can do."""
    sections = [("ct.train", "ct", config["ct"]["train"]),
                ("sft.train", "sft", config["sft"]["train"])]
    for lang, spec in config["languages"].items():
        if "ct_train" in spec:
            merged = {**config["ct"]["train"], **spec["ct_train"]}
            sections.append((f"languages.{lang}.ct_train", "ct", merged))
    if config["model"]["source"] == "scratch":
        pretrain = config["model"]["scratch"]["pretrain"]["train"]
        sections.append(("model.scratch.pretrain.train", "pretrain", pretrain))
    return sections


def main(argv: list[str] | None = None) -> None:
    """Check config files as ``snakemake --configfile`` would use them, in the current
    directory: Snakemake itself reports a YAML syntax error in a --configfile without a line."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m workflow.config", description=__doc__)
    parser.add_argument("files", nargs="+", type=Path, help="config files, merged in order")
    args = parser.parse_args(argv)
    try:
        load_workflow_config(args.files, {}, Path.cwd())
    except ConfigError as error:
        sys.exit(f"invalid config: {error}")
    print(f"ok: {', '.join(map(str, args.files))}")


if __name__ == "__main__":
    main()
