# Helpers shared by the rule files: config validation, the plan, input functions, resources.
import json
import os
import shlex
import sys

from snakemake.common.configfile import load_configfile
from snakemake.exceptions import WorkflowError
from snakemake.utils import update_config

sys.path.insert(0, workflow.basedir)

from workflow.config import ConfigError, validate_config  # noqa: E402
from workflow.plan import PATTERNS, REPORT_FILES, WILDCARD_CONSTRAINTS, Plan  # noqa: E402

from snakemake_interface_executor_plugins.settings import DeploymentMethod  # noqa: E402

# With --sdm conda each job runs the python of its stage's environment; otherwise the
# interpreter running Snakemake (the project's .venv).
if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method:
    PY = "python"
else:
    PY = shlex.quote(sys.executable)
# Jobs find the workflow package, and keep their caches inside the working directory.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [workflow.basedir, os.environ.get("PYTHONPATH")]))
os.environ.setdefault("XDG_CACHE_HOME", os.path.abspath(".cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

DEFAULT_CONFIG = "config.yaml"
if not workflow.overwrite_configfiles:
    # No --configfile: the default run, from the working directory or the project.
    _default = DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else os.path.join(workflow.basedir, DEFAULT_CONFIG)
    _overrides = dict(config)
    config.clear()
    config.update(load_configfile(_default))
    update_config(config, _overrides)

try:
    _validated = validate_config(config, workdir=os.getcwd())
except ConfigError as error:
    raise WorkflowError(f"invalid config: {error}") from None
config.clear()
config.update(_validated)
PLAN = Plan(config, workdir=os.getcwd())
if not any(rule == "import_hf" for rule, _ in PLAN.by_key):
    # Offline runs keep the HF cache in the working directory; runs that download from the
    # hub keep the user's own (its cached models and login token).
    os.environ.setdefault("HF_HOME", os.path.abspath(".cache/huggingface"))


wildcard_constraints:
    **WILDCARD_CONSTRAINTS,


def get_final_targets():
    return PLAN.targets()


def _artifact(rule_name, wildcards):
    artifact = PLAN.get(rule_name, wildcards.digest)
    expected = PATTERNS[rule_name].format(**dict(wildcards.items()))
    if artifact.path != expected:
        raise WorkflowError(f"{expected} does not match the plan's {artifact.path}")
    return artifact


def get_inputs(rule_name):
    """Input function: the artifact's inputs, nested dicts flattened for unpack()."""

    def inputs(wildcards):
        flat = {}
        for key, value in _artifact(rule_name, wildcards).inputs.items():
            if isinstance(value, dict):
                flat.update({f"{key}_{name}": path for name, path in value.items()})
            else:
                flat[key] = value
        return flat

    return inputs


def get_recipe(rule_name):
    return lambda wildcards: _artifact(rule_name, wildcards).recipe_json


def get_sweep_recipes(wildcards):
    """A sweep job's variant recipes, as the JSON list `python -m workflow.merge --recipes` takes."""
    return json.dumps(_artifact("merge_sweep", wildcards).recipe["variants"], sort_keys=True)


def get_args(rule_name):
    """The stage's input flags: --key path, --key p1 p2, or --key name=path per entry."""

    def args(wildcards):
        parts = []
        artifact = _artifact(rule_name, wildcards)
        for key, value in (artifact.cli or artifact.inputs).items():
            if isinstance(value, dict):
                for name, path in value.items():
                    parts += [f"--{key}", shlex.quote(f"{name}={path}")]
            elif isinstance(value, list):
                parts += [f"--{key}", *map(shlex.quote, value)]
            else:
                parts += [f"--{key}", shlex.quote(value)]
        return " ".join(parts)

    return args


def get_resource(stage, key):
    resources = config["resources"]
    return resources.get(stage, {}).get(key, resources["default"].get(key, {"threads": 1, "mem_mb": 2000, "gpu": 0}[key]))


def log_path(rule_name):
    return "logs/" + PATTERNS[rule_name].removeprefix("results/").removesuffix("/scores.json") + ".log"


def benchmark_path(rule_name):
    return "benchmarks/" + PATTERNS[rule_name].removeprefix("results/").removesuffix("/scores.json") + ".tsv"


# Every stage runs as `python -m workflow.<module>`, threads capped to the job's allotment.
STAGE_ENV = "OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads}"
# One process on the job's leased GPU ids (none with gpu=0): evaluation and merge jobs.
LAUNCH_ONE = STAGE_ENV + " {PY} -m workflow.launch --gpus {resources.gpu} --nproc 1 --threads {threads} --"
