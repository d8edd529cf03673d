"""Fixed cost per evaluation job: the old way against the new way, measured in the same run.

    python -m workflow.evaluate_benchmark [--jobs 4] [--docs 20] [--keep DIR] [--baseline DIR]

Builds a tiny random Llama (the project's own tokenizer and scratch config) and one offline
suite (topic + bpb), then scores it ``--jobs`` times, each time as a separate evaluation job
the way Snakemake starts one (``python -m workflow.launch --gpus 0 --nproc 1 -- workflow.evaluate
...``, a new interpreter per job):

- ``baseline`` (with ``--baseline DIR``, another checkout of the project, e.g. the last
  commit: ``git archive HEAD | tar -x -C DIR``): that tree's launcher and evaluate stage;
- ``exec``: the launcher execs a second interpreter for the stage (LRMERGE_LAUNCH=exec, the
  behaviour before in-process launch);
- ``inprocess``: the launcher runs the stage in its own interpreter (LRMERGE_LAUNCH=inprocess;
  the default for a CPU job other than an evaluation);
- ``worker``: each job a thin client of a warm evaluation worker (workflow/eval_worker/, the
  default for a CPU evaluation job): the first job starts the worker (its imports are in that
  job's time), the others find it warm. The worker's CPU time is counted with the job it ran;
- ``shared``: every evaluation in one process, one after the other through
  :func:`workflow.evaluate.evaluate` (tasks built once, lm-eval imported once), the cost a
  planner-grouped batch would pay per model.

The model is so small that scoring it takes milliseconds: a job's time is its fixed cost.
Each job's wall time and CPU time (user + system, its child processes included) are taken; on
a shared machine the CPU time is the steadier of the two. The modes alternate job by job, so
load from other processes hits them alike. Prints the mean and median per mode and the
speed-up of each mode over the first (``baseline`` when given, else ``exec``).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from workflow.artifacts import digest_of, write_recipe
from workflow.prompts import LABELS, TOPICS, topic_prompt, topic_record

PROJECT = Path(__file__).resolve().parent.parent
MODES = ("exec", "inprocess", "worker", "shared")
ARCH = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4,
        "max_position_embeddings": 256}


def build_model(root: Path) -> tuple[Path, str]:
    """A seeded random Llama saved as a model directory with a recipe; returns (dir, digest)."""
    import torch
    from transformers import LlamaForCausalLM

    from workflow import models

    texts = [f"{label} cell {i} sheet formula row column page style" for i, label in
             enumerate(LABELS * 20)]
    tokenizer = models.train_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    out = root / "model"
    LlamaForCausalLM(models.scratch_config(ARCH, tokenizer)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    recipe = {"stage": "benchmark_model", "version": "1", "arch": ARCH}
    write_recipe(out, recipe)
    return out, digest_of(recipe)


def build_suite(root: Path, docs: int) -> tuple[Path, str]:
    """An evalset-shaped directory: ``docs`` topic paragraphs and held-out texts."""
    out = root / "eu"
    out.mkdir(parents=True)
    topic = [topic_record(f"Paragraph {i} about a {LABELS[i % len(LABELS)]}.",
                          TOPICS[i % len(LABELS)]) for i in range(docs)]
    heldout = [{"text": topic_prompt(f"held-out text {i}")} for i in range(docs)]
    for name, records in (("topic.jsonl", topic), ("heldout.jsonl", heldout)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in records), "utf-8")
    recipe = {"stage": "evalset", "version": "1", "params": {"benchmark": docs}}
    write_recipe(out, recipe)
    return out, digest_of(recipe)


def job_recipe(model_digest: str, suite_digest: str, job: int) -> dict[str, Any]:
    from workflow.evaluate import STAGE_VERSIONS

    return {
        "stage": "evaluate",
        "version": STAGE_VERSIONS["evaluate"],
        "model": model_digest,
        "subject": {"kind": "base", "job": job},
        "suites": {"eu": {"tasks": ["topic", "bpb"], "data": suite_digest}},
        "params": {"limit": None, "batch_size": 8, "num_fewshot": 0, "max_length": None,
                   "dtype": "float32", "chat_template": False, "fewshot_as_multiturn": False},
    }


def baseline_params(tree: Path) -> tuple[str, ...]:
    """The recipe params another checkout's evaluate stage knows (its PARAM_KEYS)."""
    module = ast.parse((tree / "workflow" / "evaluate.py").read_text("utf-8"))
    for node in module.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "PARAM_KEYS" for target in node.targets
        ):
            return tuple(ast.literal_eval(node.value))
    sys.exit(f"--baseline {tree}: workflow/evaluate.py has no PARAM_KEYS")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a running process, 0 when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_worker_cpu: dict[int, float] = {}  # worker pid -> its CPU seconds counted so far


def run_job(mode: str, recipe: dict[str, Any], model: Path, suite: Path, out: Path,
            tree: Path = PROJECT) -> tuple[float, float]:
    """One evaluation job as Snakemake would start it; returns its wall and CPU seconds (in
    ``worker`` mode the worker's CPU time since the job before is the job's too)."""
    cmd = [sys.executable, "-m", "workflow.launch", "--gpus", "0", "--threads", "1",
           "--nproc", "1", "--", "workflow.evaluate", "--recipe", json.dumps(recipe),
           "--model", str(model), "--suite", f"eu={suite}", "--out", str(out),
           "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(tree), "LRMERGE_LAUNCH": mode,
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out.parent.mkdir(parents=True, exist_ok=True)  # the job's working directory: its
    start, cpu = time.perf_counter(), _children_cpu()  # worker's slots go there, not into tree
    proc = subprocess.run(cmd, env=env, cwd=out.parent, capture_output=True, text=True,
                          check=False)
    wall, cpu = time.perf_counter() - start, _children_cpu() - cpu
    if proc.returncode != 0:
        sys.exit(f"{mode} job failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    if mode == "worker":
        found = re.findall(r"job runs in worker pid (\d+)", proc.stderr)
        if not found:
            sys.exit(f"worker job ran in no worker:\n{proc.stderr[-3000:]}")
        pid = int(found[-1])
        total = _process_cpu(pid)
        cpu += total - _worker_cpu.get(pid, 0.0)
        _worker_cpu[pid] = total
    return wall, cpu


def run_shared(jobs: list[tuple[dict[str, Any], Path]], model: Path,
               suite: Path) -> list[tuple[float, float]]:
    """Every job in one process, one after another: the per-model cost of a grouped batch.

    Runs in a child process so that lm-eval is imported there, once, inside the measurement.
    """
    script = (
        "import json, sys, time\n"
        "from pathlib import Path\n"
        "start, cpu = time.perf_counter(), time.process_time()\n"
        "from workflow.evaluate import evaluate\n"
        "times = []\n"
        "for recipe, out in json.loads(sys.argv[1]):\n"
        f"    evaluate(recipe, Path({str(model)!r}), {{'eu': Path({str(suite)!r})}}, out, 1)\n"
        "    times.append((time.perf_counter() - start, time.process_time() - cpu))\n"
        "    start, cpu = time.perf_counter(), time.process_time()\n"
        "print(json.dumps(times))\n"
    )
    payload = json.dumps([[recipe, str(out)] for recipe, out in jobs])
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    start, cpu = time.perf_counter(), _children_cpu()
    proc = subprocess.run([sys.executable, "-c", script, payload], env=env,
                          capture_output=True, text=True, check=False)
    total, total_cpu = time.perf_counter() - start, _children_cpu() - cpu
    if proc.returncode != 0:
        sys.exit(f"shared run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    times = json.loads(proc.stdout.strip().splitlines()[-1])
    # The interpreter's start-up and exit belong to the batch: spread them over its jobs.
    wall_extra = (total - sum(wall for wall, _ in times)) / len(times)
    cpu_extra = (total_cpu - sum(cpu for _, cpu in times)) / len(times)
    return [(wall + wall_extra, cpu + cpu_extra) for wall, cpu in times]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workflow.evaluate_benchmark",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=4, help="evaluation jobs per mode")
    parser.add_argument("--docs", type=int, default=20, help="topic paragraphs in the suite")
    parser.add_argument("--keep", type=Path, default=None,
                        help="build the fixture and score files here and keep them")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another checkout of the project to measure as the old way")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.docs < 1:
        parser.error("--jobs and --docs must be >= 1")
    if args.baseline and not (args.baseline / "workflow" / "launch.py").is_file():
        parser.error(f"--baseline {args.baseline} holds no workflow/launch.py")
    modes = ("baseline", *MODES) if args.baseline else MODES
    old_keys = baseline_params(args.baseline.resolve()) if args.baseline else ()
    with tempfile.TemporaryDirectory(prefix="lrmerge-evalbench-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        model, model_digest = build_model(root)
        suite, suite_digest = build_suite(root, args.docs)
        walls: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
        for job in range(args.jobs):
            for mode in modes[:-1]:  # the separate jobs, interleaved
                recipe = job_recipe(model_digest, suite_digest, job)
                out = root / "scores" / mode / f"{job}.json"
                if mode == "baseline":
                    params = {k: v for k, v in recipe["params"].items() if k in old_keys}
                    walls[mode].append(run_job("exec", {**recipe, "params": params}, model,
                                               suite, out, args.baseline.resolve()))
                else:
                    walls[mode].append(run_job(mode, recipe, model, suite, out))
        shared = [(job_recipe(model_digest, suite_digest, job),
                   root / "scores" / "shared" / f"{job}.json") for job in range(args.jobs)]
        walls["shared"] = run_shared(shared, model, suite)
    print(f"{args.jobs} evaluation jobs per mode, {args.docs} docs, tiny model "
          "(a job's time = its fixed cost)")
    print(f"{'mode':<10} {'wall mean':>9} {'median':>7} {'CPU mean':>9} {'median':>7}   "
          f"speed-up vs {modes[0]} (wall, CPU)")
    base = [statistics.mean(t[i] for t in walls[modes[0]]) for i in (0, 1)]
    for mode in modes:
        mean = [statistics.mean(t[i] for t in walls[mode]) for i in (0, 1)]
        median = [statistics.median(t[i] for t in walls[mode]) for i in (0, 1)]
        print(f"{mode:<10} {mean[0]:9.2f} {median[0]:7.2f} {mean[1]:9.2f} {median[1]:7.2f}   "
              f"{base[0] / mean[0]:.2f}x, {base[1] / mean[1]:.2f}x")


if __name__ == "__main__":
    main()
