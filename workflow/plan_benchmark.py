"""Planning benchmark: what a dry run of this workflow costs per job, against bare Snakemake.

``python -m workflow.plan_benchmark [--sizes 1000 5000 16000] [--repeat 1] [--stat min|median]
[--project DIR [DIR ...]] [--keep DIR]``

Several ``--project`` directories (e.g. a copy of the project with a fix, and the original)
are timed in the same run, interleaved, each against the same bare workflow.

For each size N it writes, into a temporary directory,

- a config for this workflow (the project's Snakefile) whose plan has about N jobs: the tiny
  scratch model of ``tests/configs/tiny.yaml``, grown along the axes a real grid grows along:
  languages (``l001``, ``l002``, ... each its own corpus entry, cycling over the eu/gl/ca demo
  files, so every language has its own prepare/evalset jobs but the files are hashed once),
  4 token budgets, and 8 merge grid points per language and budget (linear over 4 CT weights,
  TIES over 4 densities; ``merge_options.sweep: false``, so each point is its own merge job and
  its own evaluation). Multilingual merges are off: over hundreds of languages they would be
  one absurdly long path, not a realistic grid. Jobs per language: 3 + 4 x (5 + 2 x 8) = 87;
- a bare Snakefile of touch rules with the same jobs and the same DAG shape
  (tokenizer -> prepare -> pretrain -> sft; prepare -> ct -> ctsft; ct + sft -> merge;
  every model -> evaluate, with evaluation sets per suite; everything -> report -> all),
  using wildcards and one input function (the evaluation sets of a suite list), no
  wildcard constraints, no params, logs or resources;

and dry-runs both the same way:
``python -m snakemake --snakefile S --directory D --configfile D/config.yaml --dry-run
--cores 2 --quiet``. Our workflow also picks up its workflow profile (profiles/default), as it
does for every user.

The first dry run of our workflow in a fresh directory hashes the corpora (cached afterwards in
D/.cache); so each workflow gets one untimed warm-up dry run (``--quiet rules``, which prints
the "Job stats" table the job counts are read from) and the second, timed run is the plain
``--quiet`` one. Runs are interleaved (ours, bare, ...; the order reverses every repeat)
because these machines are noisy; with ``--repeat`` > 1 the table shows the fastest run of
each (``--stat median``: the median). Each run is timed by wall clock and by CPU time (user +
sys of the dry run's processes): on a shared machine the CPU times are the ones to compare.

Start-up: a dry run of a 1-job bare Snakefile (Snakemake alone), and a dry run of our workflow
on its smallest config (one language, one budget, one merge: 17 jobs; it includes parsing
the rule files, validating the config and importing what the plan imports). The table gives
the per-job ratio raw, with Snakemake's start-up subtracted from both, and with each
workflow's own start-up subtracted.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

PROJECT_DIR = Path(__file__).resolve().parents[1]
BUDGETS = [2000, 4000, 8000, 16000]
GRID = [0.2, 0.4, 0.6, 0.8]
SOURCE_CORPORA = ["eu", "gl", "ca"]
MERGES = [
    {
        "method": "linear",
        "models": {"ct": {"weight": GRID}, "sft": {"weight": 0.5}},
        "multilingual": False,
    },
    {
        "method": "ties",
        "models": {"ct": {"weight": 1.0, "density": GRID}, "sft": {"weight": 1.0, "density": 0.5}},
        "multilingual": False,
    },
]
MERGE_POINTS = sum(len(GRID) for _ in MERGES)
JOBS_PER_LANGUAGE = 3 + len(BUDGETS) * (5 + 2 * MERGE_POINTS)
FIXED_JOBS = 9  # tokenizer, prepare en, pretrain, sft, evalset en, eval base/sft en, report, all


def languages_for(size: int) -> int:
    return max(1, round((size - FIXED_JOBS) / JOBS_PER_LANGUAGE))


def lang_codes(n_langs: int) -> list[str]:
    return [f"l{i:03d}" for i in range(1, n_langs + 1)]


def our_config(project: Path, n_langs: int | None) -> dict[str, Any]:
    """tests/configs/tiny.yaml grown to ``n_langs`` languages (None: the smallest config)."""
    config = yaml.safe_load((project / "tests/configs/tiny.yaml").read_text())
    data = project / "data/libreoffice-help"
    corpora = {"en": {"path": str(data / "en.jsonl.gz")}}
    if n_langs is None:  # start-up: one language, one budget, one merge, no CT-then-SFT
        corpora["eu"] = {"path": str(data / "eu.jsonl.gz")}
        config.update(
            corpora=corpora,
            languages={"eu": {"corpus": "eu"}},
            budgets=[BUDGETS[0]],
            merges=[{"method": "linear", "multilingual": False}],
            ct_sft={"enabled": False},
        )
        return config
    languages = {}
    for index, code in enumerate(lang_codes(n_langs)):
        source = SOURCE_CORPORA[index % len(SOURCE_CORPORA)]
        corpora[code] = {"path": str(data / f"{source}.jsonl.gz")}
        languages[code] = {"corpus": code}
    config.update(
        corpora=corpora,
        languages=languages,
        budgets=list(BUDGETS),
        merges=copy.deepcopy(MERGES),
        merge_options={"sweep": False},
    )
    return config


def _label(role_key: str, value: float) -> str:
    return f"{role_key}{format(value, 'g')}"


def bare_snakefile(n_langs: int | None) -> str:
    """Touch rules with the same jobs and DAG shape as our plan (None: a 1-job workflow)."""
    if n_langs is None:
        return 'rule one:\n    output: "one.txt"\n    shell: "touch {output}"\n'
    points = [("linear", _label("ct.weight", v)) for v in GRID]
    points += [("ties", _label("ct.density", v)) for v in GRID]
    return f"""\
# Bare Snakemake: touch rules, same job count and DAG shape as lrmerge's plan.
LANGS = {lang_codes(n_langs)!r}
BUDGETS = {BUDGETS!r}
POINTS = {points!r}
PRETRAIN_TOKENS = 12000

CTS = [f"ct/{{lang}}/{{tokens}}" for lang in LANGS for tokens in BUDGETS]
CTSFTS = [f"ctsft/{{lang}}/{{tokens}}" for lang in LANGS for tokens in BUDGETS]
MERGED = [
    f"merge/{{lang}}/{{tokens}}/{{method}}/{{hparams}}"
    for lang in LANGS for tokens in BUDGETS for method, hparams in POINTS
]
EVALS = [f"results/eval/{{m}}/{{s}}/scores" for m in ("base", "sft") for s in [*LANGS, "en"]]
EVALS += [
    f"results/eval/{{kind}}/{{lang}}/{{tokens}}/{{lang}}+en/scores"
    for kind in ("ct", "ctsft") for lang in LANGS for tokens in BUDGETS
]
EVALS += [
    f"results/eval/merge/{{lang}}/{{tokens}}/{{method}}/{{hparams}}/{{lang}}+en/scores"
    for lang in LANGS for tokens in BUDGETS for method, hparams in POINTS
]
TRAINED = [f"results/{{m}}/model" for m in ["base", "sft", *CTS, *CTSFTS]]


rule all:
    input: "results/report/done"

rule report:
    input: scores=EVALS, models=TRAINED
    output: "results/report/done"
    shell: "touch {{output}}"

rule tokenizer:
    output: "results/tokenizer/tok"
    shell: "touch {{output}}"

rule prepare:
    input: "results/tokenizer/tok"
    output: "results/data/{{corpus}}/{{tokens}}/data"
    shell: "touch {{output}}"

rule evalset:
    output: "results/evaldata/{{corpus}}/set"
    shell: "touch {{output}}"

rule pretrain:
    input: "results/tokenizer/tok", f"results/data/en/{{PRETRAIN_TOKENS}}/data"
    output: "results/base/model"
    shell: "touch {{output}}"

rule sft:
    input: "results/base/model"
    output: "results/sft/model"
    shell: "touch {{output}}"

rule ct:
    input: model="results/base/model", data="results/data/{{lang}}/{{tokens}}/data"
    output: "results/ct/{{lang}}/{{tokens}}/model"
    shell: "touch {{output}}"

rule ctsft:
    input: "results/ct/{{lang}}/{{tokens}}/model"
    output: "results/ctsft/{{lang}}/{{tokens}}/model"
    shell: "touch {{output}}"

rule merge:
    input:
        base="results/base/model",
        sft="results/sft/model",
        ct="results/ct/{{lang}}/{{tokens}}/model",
    output: "results/merge/{{lang}}/{{tokens}}/{{method}}/{{hparams}}/model"
    shell: "touch {{output}}"

rule evaluate:
    input:
        model="results/{{subject}}/model",
        data=lambda w: [f"results/evaldata/{{s}}/set" for s in w.suites.split("+")],
    output: "results/eval/{{subject}}/{{suites}}/scores"
    shell: "touch {{output}}"
"""


def snakemake_cmd(snakefile: Path, workdir: Path, quiet: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "snakemake",
        "--snakefile", str(snakefile),
        "--directory", str(workdir),
        "--configfile", str(workdir / "config.yaml"),
        "--dry-run", "--cores", "2",
        "--quiet", *quiet,
    ]  # fmt: skip


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def dry_run(snakefile: Path, workdir: Path, quiet: list[str]) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (user + sys of the dry run's processes) and its output."""
    env = dict(os.environ, XDG_CACHE_HOME=str(workdir / ".xdg-cache"))
    cpu = _children_cpu()
    start = time.perf_counter()
    proc = subprocess.run(
        snakemake_cmd(snakefile, workdir, quiet), capture_output=True, text=True, env=env
    )
    seconds = time.perf_counter() - start
    cpu = _children_cpu() - cpu
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr)[-4000:]
        sys.exit(f"dry run failed in {workdir} (rc {proc.returncode}):\n{output}")
    return seconds, cpu, proc.stdout + proc.stderr


def job_count(output: str) -> int:
    match = re.search(r"^total\s+(\d+)\s*$", output, re.MULTILINE)
    if not match:
        sys.exit(f"no 'Job stats' total in the dry run's output:\n{output[-2000:]}")
    return int(match.group(1))


class Case:
    """One workflow in one directory: written, warmed up (job count), then timed."""

    def __init__(self, root: Path, name: str, snakefile: Path | None, text: str | None,
                 config: dict[str, Any] | None):  # fmt: skip
        self.dir = root / name
        self.dir.mkdir(parents=True)
        if text is not None:
            snakefile = self.dir / "Snakefile"
            snakefile.write_text(text)
        self.snakefile = snakefile
        (self.dir / "config.yaml").write_text(yaml.safe_dump(config or {}, sort_keys=False))
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.jobs = 0

    def warm_up(self) -> None:
        _, _, output = dry_run(self.snakefile, self.dir, ["rules"])
        self.jobs = job_count(output)

    def time(self) -> tuple[float, float]:
        seconds, cpu, _ = dry_run(self.snakefile, self.dir, [])
        self.times.append(seconds)
        self.cpu_times.append(cpu)
        return seconds, cpu

    def best(self, cpu: bool = False, stat: str = "min") -> float:
        values = self.cpu_times if cpu else self.times
        return min(values) if stat == "min" else statistics.median(values)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 16000])
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per case")
    parser.add_argument(
        "--stat",
        choices=["min", "median"],
        default="min",
        help="how the timed runs of a case are summarised (default: the fastest)",
    )
    parser.add_argument(
        "--project",
        type=Path,
        nargs="+",
        default=[PROJECT_DIR],
        help="project(s) whose Snakefile is measured (default: this one); several are timed "
        "in the same run, interleaved, e.g. a copy with a fix against the original",
    )
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="write the cases here and keep them (default: a temp dir)",
    )
    args = parser.parse_args(argv)

    projects = [project.resolve() for project in args.project]
    root = args.keep or Path(tempfile.mkdtemp(prefix="plan-benchmark-"))
    root.mkdir(parents=True, exist_ok=True)
    version = subprocess.run(
        [sys.executable, "-c", "import snakemake; print(snakemake.__version__)"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    print(f"snakemake {version}; python {sys.version.split()[0]}; {os.cpu_count()} CPUs")
    for index, project in enumerate(projects):
        print(f"ours{_suffix(index, projects)}: {project / 'Snakefile'}")
    print(f"cases in {root}")
    print("each case: one untimed warm-up dry run (hashes the corpora into .cache, counts the")
    print("jobs from its 'Job stats'), then timed dry runs, interleaved ours/bare")
    print(f"command: {' '.join(snakemake_cmd(Path('SNAKEFILE'), Path('DIR'), []))}")
    sys.stdout.flush()

    try:
        startup_bare = Case(root, "startup-bare", None, bare_snakefile(None), None)
        startups = [
            Case(root, f"startup-ours{_suffix(i, projects)}", project / "Snakefile", None,
                 our_config(project, None))
            for i, project in enumerate(projects)
        ]  # fmt: skip
        rows = []  # (size, n_langs, [ours per project], bare)
        for size in args.sizes:
            n_langs = languages_for(size)
            ours = [
                Case(root, f"ours{_suffix(i, projects)}-{size}", project / "Snakefile", None,
                     our_config(project, n_langs))
                for i, project in enumerate(projects)
            ]  # fmt: skip
            bare = Case(root, f"bare-{size}", None, bare_snakefile(n_langs), None)
            rows.append((size, n_langs, ours, bare))
        for case in (startup_bare, *startups):
            case.warm_up()
        for size, n_langs, ours, bare in rows:
            for case in (*ours, bare):
                case.warm_up()
            counts = ", ".join(f"{case.dir.name} {case.jobs}" for case in (*ours, bare))
            print(f"size {size}: {n_langs} languages; jobs: {counts}")
            sys.stdout.flush()
        for rep in range(args.repeat):
            order = [startup_bare, *startups]
            for _, _, ours, bare in rows:
                order += [*ours, bare]
            for case in order if rep % 2 == 0 else order[::-1]:
                seconds, cpu = case.time()
                load = os.getloadavg()[0]
                print(f"  run {rep + 1}: {case.dir.name:16s} {seconds:7.2f} s wall "
                      f"{cpu:7.2f} s cpu (load {load:.1f})")  # fmt: skip
                sys.stdout.flush()
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)

    print()
    print(f"timed: the second and later dry runs (--quiet) of each case; {args.stat} of "
          f"{args.repeat} run(s)")  # fmt: skip
    for cpu in (False, True):
        for index in range(len(projects)):
            pairs = [(size, ours[index], bare) for size, _, ours, bare in rows]
            label = f"ours{_suffix(index, projects)}"
            table(label, pairs, startup_bare, startups[index], cpu, args.stat)
    print("ratio = (s ours / jobs ours) / (s bare / jobs bare); '-sm start' subtracts the bare")
    print("1-job dry run from both; '-own start' subtracts ours' smallest config from ours and")
    print("the bare 1-job run from bare. cpu = user + sys seconds of the dry run's processes,")
    print("less sensitive than wall clock to other load on the machine.")


def _suffix(index: int, projects: list[Path]) -> str:
    return "" if len(projects) == 1 else f"#{index + 1}"


def table(label: str, pairs: list[tuple[int, Case, Case]], startup_bare: Case,
          startup_ours: Case, cpu: bool, stat: str) -> None:  # fmt: skip
    kind = "cpu" if cpu else "wall"
    s_bare, s_ours = startup_bare.best(cpu, stat), startup_ours.best(cpu, stat)
    print()
    print(f"{label}, {kind} seconds; start-up: bare 1-job {s_bare:.2f} s, ours smallest "
          f"config ({startup_ours.jobs} jobs) {s_ours:.2f} s")  # fmt: skip
    header = (
        f"| size | jobs ours | jobs bare | s ours ({kind}) | s bare ({kind}) | ms/job ours "
        "| ms/job bare | ratio | ratio -sm start | ratio -own start |"
    )
    print()
    print(header)
    print("|" + "---|" * 10)
    for size, ours, bare in pairs:
        t_ours, t_bare = ours.best(cpu, stat), bare.best(cpu, stat)
        per_ours = t_ours / ours.jobs
        per_bare = t_bare / bare.jobs
        net_sm = ((t_ours - s_bare) / ours.jobs) / ((t_bare - s_bare) / bare.jobs)
        net_own = ((t_ours - s_ours) / ours.jobs) / ((t_bare - s_bare) / bare.jobs)
        print(
            f"| {size} | {ours.jobs} | {bare.jobs} | {t_ours:.2f} | {t_bare:.2f} "
            f"| {per_ours * 1e3:.2f} | {per_bare * 1e3:.2f} | {per_ours / per_bare:.2f} "
            f"| {net_sm:.2f} | {net_own:.2f} |"
        )
    print()


if __name__ == "__main__":
    main()
