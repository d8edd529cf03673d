"""The plan: every artifact the config asks for, with its path, recipe and inputs.

Built from the validated config at parse time without reading any big artifact. Each artifact's
path carries readable wildcards and the digest of its recipe (the stage table's patterns,
``workflow.stages``); the rules in rules/*.smk are generated from the same table, and their
input functions look artifacts up by ``(rule, digest)``.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from workflow.artifacts import HashCache, digest_of, write_json
from workflow.config import OFFLINE_TASKS, ConfigError, resolve_path
from workflow.data import replay_tokens_for
from workflow.instructions import HUB_KEYS, format_params, source_kind
from workflow.ladder import RunShape, check_budget, schedule_spec, schedule_steps
from workflow.stages import PATTERNS, STAGES
from workflow.tasks import family_task

WILDCARD_CONSTRAINTS = {
    "digest": "[0-9a-f]{12}",
    "model": "[A-Za-z0-9][A-Za-z0-9._-]*",
    "corpus": "[A-Za-z0-9][A-Za-z0-9._-]*",
    "lang": "[A-Za-z0-9][A-Za-z0-9._-]*",
    "langs": "[A-Za-z0-9][A-Za-z0-9._+-]*",
    "tokens": "[0-9]+",
    "method": "[a-z_]+",
    "hparams": "[A-Za-z0-9._+-]+",
    "suites": "[A-Za-z0-9._+-]+",
    "subject": ".+",
}
ENGLISH_SUITE = "en"
# Keys of a ``merges`` entry that are not merge parameters.
ENTRY_KEYS = frozenset({"method", "models", "single", "multilingual"})
# Path labels name the grid point. Their order is fixed (not the config's) so that equal
# recipes share one path; these keys come first, in the order paths have always used, then
# any other parameter alphabetically. A fixed parameter such as a seed is no part of the label.
_LABEL_FIRST = ("lambda", "normalize", "rescale", "slack", "t", "weight", "density", "epsilon",
                "gamma")
_UNLABELLED = frozenset({"seed"})


def _label_order(key: str) -> tuple[int, str]:
    return (_LABEL_FIRST.index(key) if key in _LABEL_FIRST else len(_LABEL_FIRST), key)


def suite_corpus_and_tasks(config: dict[str, Any], suite: str) -> tuple[str | None, list[str]]:
    """The corpus whose held-out text a suite's offline tasks use, and the suite's tasks."""
    evaluation = config["evaluation"]
    if suite == ENGLISH_SUITE:
        return evaluation["english"], evaluation["english_tasks"]
    spec = config["languages"][suite]
    return spec.get("corpus"), spec.get("tasks", evaluation["tasks"])


def language_budgets(config: dict[str, Any], lang: str) -> list[int]:
    spec = config["languages"][lang]
    return sorted(spec.get("budgets", config["budgets"]))


def budgets_key(config: dict[str, Any], lang: str) -> str:
    """The config key that sets a language's budgets."""
    return f"languages.{lang}.budgets" if "budgets" in config["languages"][lang] else "budgets"


def one_run_shape(config: dict[str, Any], lang: str) -> tuple[RunShape, int] | None:
    """A language's one CT run (``ct.schedule.mode: one_run``): its block and step shape and
    the steps of its learning-rate schedule; None for independent runs per budget."""
    schedule = schedule_spec(config["ct"]["schedule"], "ct.schedule")
    if schedule is None:
        return None
    overrides = config["languages"][lang].get("ct_train", {})
    train = {**config["ct"]["train"], **overrides}
    key = f"languages.{lang}.ct_train" if overrides else "ct.train"
    if train["epochs"] != 1:
        raise ConfigError(f"'{key}.epochs': the one CT run of ct.schedule reads its stream once "
                          f"(its budgets are its length), so epochs must be 1, got "
                          f"{train['epochs']}")
    replay = config["ct"]["replay"]
    shape = RunShape.of(train, replay["share"] if replay else None)
    return shape, schedule_steps(schedule, shape)


def released_ct(config: dict[str, Any], lang: str, tokens: int) -> dict[str, Any] | None:
    """The released CT checkpoint a language uses at this budget, if any."""
    for entry in config["languages"][lang].get("released_ct", []):
        if entry["tokens"] == tokens:
            return entry
    return None


@dataclass(frozen=True)
class Artifact:
    """One output of one job: where it lives, what decides its bytes, what it is built from."""

    rule: str
    path: str
    recipe: dict[str, Any]
    inputs: dict[str, Any] = field(default_factory=dict)
    subject: dict[str, Any] | None = None  # readable model metadata, for evaluated models
    cli: dict[str, Any] | None = None  # the stage's path flags, when they differ from inputs

    # Computed once per artifact (a frozen dataclass may cache into its __dict__; recipes are
    # never changed after _make): planning asks for a digest several times per job.
    @cached_property
    def digest(self) -> str:
        return digest_of(self.recipe)

    @cached_property
    def recipe_json(self) -> str:
        return json.dumps(self.recipe, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class ModelRef:
    """A model as an evaluation sees it: its digest and path, the job outputs it depends on,
    the flags that hand it to the evaluate stage and, for merge-on-load, its merge recipe."""

    digest: str
    path: str
    deps: dict[str, Any]
    cli: dict[str, Any]
    merge: dict[str, Any] | None = None

    @classmethod
    def of(cls, artifact: Artifact) -> ModelRef:
        return cls(
            artifact.digest, artifact.path, {"model": artifact.path}, {"model": artifact.path}
        )


@dataclass(frozen=True)
class MergeVariant:
    """One point of a merge entry's hyperparameter grid."""

    method: str
    params: dict[str, Any]
    roles: dict[str, dict[str, Any]]  # "ct" / "sft" -> per-model parameters
    label: str
    single: bool
    multilingual: bool


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return format(value, "g") if isinstance(value, float) else str(value)


def merge_variants(entry: dict[str, Any]) -> list[MergeVariant]:
    """Expand one ``merges`` entry into its grid points; list values are axes."""
    from workflow.merge.methods import resolve_merge_spec

    # Every key but the entry's own switches is a merge parameter; the method registry decides
    # which exist (resolve_merge_spec refuses the rest), so none is ever dropped silently.
    axes: list[tuple[tuple[str, ...], list[Any]]] = []
    for key in sorted(set(entry) - ENTRY_KEYS, key=_label_order):
        value = entry[key]
        axes.append(((key,), value if isinstance(value, list) else [value]))
    for role, params in sorted(entry.get("models", {}).items()):
        for key in sorted(params, key=_label_order):
            value = params[key]
            axes.append(((role, key), value if isinstance(value, list) else [value]))
    variants = []
    for point in itertools.product(*(values for _, values in axes)):
        params: dict[str, Any] = {}
        roles: dict[str, dict[str, Any]] = {"ct": {}, "sft": {}}
        label_parts = []
        for (key_path, _), value in zip(axes, point, strict=True):
            if len(key_path) == 1:
                params[key_path[0]] = value
                if key_path[0] not in _UNLABELLED:
                    label_parts.append(f"{key_path[0]}{_fmt(value)}")
            else:
                roles[key_path[0]][key_path[1]] = value
                label_parts.append(f"{key_path[0]}.{key_path[1]}{_fmt(value)}")
        models = [{"role": "ct", **roles["ct"]}, {"role": "sft", **roles["sft"]}]
        # Defaults are filled into the recipe: a changed default is a changed merge.
        resolved, (ct_params, sft_params), _ = resolve_merge_spec(entry["method"], params, models)
        variants.append(
            MergeVariant(
                method=entry["method"],
                params=resolved,
                roles={"ct": ct_params, "sft": sft_params},
                label="-".join(label_parts) or "default",
                single=entry["single"],
                multilingual=entry["multilingual"],
            )
        )
    return variants


class Plan:
    """All artifacts of a config, indexed by (rule, digest)."""

    def __init__(self, config: dict[str, Any], workdir: str | Path = "."):
        self.config = config
        self.workdir = Path(workdir)
        self.hashes = HashCache(self.workdir / ".cache" / "lrmerge" / "file-hashes.json")
        self.by_key: dict[tuple[str, str], Artifact] = {}
        self._corpus_refs: dict[str, tuple[dict[str, Any], Path]] = {}
        self._evalsets: dict[str, Artifact] = {}
        self.evaluations: list[Artifact] = []
        self.trained: list[Artifact] = []
        self.merged: list[str] = []  # merge directories with diagnostics.json (report input)
        self._rungs: dict[tuple[str, int], Artifact] = {}  # CT models by (language, budget)
        self._build()
        self.report = self._report()
        self.hashes.save()

    # -- bookkeeping -------------------------------------------------------------------------

    def _make(
        self, rule: str, recipe: dict[str, Any], inputs: dict[str, Any], **wildcards: Any
    ) -> Artifact:
        """An artifact with its versioned recipe and path, not (yet) a job of the plan."""
        stage = STAGES[rule]
        if recipe["stage"] != stage.stage:
            raise ValueError(f"rule {rule} writes {stage.stage} recipes, not {recipe['stage']}")
        recipe = {"stage": stage.stage, "version": stage.version, **recipe}
        digest = digest_of(recipe)
        path = PATTERNS[rule].format(digest=digest, **wildcards)
        artifact = Artifact(rule=rule, path=path, recipe=recipe, inputs=inputs)
        artifact.__dict__["digest"] = digest  # the cached property, already known
        return artifact

    def _register(self, artifact: Artifact) -> Artifact:
        return self.by_key.setdefault((artifact.rule, artifact.digest), artifact)

    def _add(
        self, rule: str, recipe: dict[str, Any], inputs: dict[str, Any], **wildcards: Any
    ) -> Artifact:
        return self._register(self._make(rule, recipe, inputs, **wildcards))

    @property
    def diagnosed(self) -> list[str]:
        """Diagnostics-only merges: no evaluation needs them, so the report asks for them."""
        return [a.path for (rule, _), a in self.by_key.items() if rule == "merge_diagnostics"]

    def get(self, rule: str, digest: str) -> Artifact:
        try:
            return self.by_key[(rule, digest)]
        except KeyError:
            raise KeyError(f"no {rule} artifact with digest {digest} in this config") from None

    def corpus_ref(self, name: str) -> tuple[dict[str, Any], Path]:
        """A corpus's recipe entry and path, resolved and hashed once per plan."""
        if name not in self._corpus_refs:
            self._corpus_refs[name] = self._corpus_ref(name)
        return self._corpus_refs[name]

    def _corpus_ref(self, name: str) -> tuple[dict[str, Any], Path]:
        spec = self.config["corpora"][name]
        path = resolve_path(spec["path"], self.workdir)
        ref = {
            "name": name,
            "sha256": self.hashes.sha256(path),
            "heldout_fraction": spec["heldout_fraction"],
        }
        return ref, path

    # -- stages ------------------------------------------------------------------------------

    def _prepare(self, tokenizer: Artifact, corpus: str, tokens: int) -> Artifact:
        ref, path = self.corpus_ref(corpus)
        recipe = {
            "stage": "prepare",
            "params": {"tokens": tokens, "heldout_fraction": ref["heldout_fraction"]},
            "corpus": ref,
            "tokenizer": tokenizer.digest,
        }
        inputs = {"corpus": str(path), "tokenizer": tokenizer.path}
        return self._add("prepare", recipe, inputs, model=self.name, corpus=corpus, tokens=tokens)

    def _evalset(self, corpus: str) -> Artifact:
        """One per corpus, however many evaluations use it."""
        if corpus not in self._evalsets:
            self._evalsets[corpus] = self._new_evalset(corpus)
        return self._evalsets[corpus]

    def _new_evalset(self, corpus: str) -> Artifact:
        ref, path = self.corpus_ref(corpus)
        evaluation = self.config["evaluation"]
        recipe = {
            "stage": "evalset",
            "params": {
                "heldout_fraction": ref["heldout_fraction"],
                "max_topic_docs": evaluation["max_topic_docs"],
                "max_heldout_docs": evaluation["max_heldout_docs"],
            },
            "corpus": ref,
        }
        return self._add("evalset", recipe, {"corpus": str(path)}, corpus=corpus)

    def _hub_import(self, spec: dict[str, Any], name: str) -> Artifact:
        local = Path(spec["id"]).expanduser()
        params = dict(spec)
        if local.is_dir():  # a local directory is identified by its content, a hub id by revision
            params["content_sha256"] = self.hashes.sha256(local)
        return self._add("import_hf", {"stage": "import_hf", "params": params}, {}, model=name)

    def _base(self) -> tuple[Artifact, Artifact]:
        """The base model and the artifact whose tokenizer prepares data for it."""
        model = self.config["model"]
        if model["source"] == "hf":
            base = self._hub_import(model["hf"], self.name)
            return base, base
        if model["source"] == "gguf":
            base = self._add(
                "import_gguf",
                {"stage": "import_gguf", "params": model["gguf"]},
                {},
                model=self.name,
            )
            return base, base
        scratch = model["scratch"]
        tok_spec = scratch["tokenizer"]
        tok_corpora = {name: self.corpus_ref(name) for name in sorted(tok_spec["mix"])}
        tokenizer = self._add(
            "tokenizer",
            {
                "stage": "tokenizer",
                "params": {
                    **tok_spec,
                    "model_max_length": scratch["architecture"]["max_position_embeddings"],
                },
                "corpora": {name: ref for name, (ref, _) in tok_corpora.items()},
            },
            {"corpus": {name: str(path) for name, (_, path) in tok_corpora.items()}},
            model=self.name,
        )
        pretrain = scratch["pretrain"]
        shares = _split_budget(pretrain["tokens"], pretrain["mix"])
        data = [self._prepare(tokenizer, corpus, tokens) for corpus, tokens in shares.items()]
        base = self._add(
            "pretrain",
            {
                "stage": "pretrain",
                "params": {"architecture": scratch["architecture"], "train": pretrain["train"]},
                "tokenizer": tokenizer.digest,
                "data": [artifact.digest for artifact in data],
            },
            {"tokenizer": tokenizer.path, "data": [artifact.path for artifact in data]},
            model=self.name,
        )
        self.trained.append(base)
        return base, tokenizer

    @cached_property
    def instruction_ref(self) -> tuple[dict[str, Any], Path | None]:
        """The SFT data's recipe entry and local file: a local file is identified by its
        sha256 (hashed once, cached), so a copy or move plans nothing new; a hub dataset by its
        id, pinned revision and what is loaded of it."""
        data = self.config["sft"]["data"]
        if source_kind(data) == "hub":
            return {key: data[key] for key in HUB_KEYS}, None
        path = resolve_path(data["path"], self.workdir)
        return {"sha256": self.hashes.sha256(path)}, path

    def _sft(self, model: Artifact, rule: str, **wildcards: Any) -> Artifact:
        sft = self.config["sft"]
        ref, path = self.instruction_ref
        recipe = {
            "stage": "sft",
            "params": {
                "examples": sft["examples"],
                "select": sft["select"],
                "chat_template": sft["chat_template"],
                "group_by_length": sft["group_by_length"],
                "data": format_params(sft["data"]),
                "train": sft["train"],
            },
            "model": model.digest,
            "dataset": ref,
        }
        inputs = {"model": model.path, **({"dataset": str(path)} if path else {})}
        artifact = self._add(rule, recipe, inputs, model=self.name, **wildcards)
        self.trained.append(artifact)
        return artifact

    def _ct(self, base: Artifact, data: Artifact, lang: str, tokens: int) -> Artifact:
        train = {**self.config["ct"]["train"], **self.config["languages"][lang].get("ct_train", {})}
        recipe = {
            "stage": "ct",
            "params": {"train": train},
            "model": base.digest,
            "data": data.digest,
        }
        inputs = {"model": base.path, "data": data.path}
        replay = self.config["ct"]["replay"]
        run = one_run_shape(self.config, lang)
        replay_tokens = replay_tokens_for(tokens, replay["share"]) if replay else 0
        if run is not None:
            # One run per language (workflow/ladder.py): the recipe is the run's identity plus
            # this budget, never the other budgets, so adding one changes no existing digest;
            # the job resumes from the nearest lower checkpoint (an input, not a recipe part).
            shape, total = run
            check_budget(tokens, shape, total, budgets_key(self.config, lang))
            recipe["params"]["schedule"] = {"mode": "one_run", "steps": total}
            recipe["params"]["tokens"] = tokens
            replay_tokens = shape.replay_tokens(tokens)
            lower = self._lower_rung(lang, tokens)
            if lower is not None:
                inputs["resume"] = lower.path
        if replay:  # the target budget stays exact; replay tokens come on top
            replay_data = self._prepare(self.tokenizer, replay["corpus"], replay_tokens)
            recipe["params"]["replay"] = {"share": replay["share"]}
            recipe["replay"] = replay_data.digest
            inputs["replay"] = replay_data.path
        artifact = self._add(
            "ct",
            recipe,
            inputs,
            model=self.name,
            lang=lang,
            tokens=tokens,
        )
        self.trained.append(artifact)
        return artifact

    def _rung(self, lang: str, tokens: int) -> Artifact:
        """The CT model of a language at a budget (built once: a one-run ladder asks for the
        lower rungs again)."""
        if (lang, tokens) not in self._rungs:
            data = self._prepare(self.tokenizer, self.config["languages"][lang]["corpus"], tokens)
            self._rungs[(lang, tokens)] = self._ct(self.base, data, lang, tokens)
        return self._rungs[(lang, tokens)]

    def _lower_rung(self, lang: str, tokens: int) -> Artifact | None:
        """The checkpoint a one-run budget resumes from: the nearest lower budget trained here
        (a released checkpoint is no state of this run), or None to start from the base."""
        lower = [t for t in language_budgets(self.config, lang)
                 if t < tokens and not released_ct(self.config, lang, t)]
        return self._rung(lang, lower[-1]) if lower else None

    def _merge_variant(
        self, variant: MergeVariant, cts: dict[str, Artifact], tokens: int
    ) -> Artifact:
        """One grid point's merge artifact (registered by the caller, or not at all)."""
        members = [
            ({"role": "ct", "lang": lang, **variant.roles["ct"]}, ct)
            for lang, ct in sorted(cts.items())
        ]
        members.append(({"role": "sft", **variant.roles["sft"]}, self.sft))
        recipe = {
            "stage": "merge",
            "method": variant.method,
            "params": variant.params,
            "models": [{**spec, "digest": artifact.digest} for spec, artifact in members],
            "base": self.base.digest,
        }
        inputs = {"base": self.base.path, "models": [artifact.path for _, artifact in members]}
        return self._make(
            "merge",
            recipe,
            inputs,
            model=self.name,
            langs="+".join(sorted(cts)),
            tokens=tokens,
            method=variant.method,
            hparams=variant.label,
        )

    def _merge_group(
        self, variants: list[MergeVariant], cts: dict[str, Artifact], tokens: int
    ) -> list[ModelRef]:
        """The merged models of one ``merges`` entry over the same inputs.

        Materialized one job per variant, or one sweep job writing every variant in one pass
        over the inputs; or, with ``merge_options.materialize: false``, not written at all:
        each evaluation builds its model in memory from the merge recipe.
        """
        merges = [self._merge_variant(variant, cts, tokens) for variant in variants]
        options = self.config["merge_options"]
        if not options["materialize"]:
            # One pass per merge computes its diagnostics; no weights are written. The recipe
            # is the merge's (its version too) under another stage: merged_model_digest().
            for variant, merge in zip(variants, merges, strict=True):
                diag = self._add(
                    "merge_diagnostics", {**merge.recipe, "stage": "merge_diagnostics"},
                    merge.inputs, model=self.name, langs="+".join(sorted(cts)), tokens=tokens,
                    method=variant.method, hparams=variant.label)
                self.merged.append(diag.path)
            return [
                ModelRef(
                    merge.digest,
                    merge.path,
                    deps=merge.inputs,
                    cli={
                        "merge-base": merge.inputs["base"],
                        "merge-models": merge.inputs["models"],
                    },
                    merge=merge.recipe,
                )
                for merge in merges
            ]
        if not (options["sweep"] and len(merges) > 1):
            refs = [ModelRef.of(self._register(merge)) for merge in merges]
            self.merged.extend(ref.path for ref in refs)
            return refs
        sweep = self._make(
            "merge_sweep",
            {"stage": "merge_sweep", "variants": [merge.recipe for merge in merges]},
            merges[0].inputs,
            model=self.name,
            langs="+".join(sorted(cts)),
            tokens=tokens,
            method=variants[0].method,
        )
        outs = [
            f"{sweep.path}/{variant.label}/{merge.digest}"
            for variant, merge in zip(variants, merges, strict=True)
        ]
        self._register(replace(sweep, cli={**sweep.inputs, "outs": outs}))
        self.merged.extend(outs)
        return [
            ModelRef(merge.digest, out, deps={"model": sweep.path}, cli={"model": out})
            for merge, out in zip(merges, outs, strict=True)
        ]

    def _evaluate(self, model: ModelRef, subject: dict[str, Any], suites: list[str]) -> None:
        evaluation = self.config["evaluation"]
        suite_specs = {}
        suite_inputs = {}
        for suite in suites:
            corpus, tasks = suite_corpus_and_tasks(self.config, suite)
            # Task families (workflow/tasks/families.yaml): one task per language; the offline
            # ones only where the suite has a corpus.
            expanded = [family_task(name, suite) for name in evaluation["families"]]
            tasks = list(dict.fromkeys([*tasks, *(task for task in expanded
                                                  if corpus or task not in OFFLINE_TASKS)]))
            if not tasks:
                continue
            suite_specs[suite] = {"tasks": list(tasks), "data": None}
            if set(tasks) & set(OFFLINE_TASKS):  # registry tasks bring their own data
                data = self._evalset(corpus)
                suite_specs[suite]["data"] = data.digest
                suite_inputs[suite] = data.path
        if not suite_specs:
            return
        # A merge of a swept grid (several hyperparameter labels for its method) is also scored
        # on the dev split of its languages' offline tasks (suite "<lang>_dev", the evalset's
        # dev/ folder): the report chooses the grid point there and reports it on test.
        suite_cli = dict(suite_inputs)
        grid = subject["kind"] == "merge" and len({
            variant.label for variants in self.merge_entries for variant in variants
            if variant.method == subject["method"]
            and (variant.multilingual if len(subject["langs"]) > 1 else variant.single)}) > 1
        for suite in list(suite_specs) if grid else []:
            offline = [task for task in suite_specs[suite]["tasks"] if task in OFFLINE_TASKS]
            if suite != ENGLISH_SUITE and offline:
                suite_specs[f"{suite}_dev"] = {"tasks": offline, "data": suite_specs[suite]["data"]}
                suite_inputs[f"{suite}_dev"] = suite_inputs[suite]
                suite_cli[f"{suite}_dev"] = f"{suite_inputs[suite]}/dev"
        subject = {**subject, "model_digest": model.digest, "path": model.path}
        # Chat template per model role; null (instruct roles): the format the role was tuned
        # in. CT-then-SFT trains with sft.chat_template; merges use the SFT's tokenizer.
        chat = evaluation["chat_template"][subject["kind"]]
        if chat is None:
            sft = self.config["sft"]
            hub_sft = sft["source"] == "hf" and subject["kind"] != "ctsft"
            chat = "auto" if hub_sft else sft.get("chat_template", "auto")
        # Multi-turn few-shot changes nothing without a template or examples: keep it out of
        # the digest then, so toggling it reruns only the evaluations it changes.
        multiturn = (evaluation["fewshot_as_multiturn"] and chat is not False
                     and evaluation["num_fewshot"] > 0)
        recipe = {
            "stage": "evaluate",
            "model": model.digest,
            "subject": subject,
            "suites": suite_specs,
            "params": {
                "limit": evaluation["limit"],
                "batch_size": evaluation["batch_size"],
                "num_fewshot": evaluation["num_fewshot"],
                "max_length": None,
                "dtype": evaluation["dtype"],
                "chat_template": chat,  # true, false or "auto"
                "fewshot_as_multiturn": multiturn,
            },
        }
        if model.merge:
            recipe["merge"] = model.merge
        artifact = self._make(
            "evaluate",
            recipe,
            {**model.deps, "suite": suite_inputs},
            subject=model.path.removeprefix("results/"),
            suites="+".join(suite_specs),
        )
        artifact = replace(artifact, cli={**model.cli, "suite": suite_cli})
        self.evaluations.append(self._register(artifact))

    def _subject(self, kind: str, langs=(), tokens=None, variant=None) -> dict[str, Any]:
        """Readable fields of an evaluated model, carried into its scores and the report."""
        return {
            "kind": kind,
            "model": self.name,
            "langs": sorted(langs),
            "tokens": tokens,
            "method": variant.method if variant else None,
            "hparams": variant.label if variant else None,
        }

    def _build(self) -> None:
        config = self.config
        self.name = config["model"]["name"]
        langs = sorted(config["languages"])
        self.base, self.tokenizer = self._base()
        if config["sft"]["source"] == "hf":
            self.sft = self._hub_import(config["sft"]["hf"], f"{self.name}-sft")
        else:
            self.sft = self._sft(self.base, "sft")
        self.merge_entries = [merge_variants(entry) for entry in config["merges"]]

        # One evaluation job per suite, so adding a language adds jobs and reruns none.
        for model, kind in ((self.base, "base"), (self.sft, "sft")):
            for suite in [*langs, ENGLISH_SUITE]:
                self._evaluate(ModelRef.of(model), self._subject(kind), [suite])
        budgets = sorted({tokens for lang in langs for tokens in language_budgets(config, lang)})
        shared = config["merge_options"]["multilingual_budgets"] == "shared"
        largest: dict[str, Artifact] = {}
        for tokens in budgets:
            cts = {
                lang: self._language_chain(lang, tokens)
                for lang in langs
                if tokens in language_budgets(config, lang)
            }
            largest.update(cts)  # ascending budgets: each language's largest wins
            if shared and len(cts) > 1:
                self._merges_and_evaluations(cts, tokens, multilingual=True)
        if not shared and len(largest) > 1:
            # One multilingual merge of each language's largest budget (released CT models
            # trained on different token counts), filed under the largest of them.
            top = max(max(language_budgets(config, lang)) for lang in largest)
            self._merges_and_evaluations(largest, top, multilingual=True)

    def _language_chain(self, lang: str, tokens: int) -> Artifact:
        """CT of one language at one budget, its baseline and merges; returns the CT model."""
        release = released_ct(self.config, lang, tokens)
        if release:
            hub = {key: release[key] for key in ("id", "revision", "dtype")}
            ct = self._hub_import(hub, f"{self.name}-ct-{lang}-{tokens}")
        else:
            ct = self._rung(lang, tokens)
        suites = [lang, ENGLISH_SUITE]
        self._evaluate(ModelRef.of(ct), self._subject("ct", [lang], tokens), suites)
        if self.config["ct_sft"]["enabled"]:
            ctsft = self._sft(ct, "ctsft", lang=lang, tokens=tokens)
            self._evaluate(ModelRef.of(ctsft), self._subject("ctsft", [lang], tokens), suites)
        self._merges_and_evaluations({lang: ct}, tokens, multilingual=False)
        return ct

    def _merges_and_evaluations(
        self, cts: dict[str, Artifact], tokens: int, multilingual: bool
    ) -> None:
        for variants in self.merge_entries:
            variants = [v for v in variants if (v.multilingual if multilingual else v.single)]
            if not variants:
                continue
            refs = self._merge_group(variants, cts, tokens)
            for variant, ref in zip(variants, refs, strict=True):
                subject = self._subject("merge", cts, tokens, variant)
                self._evaluate(ref, subject, [*sorted(cts), ENGLISH_SUITE])

    # -- what rule all asks for --------------------------------------------------------------

    def _report(self) -> Artifact:
        """The report over every evaluation, content-addressed like everything else: a config
        switched back to an earlier one finds its report already built."""
        metrics = [f"{artifact.path}/metrics.json" for artifact in self.trained]
        diagnostics = [f"{path}/diagnostics.json" for path in self.merged]
        recipe = {
            "stage": "report",
            "scores": [artifact.digest for artifact in self.evaluations],
            "trained": [artifact.digest for artifact in self.trained],
            "diagnostics": self.merged,
        }
        inputs = {
            "scores": [artifact.path for artifact in self.evaluations],
            "models": [artifact.path for artifact in self.trained],
            "diagnosed": self.diagnosed,
        }
        report = self._make("report", recipe, inputs)
        # The lists go to the stage in a file: thousands of paths exceed one argument's limit.
        listing = self.workdir / ".cache" / "lrmerge" / "report-inputs" / f"{report.digest}.json"
        if not listing.is_file():
            write_json(listing, {"scores": inputs["scores"], "train_metrics": metrics,
                                 "diagnostics": diagnostics})
        return self._register(replace(report, cli={"inputs": str(listing)}))

    def targets(self) -> list[str]:
        """Every artifact of the plan: a job runs if and only if its output is missing, so a
        deleted artifact is rebuilt even when everything downstream of it is finished."""
        return [artifact.path for artifact in self.by_key.values()]


def _split_budget(total: int, mix: dict[str, float]) -> dict[str, int]:
    """Share ``total`` tokens over a mix exactly: floor each share, the rest to the largest."""
    names = sorted(mix)
    weight_sum = sum(mix.values())
    shares = {name: int(total * mix[name] / weight_sum) for name in names}
    largest = max(names, key=lambda name: mix[name])
    shares[largest] += total - sum(shares.values())
    return {name: tokens for name, tokens in shares.items() if tokens > 0}
