# Helpers shared by all rule files (config validation, the plan, input functions, resources)
# and stage_rules(), which defines each stage's rule from the stage table.
import atexit
import os
import shlex
import sys

from snakemake.common import get_function_params, overwrite_function_params
from snakemake.exceptions import WorkflowError

sys.path.insert(0, workflow.basedir)

from workflow.config import ConfigError, load_workflow_config  # noqa: E402
from workflow.artifacts import IntegrityError, check_sizes, is_complete, point_latest  # noqa: E402
from workflow.plan import WILDCARD_CONSTRAINTS, Plan  # noqa: E402
from workflow.stages import PATTERNS, STAGES  # noqa: E402
from workflow.cluster import ClusterError, check_capacity, check_local, query_nodes  # noqa: E402
from workflow.cluster import resource as cluster_resource  # noqa: E402
from workflow.cluster import slurm_resources  # noqa: E402
from workflow.cluster import check_config as check_cluster_config  # noqa: E402
from workflow.cluster import runtime as cluster_runtime  # noqa: E402

from snakemake_interface_executor_plugins.settings import DeploymentMethod  # noqa: E402

# With --sdm conda each job runs the python of its stage's environment; otherwise the
# interpreter running Snakemake (the project's .venv).
if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method:
    PY = "python"
else:
    PY = shlex.quote(sys.executable)
# Jobs find the workflow package (JOB_ENV), and keep their caches inside the working directory.
JOB_ENV = f"PYTHONPATH={shlex.quote(workflow.basedir)}${{PYTHONPATH:+:$PYTHONPATH}}"
os.environ.setdefault("XDG_CACHE_HOME", os.path.abspath(".cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

DEFAULT_CONFIG = "config.yaml"

# Snakemake read the --configfile files laxly (a duplicate key keeps its last value) and left
# numbers inside --config lists as strings: compose the config again, strictly. No
# --configfile: the default run, from the working directory or the project.
_configfiles = list(workflow.overwrite_configfiles) or [
    os.path.abspath(DEFAULT_CONFIG) if os.path.exists(DEFAULT_CONFIG) else os.path.join(workflow.basedir, DEFAULT_CONFIG)
]
try:
    _validated = load_workflow_config(_configfiles, workflow.config_settings.config, workdir=os.getcwd())
except ConfigError as error:
    raise WorkflowError(f"invalid config: {error}") from None
config.clear()
config.update(_validated)
try:  # the plan checks what spans keys and budgets (a one-run CT budget ends a step)
    PLAN = Plan(config, workdir=os.getcwd())
except ConfigError as error:
    raise WorkflowError(f"invalid config: {error}") from None
# Jobs go to a cluster (a non-local executor such as profiles/slurm: --jobs gives nodes; local
# runs alias --jobs to --cores). Only then do rules get their groups (Stage.group).
SUBMITS_JOBS = workflow.resource_settings.nodes is not None
# The cluster check (workflow/cluster.py): a placeholder account, or threads or memory no node
# has (such a job would pend forever), stops the run before any submission. Only the process
# that submits to a cluster asks sinfo, once.
try:
    check_cluster_config(config)
    if SUBMITS_JOBS and not workflow.remote_exec and not workflow.subprocess_exec:
        _nodes = query_nodes()
        if _nodes:
            check_capacity(config, {STAGES[name].resources for name, _ in PLAN.by_key
                                    if not STAGES[name].local}, _nodes)
            # Group jobs are sized as if their jobs ran side by side, capped by --cores: cap
            # them at the largest node, or a bundle could ask more CPUs than any node has.
            if workflow.global_resources["_cores"].value is None:
                workflow.global_resources["_cores"] = max(cpus for cpus, _ in _nodes)
    elif not SUBMITS_JOBS and not workflow.remote_exec and not workflow.subprocess_exec:
        # Jobs run here: nodes > 1 (one torchrun per node, srun) cannot (workflow/launch.py).
        check_local(config, {STAGES[name].resources for name, _ in PLAN.by_key})
except ClusterError as error:
    raise WorkflowError(str(error)) from None
# The digest is the only rebuild criterion (README: "What is rebuilt, and what never is"): a job
# runs when its output is missing. Input mtimes never reach a finished artifact (get_inputs
# declares none); Snakemake's other triggers (changed params, code, input set or software
# environment, from .snakemake/metadata) would rebuild in place artifacts whose recipe did not
# change, so they are switched off here, whatever a profile or command line says. (The DAG
# settings do not exist yet while the Snakefile is parsed, hence the property.)
if not isinstance(getattr(type(workflow), "rerun_triggers", None), property):
    raise WorkflowError("this Snakemake has no Workflow.rerun_triggers: lrmerge needs 9.x")
type(workflow).rerun_triggers = property(lambda self: frozenset())


def _point_latest_report(report=os.path.abspath(PLAN.report.path)):
    # results/report/latest: the report of this config, also when nothing had to run (a config
    # switched back to an earlier one finds its report built). At exit, since onsuccess does not
    # run when there is nothing to do, and whether this was a dry run is known only then (an
    # absolute path: Snakemake has left --directory by then).
    if not workflow.dryrun and is_complete(report):
        point_latest(report)


atexit.register(_point_latest_report)
if not any(name == "import_hf" for name, _ in PLAN.by_key):
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


def _flat_inputs(artifact):
    """An artifact's inputs as named paths (nested dicts flattened, lists kept) for unpack()."""
    flat = {}
    for key, value in artifact.inputs.items():
        if isinstance(value, dict):
            flat.update({f"{key}_{name}": path for name, path in value.items()})
        else:
            flat[key] = value
    return flat


def _signed(func):
    """Snakemake inspects an input or params function's signature each time it calls it (many
    times per job): hand it the parameters, computed once."""
    overwrite_function_params(func, get_function_params(func))
    return func


def get_inputs(rule_name):
    """Input function. A finished artifact needs nothing: its digest already says what it was
    built from, so neither an input's mtime nor its path can make Snakemake rebuild (and so
    delete) it, and its upstream jobs are not even planned. An artifact still to build needs
    its inputs, as usual."""

    def inputs(wildcards):
        artifact = _artifact(rule_name, wildcards)
        if not is_complete(artifact.path):
            return _flat_inputs(artifact)
        try:  # a finished artifact with a missing or resized file stops the run, named
            check_sizes(artifact.path)
        except IntegrityError as error:
            raise WorkflowError(str(error)) from None
        return {}

    return _signed(inputs)


def _paths(value):
    if isinstance(value, dict):
        return [path for item in value.values() for path in _paths(item)]
    return list(value) if isinstance(value, list) else [value]


def _stage_args(artifact):
    """The stage's input flags: --key path, --key p1 p2, or --key name=path per entry."""
    parts = []
    for key, value in (artifact.cli or artifact.inputs).items():
        if isinstance(value, dict):
            for name, path in value.items():
                parts += [f"--{key}", f"{name}={path}"]
        elif isinstance(value, list):
            parts += [f"--{key}", *value]
        else:
            parts += [f"--{key}", value]
    return parts


def stage_shell(stage):
    """The job's shell line: the launcher with the job's threads and GPU count, then the
    stage's command from the plan (params.command). Threads and resources stay in this
    template: a params function that takes them makes Snakemake expand every job's resources,
    even in a dry run (params are evaluated for every job, to find its conda env)."""
    env = JOB_ENV.replace("{", "{{").replace("}", "}}")
    nproc = " --nproc 1" if stage.processes == "one" else ""
    threads = " --threads {threads}" if stage.threads_flag else ""
    # Across nodes the plugin's gpu resource is 0 (slurm_resources): the GPUs per node and
    # the node count come from the config.
    nodes = cluster_resource(config, stage.resources, "nodes")[0] if stage.processes == "gpus" else 1
    gpus = "{resources.gpu}"
    if nodes > 1:
        gpus = f"{cluster_resource(config, stage.resources, 'gpu')[0]} --nodes {nodes}"
    return (
        f"{env} OMP_NUM_THREADS={{threads}} MKL_NUM_THREADS={{threads}} {PY} -m workflow.launch"
        f" --gpus {gpus} --threads {{threads}}{nproc} {{params.command}}{threads}"
        " > {log} 2>&1"
    )


def stage_command(rule_name):
    """Params function: the job's launcher flags and stage command, from the stage table and
    the plan (the rest of the line is stage_shell())."""
    stage = STAGES[rule_name]

    def command(wildcards):
        artifact = _artifact(rule_name, wildcards)
        launch = []
        if config["integrity"]["verify_inputs"] and stage.verify_inputs:
            verified = [path for path in _paths(artifact.inputs) if path.startswith("results/")]
            if verified:
                launch += ["--verify", *verified]
        run = [*stage.command.split(), *stage.flags.split(), "--recipe", artifact.recipe_json,
               *_stage_args(artifact), "--out", artifact.path]
        if stage.nonfinite_flag and config["integrity"]["allow_nonfinite"]:
            run.append("--allow-nonfinite")
        return " ".join(map(shlex.quote, [*launch, "--", *run]))

    return _signed(command)


def get_resource(stage, key):
    resources = config["resources"]
    return resources.get(stage, {}).get(key, resources["default"].get(key, {"threads": 1, "mem_mb": 2000, "gpu": 0}[key]))


def _job_file(root, rule_name, suffix):
    """logs/… or benchmarks/…: the output's path under results/ (a file output's folder)."""
    stage = STAGES[rule_name]
    path = os.path.dirname(stage.pattern) if stage.output_file else stage.pattern
    return root + path.removeprefix("results/") + suffix


def cluster_resources(stage):
    """sbatch's account, partition and walltime of a stage's jobs, from the config's `cluster`
    section; only those set (null: the cluster's default, so sbatch gets no flag). Then the
    job's gpu resource, and for a job across nodes its nodes and tasks
    (workflow.cluster.slurm_resources)."""
    cluster = config["cluster"]
    gpu = get_resource(stage.resources, "gpu")
    extra = {
        "slurm_account": cluster["account"],
        "slurm_partition": (cluster["gpu_partition"] if gpu else None) or cluster["partition"],
        "runtime": cluster_runtime(config, stage.resources),
    }
    extra = {key: value for key, value in extra.items() if value is not None}
    return {**extra, **slurm_resources(config, stage.resources)}


def stage_rules(*names, report_options=None):
    """Define the rules of these stages: everything that differs between them is in the stage
    table (workflow/stages.py) and the plan. Under a cluster profile, `local` stages run on the
    submitting host and `group` stages are bundled into fewer submissions (Stage fields).
    report_options: report() flags of the output, for `snakemake --report`."""
    for name in names:
        stage = STAGES[name]
        output = stage.pattern if stage.output_file else directory(stage.pattern)
        if report_options:
            output = report(output, **report_options)

        rule:
            name:
                name
            localrule: stage.local
            group: (stage.group or None) if SUBMITS_JOBS else None
            input:
                unpack(get_inputs(name)),
            output:
                output,
            params:
                command=stage_command(name),
            log:
                _job_file("logs/", name, ".log"),
            benchmark:
                _job_file("benchmarks/", name, ".tsv")
            priority: stage.priority
            conda:
                f"../envs/{stage.env}.yaml"
            threads: get_resource(stage.resources, "threads")
            resources:
                mem_mb=get_resource(stage.resources, "mem_mb"),
                **cluster_resources(stage),
            shell:
                stage_shell(stage)
