"""The conda environments per stage agree with the pip pins, and every rule names one."""

from __future__ import annotations

import re

import yaml
from workflow_utils import PROJECT


def normalized(name: str) -> str:
    """PEP 503 names: pip freeze writes lm_eval where requirements say lm-eval."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pip_pins() -> dict[str, str]:
    pins = {}
    for line in (PROJECT / "envs" / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[normalized(name)] = version
    return pins


def test_every_conda_env_pins_the_same_versions_as_pip():
    pins = pip_pins()
    envs = sorted((PROJECT / "envs").glob("*.yaml"))
    assert len(envs) >= 6
    for env_file in envs:
        env = yaml.safe_load(env_file.read_text())
        pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
        assert pip_section, env_file
        for requirement in pip_section:
            name, version = requirement.split("==")
            assert pins.get(normalized(name)) == version, f"{env_file.name}: {requirement}"


def test_every_rule_declares_an_existing_conda_env():
    for rule_file in (PROJECT / "rules").glob("*.smk"):
        text = rule_file.read_text()
        rules = re.findall(r"^rule (\w+):", text, flags=re.M)
        envs = re.findall(r'conda:\s*\n\s*"\.\./envs/(\w+)\.yaml"', text)
        assert len(envs) == len(rules), rule_file.name
        for env in envs:
            assert (PROJECT / "envs" / f"{env}.yaml").is_file()


def test_constraints_cover_every_direct_requirement():
    constraints = {
        normalized(line.split("==")[0]): line.split("==")[1]
        for line in (PROJECT / "envs" / "constraints.txt").read_text().splitlines()
        if "==" in line
    }
    for name, version in pip_pins().items():
        assert constraints.get(name) == version, name
