"""Task families: a task indexed by language (``belebele_{code}``), declared once.

The registry is ``families.yaml`` beside this file (the offline task templates
``_lrm_topic.yaml`` / ``_lrm_bpb.yaml`` live here too, read by ``workflow.evaluate``). The planner
expands a family per language (:func:`family_task`); the report maps a scored task back to its
family and language (:func:`task_index`). Only ``yaml`` is imported: planning stays light.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

FAMILIES_FILE = Path(__file__).resolve().parent / "families.yaml"
_KEYS = {"task", "metric", "multiple_choice", "title", "codes"}


class FamilyError(ValueError):
    """A bad family registry or an unknown family/language; the message names it."""


@dataclass(frozen=True)
class Family:
    name: str
    task: str  # lm-eval task name with {code}; "topic" / "bpb" for the offline tasks
    metric: str
    multiple_choice: bool
    title: str
    codes: dict[str, str] = field(default_factory=dict)

    def task_for(self, lang: str) -> str:
        return self.task.format(code=self.codes.get(lang, lang))


def parse_families(data: Any, source: str) -> dict[str, Family]:
    """Families from the registry's parsed YAML; errors name ``source`` and the key."""
    if not isinstance(data, dict) or not isinstance(data.get("families"), dict):
        raise FamilyError(f"{source}: needs a top-level 'families' mapping")
    families = {}
    for name, spec in data["families"].items():
        where = f"{source}: families.{name}"
        if not isinstance(spec, dict):
            raise FamilyError(f"{where} must be a mapping")
        unknown = sorted(set(spec) - _KEYS)
        if unknown:
            raise FamilyError(f"{where} has unknown keys {unknown}; known: {sorted(_KEYS)}")
        for key in ("task", "metric"):
            if not isinstance(spec.get(key), str) or not spec[key]:
                raise FamilyError(f"{where}.{key} must be a non-empty string")
        codes = spec.get("codes", {})
        if not isinstance(codes, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in codes.items()
        ):
            raise FamilyError(f"{where}.codes must map language codes to task codes")
        if "{code}" not in spec["task"] and spec["task"] not in ("topic", "bpb"):
            raise FamilyError(f"{where}.task {spec['task']!r} needs a {{code}} placeholder")
        families[name] = Family(name, spec["task"], spec["metric"],
                                bool(spec.get("multiple_choice", False)),
                                str(spec.get("title", name)), dict(codes))
    return families


@functools.cache
def load_families(path: Path = FAMILIES_FILE) -> dict[str, Family]:
    return parse_families(yaml.safe_load(path.read_text(encoding="utf-8")), str(path))


def family_task(name: str, lang: str) -> str:
    """The task a family runs for one language (config code), e.g. belebele/eu ->
    belebele_eus_Latn."""
    families = load_families()
    if name not in families:
        raise FamilyError(f"config key 'evaluation.families': unknown task family {name!r}; "
                          f"known: {sorted(families)} ({FAMILIES_FILE})")
    return families[name].task_for(lang)


def task_index(langs: list[str]) -> dict[str, tuple[str, str]]:
    """Every family's task name for these languages -> (family, language)."""
    return {family.task_for(lang): (family.name, lang)
            for family in load_families().values() for lang in langs}
