"""The plan: readable paths with recipe digests, and digests that change exactly downstream."""

from __future__ import annotations

import pytest
from workflow_utils import PROJECT, tiny_config, with_changes

from workflow.config import validate_config
from workflow.merge.methods import MERGE_METHODS, REQUIRED
from workflow.plan import Plan, _split_budget, merge_variants
from workflow.stages import PATTERNS


def plan_of(config, tmp_path) -> Plan:
    return Plan(validate_config(config, PROJECT), workdir=tmp_path)


def paths_by_rule(plan: Plan) -> dict[str, set[str]]:
    result: dict[str, set[str]] = {}
    for (rule, _), artifact in plan.by_key.items():
        result.setdefault(rule, set()).add(artifact.path)
    return result


def test_paths_carry_readable_wildcards_and_the_digest(tmp_path):
    plan = plan_of(tiny_config(), tmp_path)
    for (rule, digest), artifact in plan.by_key.items():
        assert digest in artifact.path.split("/"), artifact.path
        assert artifact.path.startswith(PATTERNS[rule].split("{")[0])
    cts = paths_by_rule(plan)["ct"]
    assert {p.split("/")[3] for p in cts} == {"eu", "gl"} and all("/2000/" in p for p in cts)


def test_same_config_gives_same_plan_and_a_change_moves_only_downstream(tmp_path):
    before = paths_by_rule(plan_of(tiny_config(), tmp_path))
    assert before == paths_by_rule(plan_of(tiny_config(), tmp_path))
    after = paths_by_rule(
        plan_of(with_changes(tiny_config(), lambda c: c["sft"].update(examples=50)), tmp_path)
    )
    for rule in ("tokenizer", "prepare", "evalset", "pretrain", "ct"):
        assert before[rule] == after[rule], rule
    for rule in ("sft", "ctsft", "merge"):
        assert before[rule].isdisjoint(after[rule]), rule


def test_merge_grid_expands_lists_into_labelled_variants():
    entry = {
        "method": "ties",
        "lambda": [0.5, 1.0],
        "single": True,
        "multilingual": False,
        "models": {
            "ct": {"weight": 1.0, "density": [0.3, 0.6]},
            "sft": {"weight": 1.0, "density": 0.5},
        },
    }
    variants = merge_variants(entry)
    assert len(variants) == 4
    assert len({v.label for v in variants}) == 4
    assert {v.params["lambda"] for v in variants} == {0.5, 1.0}
    assert {v.roles["ct"]["density"] for v in variants} == {0.3, 0.6}
    assert variants[0].params["normalize"] is True  # mergekit's default is filled in


def test_budget_split_is_exact():
    assert _split_budget(1000, {"en": 0.9, "es": 0.1}) == {"en": 900, "es": 100}
    assert sum(_split_budget(1001, {"a": 1, "b": 1, "c": 1}).values()) == 1001


def test_external_files_are_hashed_once(tmp_path):
    plan_of(tiny_config(), tmp_path)
    cache = tmp_path / ".cache" / "lrmerge" / "file-hashes.json"
    assert cache.is_file()
    mtime = cache.stat().st_mtime_ns
    plan_of(tiny_config(), tmp_path)
    assert cache.stat().st_mtime_ns == mtime  # nothing new to hash, nothing rewritten


def test_ct_replay_adds_a_prepared_english_share_to_every_ct(tmp_path):
    config = with_changes(
        tiny_config(), lambda c: c["ct"].update(replay={"corpus": "en", "share": 0.2})
    )
    plan = plan_of(config, tmp_path)
    cts = [a for a in plan.by_key.values() if a.rule == "ct"]
    replay_paths = {a.inputs["replay"] for a in cts}
    assert len(replay_paths) == 1 and "/en/500/" in replay_paths.pop()  # 2000 * 0.2 / 0.8
    assert all(a.recipe["params"]["replay"] == {"share": 0.2} for a in cts)


def _non_default(spec):
    """A valid value of a merge parameter that differs from its default."""
    if spec.kind is bool:
        return not spec.default
    if spec.kind is int:
        return 7
    for value in (0.25, 0.5, 0.05):
        if value != spec.default and spec.check(value):
            return value
    raise AssertionError(spec)


def _entry_with_required(method):
    entry = {"method": method, "single": True, "multilingual": False, "models": {}}
    for spec in MERGE_METHODS[method].params:
        if spec.default is REQUIRED:
            entry[spec.name] = 0.1 if spec.name == "slack" else 0.5
    return entry


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_every_registry_parameter_can_be_set_and_reaches_the_recipe(method):
    """No parameter of the method registry is dropped on the way from config to recipe."""
    registered = MERGE_METHODS[method]
    (base,) = merge_variants(_entry_with_required(method))
    for spec in registered.params:
        entry = _entry_with_required(method)
        entry[spec.name] = _non_default(spec) if spec.default is not REQUIRED else 0.2
        (variant,) = merge_variants(entry)
        assert variant.params[spec.name] == entry[spec.name], spec.name
    for spec in registered.model_params:
        for role in ("ct", "sft"):
            entry = _entry_with_required(method)
            value = _non_default(spec)
            if spec.name == "density" and "slack" in entry:
                value = 0.5  # slack (0.1) may not exceed the SFT density
            entry["models"] = {role: {spec.name: value}}
            (variant,) = merge_variants(entry)
            assert variant.roles[role][spec.name] == value, (role, spec.name)
            assert variant.roles != base.roles


def test_an_unknown_merge_parameter_is_an_error_naming_it():
    with pytest.raises(ValueError, match="'lamda'"):
        merge_variants({"method": "ties", "lamda": 0.5, "single": True, "multilingual": True})
    with pytest.raises(ValueError, match="'densty'"):
        merge_variants({"method": "ties", "single": True, "multilingual": True,
                        "models": {"ct": {"densty": 0.5}}})


def test_model_stock_filter_wise_can_be_set():
    entry = {"method": "model_stock", "filter_wise": True, "single": True, "multilingual": True}
    (variant,) = merge_variants(entry)
    assert variant.params == {"filter_wise": True} and variant.label == "filter_wisetrue"
