"""The stage table: every rule of the workflow, in one place.

For each stage: its name (the Snakemake rule), the recipe stage and version it writes, its path
pattern (so its results folder), the ``resources`` key its jobs take, its conda environment and
its command line. The planner (``workflow.plan``), the rules (``rules/common.smk`` generates
them from this table) and the README read it.

Versions sit next to the code they version: each stage module has a ``STAGE_VERSIONS`` dict
(read here from the source, so planning never imports torch). Bump a stage's version when its
code changes what it writes: its artifacts, and everything downstream, get new digests.

The code-change guard (``tests/test_stages.py``): ``workflow/stages.lock.json`` records, per
stage version, a hash of the source of the modules the stage's outputs depend on (comments,
docstrings and formatting excluded: the hash is over the AST). The suite fails when a stage's
code changed and neither its version was bumped nor the change recorded as "no change to
outputs"::

    python -m workflow.stages check                       # what the test runs
    python -m workflow.stages record ct sft --no-output-change "refactor: same bytes"
    python -m workflow.stages record ct                   # after bumping its version
"""

from __future__ import annotations

import argparse
import ast
import functools
import hashlib
import json
import sys
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_DIR = PACKAGE_DIR.parent
LOCK_FILE = PACKAGE_DIR / "stages.lock.json"

# Modules (relative to the project) whose code decides what each recipe stage writes. Shared
# plumbing (artifacts, launch, gpu, lifeline, config validation) decides how, not what.
_DATA = ("workflow/data.py", "workflow/corpus.py")
_TRAIN = ("workflow/train.py", "workflow/prompts.py", "workflow/data.py")
_MERGE = (
    "workflow/merge/__init__.py",
    "workflow/merge/engine.py",
    "workflow/merge/kernels.py",
    "workflow/merge/methods.py",
    "workflow/merge/mergekit_yaml.py",
)
STAGE_SOURCES: dict[str, tuple[str, ...]] = {
    "tokenizer": ("workflow/models.py", "workflow/corpus.py"),
    "prepare": _DATA,
    "evalset": _DATA,
    "pretrain": (*_TRAIN, "workflow/models.py"),
    "import_hf": ("workflow/models.py",),
    "import_gguf": ("workflow/models.py",),
    "sft": (*_TRAIN, "workflow/instructions.py"),  # instructions: the SFT dataset's encoding
    "ct": (*_TRAIN, "workflow/ladder.py"),  # ladder: one-run CT's blocks and steps
    "merge": _MERGE,
    "evaluate": (
        "workflow/evaluate.py",
        "workflow/prompts.py",
        "workflow/tasks/_lrm_topic.yaml",
        "workflow/tasks/_lrm_bpb.yaml",
        *_MERGE,  # merge-on-load evaluations merge in memory
    ),
    "report": tuple(f"workflow/report/{name}.py" for name in (
        "__init__", "claims", "html", "load", "plan", "plots", "stats", "tables", "timings",
    )) + ("workflow/tasks/__init__.py", "workflow/tasks/families.yaml"),
}
# The module holding each recipe stage's STAGE_VERSIONS entry.
VERSION_MODULES = {
    "tokenizer": "workflow/models.py",
    "import_hf": "workflow/models.py",
    "import_gguf": "workflow/models.py",
    "prepare": "workflow/data.py",
    "evalset": "workflow/data.py",
    "pretrain": "workflow/train.py",
    "sft": "workflow/train.py",
    "ct": "workflow/train.py",
    "merge": "workflow/merge/__init__.py",
    "evaluate": "workflow/evaluate.py",
    "report": "workflow/report/__init__.py",
}


@dataclass(frozen=True)
class Stage:
    """One rule: what it writes, where, with which resources and command line."""

    name: str  # the Snakemake rule
    stage: str  # the recipe's "stage" (ctsft writes an "sft" recipe)
    pattern: str  # the output path; {digest} is the recipe's digest
    resources: str  # key under the config's ``resources``
    env: str  # conda environment, envs/<env>.yaml
    command: str  # python module and subcommand the job runs
    processes: str = "one"  # "one" process, or "gpus": one per GPU (torchrun)
    flags: str = ""  # fixed flags of the command line
    threads_flag: bool = False  # the stage takes --threads (training and evaluation)
    nonfinite_flag: bool = False  # the stage takes --allow-nonfinite (trains or merges weights)
    output_file: bool = False  # the output is one file, not a directory
    verify_inputs: bool = True  # check input artifacts against their manifests first
    priority: int = 0
    version_of: str = ""  # the stage whose code and version this one shares (default: itself)
    # Under a cluster profile: run on the submitting host, not as a cluster job (cheap jobs).
    local: bool = False
    # Under a cluster profile: the Snakemake group of the rule's jobs; a profile's
    # group-components bundles that many of its independent jobs into one submission.
    group: str = ""

    @property
    def folder(self) -> str:
        """The results folder of the stage (``results/ct``)."""
        return "/".join(self.pattern.split("/")[:2])

    @property
    def version(self) -> str:
        return stage_version(self.version_of or self.stage)


# Training jobs are the long ones with many dependents: started first, they leave the short
# merges and evaluations to fill the cores at the end instead of one last model training alone.
TRAINING_FIRST = 10

STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage("tokenizer", "tokenizer", "results/tokenizer/{model}/{digest}", "tokenizer",
              "models", "workflow.models tokenizer", group="data"),
        # Too little text for a budget fails in prepare, so it runs before any training.
        Stage("prepare", "prepare", "results/data/{model}/{corpus}/{tokens}/{digest}",
              "prepare", "data", "workflow.data prepare", priority=50, group="data"),
        Stage("evalset", "evalset", "results/evaldata/{corpus}/{digest}", "evalset", "data",
              "workflow.data evalset", local=True),
        Stage("pretrain", "pretrain", "results/base/{model}/{digest}", "pretrain", "train",
              "workflow.train pretrain", processes="gpus", threads_flag=True,
              nonfinite_flag=True, priority=TRAINING_FIRST),
        Stage("import_hf", "import_hf", "results/import/{model}/{digest}", "import", "models",
              "workflow.models hf"),
        Stage("import_gguf", "import_gguf", "results/import-gguf/{model}/{digest}", "import",
              "models", "workflow.models gguf"),
        Stage("sft", "sft", "results/sft/{model}/{digest}", "sft", "train", "workflow.train sft",
              processes="gpus", threads_flag=True, nonfinite_flag=True, priority=TRAINING_FIRST),
        Stage("ct", "ct", "results/ct/{model}/{lang}/{tokens}/{digest}", "ct", "train",
              "workflow.train ct", processes="gpus", threads_flag=True, nonfinite_flag=True,
              priority=TRAINING_FIRST),
        Stage("ctsft", "sft", "results/ctsft/{model}/{lang}/{tokens}/{digest}", "sft", "train",
              "workflow.train sft", processes="gpus", threads_flag=True, nonfinite_flag=True,
              priority=TRAINING_FIRST),
        Stage("merge", "merge",
              "results/merge/{model}/{langs}/{tokens}/{method}/{hparams}/{digest}", "merge",
              "merge", "workflow.merge", nonfinite_flag=True),
        # Every variant of a hyperparameter grid over the same inputs, in one pass.
        Stage("merge_sweep", "merge_sweep",
              "results/sweep/{model}/{langs}/{tokens}/{method}/{digest}", "merge", "merge",
              "workflow.merge", nonfinite_flag=True, version_of="merge"),
        # merge_options.materialize: false: the merge's diagnostics, no weights (evaluation
        # merges on load). Same code, so same version, as the merge.
        Stage("merge_diagnostics", "merge_diagnostics",
              "results/merge-diagnostics/{model}/{langs}/{tokens}/{method}/{hparams}/{digest}",
              "merge", "merge", "workflow.merge", flags="--diagnostics-only",
              nonfinite_flag=True, version_of="merge"),
        Stage("evaluate", "evaluate", "results/eval/{subject}/{suites}/{digest}/scores.json",
              "evaluate", "evaluate", "workflow.evaluate", threads_flag=True, output_file=True,
              nonfinite_flag=True, group="evaluate"),
        # Reads only score and metrics JSON files (thousands of them): nothing to verify.
        Stage("report", "report", "results/report/{digest}", "report", "report",
              "workflow.report", verify_inputs=False, local=True),
    )
}
PATTERNS = {name: stage.pattern for name, stage in STAGES.items()}


# -- versions ---------------------------------------------------------------------------------


def read_versions(path: Path) -> dict[str, str]:
    """The ``STAGE_VERSIONS`` literal of a stage module, read from its source."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target = node.target
        else:
            continue
        if isinstance(target, ast.Name) and target.id == "STAGE_VERSIONS":
            return {key: str(value) for key, value in ast.literal_eval(node.value).items()}
    raise LookupError(f"{path} defines no STAGE_VERSIONS dict")


@functools.cache
def _module_versions(module: str) -> dict[str, str]:
    return read_versions(PROJECT_DIR / module)


def stage_version(stage: str) -> str:
    """The version of a recipe stage, from the module that implements it."""
    module = VERSION_MODULES[stage]
    versions = _module_versions(module)
    if stage not in versions:
        raise LookupError(f"{module}: STAGE_VERSIONS has no entry for stage {stage!r}")
    return versions[stage]


# -- the code-change guard --------------------------------------------------------------------


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return tree


def _without_versions(tree: ast.Module) -> ast.Module:
    """The module without its STAGE_VERSIONS assignment: bumping one stage's version must not
    look like a code change of the module's other stages."""
    tree.body = [
        node for node in tree.body
        if not (isinstance(node, (ast.Assign, ast.AnnAssign)) and "STAGE_VERSIONS" in ast.dump(
            node.targets[0] if isinstance(node, ast.Assign) else node.target))
    ]
    return tree


def source_hash(path: Path) -> str:
    """sha256 of a file's meaning: the AST of Python code without docstrings (comments and
    formatting never reach the AST), or the bytes of any other file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".py":
        tree = _without_versions(_strip_docstrings(ast.parse(text)))
        text = ast.dump(tree, annotate_fields=False, include_attributes=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def stage_fingerprint(stage: str, root: Path = PROJECT_DIR) -> dict[str, str]:
    return {module: source_hash(root / module) for module in STAGE_SOURCES[stage]}


def _versions(root: Path) -> dict[str, str]:
    return {stage: read_versions(root / module)[stage] for stage, module in
            VERSION_MODULES.items()}


def read_lock(lock_file: Path = LOCK_FILE) -> dict[str, Any]:
    try:
        return json.loads(lock_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"stages": {}}


def check(root: Path = PROJECT_DIR, lock_file: Path = LOCK_FILE) -> list[str]:
    """Stages whose code or version differs from the lock, one sentence each."""
    lock = read_lock(lock_file)["stages"]
    versions = _versions(root)
    problems = []
    for stage in STAGE_SOURCES:
        recorded = lock.get(stage)
        current = stage_fingerprint(stage, root)
        version = versions[stage]
        where = f"{VERSION_MODULES[stage]} STAGE_VERSIONS[{stage!r}]"
        if recorded is None:
            problems.append(f"stage {stage!r} is not in {lock_file.name}: run "
                            f"`python -m workflow.stages record {stage}`")
        elif recorded["version"] != version:
            problems.append(f"stage {stage!r} is at version {version} but {lock_file.name} "
                            f"records {recorded['version']}: run `python -m workflow.stages "
                            f"record {stage}` to record the bump")
        elif recorded["sources"] != current:
            changed = sorted(m for m in current if recorded["sources"].get(m) != current[m])
            problems.append(
                f"stage {stage!r} changed ({', '.join(changed)}) without a new version: bump "
                f"{where} (now {version}) if its outputs change, else record the change with "
                f"`python -m workflow.stages record {stage} --no-output-change REASON`")
    return problems


def record(stages: list[str], reason: str | None, root: Path = PROJECT_DIR,
           lock_file: Path = LOCK_FILE) -> None:
    """Record the current code of ``stages`` in the lock: after a version bump, or (with
    ``reason``) as a change that leaves the stage's outputs as they were."""
    lock = read_lock(lock_file)
    versions = _versions(root)
    for stage in stages:
        if stage not in STAGE_SOURCES:
            raise SystemExit(f"unknown stage {stage!r}; stages: {', '.join(STAGE_SOURCES)}")
        entry = lock["stages"].get(stage, {"history": []})
        bumped = entry.get("version") != versions[stage]
        if not bumped and reason is None and entry.get("sources") != stage_fingerprint(
                stage, root):
            raise SystemExit(f"stage {stage!r} changed at version {versions[stage]}: bump its "
                             "version, or give --no-output-change REASON")
        if bumped or reason:
            entry["history"] = [*entry.get("history", []), {
                "version": versions[stage], "date": date.today().isoformat(),
                "note": reason or "version bump"}]
        entry.update(version=versions[stage], sources=stage_fingerprint(stage, root))
        lock["stages"][stage] = {k: entry[k] for k in ("version", "sources", "history")}
    lock_file.write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workflow.stages", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="fail if a stage's code changed without a version bump")
    rec = sub.add_parser("record", help="record stages' current code in the lock file")
    rec.add_argument("stages", nargs="+")
    rec.add_argument("--no-output-change", metavar="REASON", default=None,
                     help="the code changed but the stage writes the same bytes")
    sub.add_parser("table", help="print the stage table as markdown")
    args = parser.parse_args(argv)
    if args.command == "check":
        problems = check()
        for problem in problems:
            print(problem)
        sys.exit(1 if problems else 0)
    elif args.command == "record":
        record(args.stages, args.no_output_change)
    else:
        print(markdown_table())


def markdown_table() -> str:
    """The stage table as the README shows it."""
    lines = [
        "| rule | stage@version | results folder | resources | env | command |",
        "|---|---|---|---|---|---|",
    ]
    for s in STAGES.values():
        command = " ".join(filter(None, [f"python -m {s.command}", s.flags]))
        lines.append(f"| `{s.name}` | {s.version_of or s.stage}@{s.version} | `{s.folder}` | "
                     f"`{s.resources}` | `envs/{s.env}.yaml` | `{command}` |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
