"""Config validation: defaults filled, and every error names the key at fault."""

from __future__ import annotations

import pytest
from workflow_utils import PROJECT, tiny_config, with_changes

from workflow.config import ConfigError, load_config_file, validate_config


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
        (lambda c: c["model"].pop("name"), "'model' is missing a required entry"),
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
            "config key 'merges[0]': unknown merge method",
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
