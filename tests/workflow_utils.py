"""Run the real Snakemake workflow in a temporary directory and read its job lists."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

PROJECT = Path(__file__).resolve().parent.parent
TINY_CONFIG = PROJECT / "tests" / "configs" / "tiny.yaml"
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def tiny_config() -> dict[str, Any]:
    return yaml.safe_load(TINY_CONFIG.read_text())


def snakemake(
    workdir: Path,
    config: dict[str, Any],
    *args: str,
    check: bool = True,
    timeout: int = 900,
    snakefile: Path = PROJECT / "Snakefile",
) -> subprocess.CompletedProcess:
    """Run Snakemake on ``config`` (written into ``workdir``) with the project's Snakefile."""
    config_path = workdir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [
            *SNAKEMAKE,
            "--snakefile",
            str(snakefile),
            "--directory",
            str(workdir),
            "--configfile",
            str(config_path),
            "--cores",
            "2",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed ({result.returncode}):\n"
            f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
        )
    return result


_JOB = re.compile(r"^\s*(?:local)?rule (\w+):\s*$")  # group members are indented
_FIELD = re.compile(r"^\s+(output|resources): (.+)$")


def planned_job_details(
    workdir: Path, config: dict[str, Any], *args: str
) -> list[dict[str, Any]]:
    """Every job a dry run would execute (rule ``all`` excluded): rule, output, resources."""
    result = snakemake(workdir, config, "--dry-run", *args)
    text = result.stdout + result.stderr
    jobs: list[dict[str, Any]] = []
    for line in text.splitlines():
        if match := _JOB.match(line):
            jobs.append({"rule": match.group(1), "output": None, "resources": {}})
        elif jobs and (match := _FIELD.match(line)):
            if match.group(1) == "output":
                jobs[-1]["output"] = match.group(2).split(", ")[0]
            else:
                pairs = (item.split("=", 1) for item in match.group(2).split(", "))
                jobs[-1]["resources"] = {key: value for key, value in pairs}
    if "Nothing to be done" not in text and not jobs:
        raise AssertionError(f"could not read the dry run's job list:\n{text[-4000:]}")
    return [job for job in jobs if job["rule"] != "all"]


def planned_jobs(workdir: Path, config: dict[str, Any]) -> list[tuple[str, str]]:
    """(rule, first output) of every job a dry run would execute."""
    return [(job["rule"], job["output"]) for job in planned_job_details(workdir, config)]


def with_changes(config: dict[str, Any], change) -> dict[str, Any]:
    changed = copy.deepcopy(config)
    change(changed)
    return changed


def eval_worker_pids(under: Path) -> list[int]:
    """Evaluation workers (workflow/eval_worker/) whose slot directory is under ``under``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"workflow.eval_worker" in part for part in cmdline) and any(
                part.startswith(os.fsencode(under)) for part in cmdline):
            found.append(int(entry.name))
    return found
