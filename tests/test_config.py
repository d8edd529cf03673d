"""Config validation: defaults filled, and every error names the key at fault."""

from __future__ import annotations

import pytest
from jsonschema import Draft202012Validator
from workflow_utils import PROJECT, tiny_config, with_changes

from workflow.config import (
    ConfigError,
    load_config_file,
    load_schema,
    validate_config,
    validate_fragment,
)


def test_the_shipped_configs_validate_with_defaults_filled():
    config = load_config_file(PROJECT / "config.yaml", PROJECT)
    assert config["evaluation"]["num_fewshot"] == 0  # a default the file leaves out
    assert config["ct"]["train"]["grad_accum"] == 1
    assert config["resources"]["default"] == {"threads": 1, "mem_mb": 2000, "gpu": 0}
    validate_config(tiny_config(), PROJECT)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.update(budget=[1]), "config key 'budget' is not a known key"),
        (lambda c: c["ct"]["train"].update(lr="fast"), "config key 'ct.train.lr'"),
        (lambda c: c["ct"]["train"].update(learning_rate=1e-3), "'ct.train.learning_rate'"),
        (lambda c: c.update(budgets=[]), "config key 'budgets'"),
        (lambda c: c["model"].update(source="onnx"), "config key 'model.source'"),
        (lambda c: c["model"].pop("name"), "config key 'model.name' is required"),
        (
            lambda c: c["languages"]["eu"].update(corpus="basque"),
            "config key 'languages.eu.corpus': corpus 'basque' is not defined",
        ),
        (
            lambda c: c["corpora"]["eu"].update(path="nowhere/eu.jsonl"),
            "config key 'corpora.eu.path': file not found",
        ),
        (lambda c: c["ct"]["train"].update(min_lr=1.0), "config key 'ct.train.min_lr'"),
        (
            lambda c: c["languages"]["eu"].update(ct_train={"min_lr": 1.0}),
            "config key 'languages.eu.ct_train.min_lr'",
        ),
        (
            lambda c: c["merges"][0].update(method="average"),
            "config key 'merges[0].method': 'average' is not one of ['breadcrumbs'",
        ),
        (lambda c: c["merges"][1].update(slack=0.1), "config key 'merges[1]'"),
        (
            lambda c: c["merges"][1]["models"]["ct"].update(density=[0.5, 1.5]),
            "config key 'merges[1]'",
        ),
        (
            lambda c: c["model"]["scratch"]["architecture"].update(num_heads=3),
            "config key 'model.scratch.architecture.hidden_size'",
        ),
        (lambda c: c["sft"].update(source="hf"), "config key 'sft.hf'"),
        (lambda c: c["evaluation"].update(english="english"), "config key 'evaluation.english'"),
    ],
)
def test_bad_config_errors_name_the_key(change, message):
    with pytest.raises(ConfigError) as error:
        validate_config(with_changes(tiny_config(), change), PROJECT)
    assert message in str(error.value)


def test_validation_does_not_modify_its_input():
    config = tiny_config()
    validate_config(config, PROJECT)
    assert config == tiny_config()


def test_per_language_ct_overrides_are_checked_like_ct_train():
    bad = with_changes(tiny_config(), lambda c: c["languages"]["eu"].update(ct_train={"lora": 3}))
    with pytest.raises(ConfigError, match=r"languages\.eu\.ct_train\.lora"):
        validate_config(bad, PROJECT)
    good = with_changes(tiny_config(), lambda c: c["languages"]["eu"].update(ct_train={"lr": 2e-3}))
    validate_config(good, PROJECT)


def test_the_train_fragment_fills_every_training_default():
    """The schema is the one source of training defaults: stages validate their recipe's
    train settings with it (validate_fragment) instead of keeping their own."""
    train = validate_fragment(
        "train", {"lr": 1e-3, "min_lr": 0, "batch_size": 1, "seq_len": 8}, "params.train"
    )
    assert train == {
        "lr": 1e-3, "min_lr": 0, "batch_size": 1, "seq_len": 8, "warmup_ratio": 0.03,
        "grad_accum": 1, "weight_decay": 0.0, "epochs": 1, "seed": 0, "save_steps": None,
        "gradient_checkpointing": False, "bf16": "auto", "lora": None, "fsdp": None,
    }
    lora = validate_fragment("train", {**train, "lora": {"r": 4}}, "params.train")["lora"]
    assert lora == {"r": 4, "alpha": 16, "dropout": 0.0, "target_modules": [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    all_linear = {**train, "lora": {"target_modules": "all-linear"}}
    assert validate_fragment("train", all_linear, "t")["lora"]["target_modules"] == "all-linear"
    with pytest.raises(ConfigError, match=r"^'params\.train\.lora\.dropout': 1 is greater"):
        validate_fragment("train", {**train, "lora": {"dropout": 1}}, "params.train")
    with pytest.raises(ConfigError, match=r"^'params\.train\.min_lr': must not exceed lr"):
        validate_fragment("train", {**train, "min_lr": 1.0}, "params.train")


def test_every_merge_parameter_of_the_registry_can_be_set_from_the_config():
    """The schema's merge entries are derived from the method registry, so no parameter is
    left unreachable (model_stock's filter_wise was) and none is listed twice by hand."""
    from workflow.merge.methods import MERGE_METHODS

    schema = load_schema()
    entry = schema["properties"]["merges"]["items"]
    per_model = schema["$defs"]["per_model_params"]["properties"]
    samples = {bool: True, float: 0.5, int: 3}
    for name, method in MERGE_METHODS.items():
        assert name in entry["properties"]["method"]["enum"]
        for spec in method.params:
            assert spec.name in entry["properties"], (name, spec.name)
            config = {"method": name, spec.name: samples[spec.kind]}
            assert not list(Draft202012Validator(entry | {"$defs": schema["$defs"]})
                            .iter_errors(config)), (name, spec.name)
        for spec in method.model_params:
            assert spec.name in per_model, (name, spec.name)
    stock = {"method": "model_stock", "filter_wise": True, "single": False}
    config = with_changes(tiny_config(), lambda c: c["merges"].append(stock))
    assert validate_config(config, PROJECT)["merges"][-1]["filter_wise"] is True


def test_load_schema_returns_a_copy_of_a_cached_schema():
    first = load_schema()
    first["properties"].clear()
    assert load_schema()["properties"]["merges"]
    assert load_schema()["properties"]["integrity"]["properties"]["allow_nonfinite"][
        "default"] is False
