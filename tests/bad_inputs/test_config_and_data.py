"""Bad config files, config values, local models and corpora: each is refused before any job
runs, in one sentence that names the culprit (key, file and line, or path).

Most cases call the validating functions directly; the ones about how Snakemake hands the
config over (a --configfile with a duplicate key, the default config.yaml with a syntax error,
--config lists, a local model directory) run real Snakemake dry runs.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from snakemake.cli import parse_config
from workflow_utils import PROJECT, SNAKEMAKE, snakemake, tiny_config, with_changes

from workflow.config import ConfigError, load_workflow_config, read_config_file, validate_config
from workflow.corpus import CorpusError, read_corpus

TINY_TEXT = (PROJECT / "tests" / "configs" / "tiny.yaml").read_text()


def run_snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """A dry run of the project's Snakefile in ``workdir`` (config files as the args say)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [*SNAKEMAKE, "--snakefile", str(PROJECT / "Snakefile"), "--directory", str(workdir),
         "--cores", "1", "--dry-run", *args],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )


def assert_refused_before_any_job(result: subprocess.CompletedProcess, workdir: Path,
                                  *names: str) -> str:
    """Snakemake failed at parse time with one ``invalid config`` sentence naming ``names``."""
    text = result.stdout + result.stderr
    assert result.returncode != 0, text[-3000:]
    lines = [line for line in text.splitlines() if line.startswith("invalid config: ")]
    assert len(lines) == 1, text[-3000:]
    for name in names:
        assert name in lines[0], lines[0]
    assert "Job stats" not in text and "rule " not in text, text[-3000:]
    assert not (workdir / "results").exists() and not (workdir / "logs").exists()
    return lines[0]


def hf_dir(root: Path, *files: str) -> Path:
    """A local model directory holding ``files`` (contents do not matter at parse time)."""
    root.mkdir(parents=True)
    for name in files:
        (root / name).write_text("{}")
    return root


def refusal(config: dict[str, Any], workdir: Path) -> str:
    with pytest.raises(ConfigError) as error:
        validate_config(config, workdir)
    return str(error.value)


# --------------------------------------------------------------------------------------------
# 1, 2: config files are read strictly (duplicate keys, syntax errors: file and line)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            TINY_TEXT.replace("  eu: {corpus: eu}\n", "  eu: {corpus: eu}\n  eu: {corpus: ca}\n"),
            [":23: duplicate key 'languages.eu' (first given at line 22)"],
            id="duplicate-language",
        ),
        pytest.param(
            "merges:\n  - method: ties\n    lambda: 1.0\n    method: linear\n",
            [":4: duplicate key 'merges[0].method' (first given at line 2)"],
            id="duplicate-key-in-a-list-item",
        ),
        pytest.param(
            "budgets: [1000, 2000\nct: {}\n",
            [":2: not valid YAML (expected ',' or ']'", "flow sequence started at line 1"],
            id="unclosed-list",
        ),
        pytest.param(
            "model:\n  name: tiny\n\tsource: scratch\n",
            [":3: not valid YAML"],
            id="tab-indentation",
        ),
        pytest.param("- model\n- budgets\n", [": the top level must be a mapping"], id="a-list"),
    ],
)
def test_config_file_errors_name_file_and_line(tmp_path, text, expected):
    path = tmp_path / "my.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        read_config_file(path)
    for part in expected:
        assert f"{path}{part}" in str(error.value) or part in str(error.value)
    assert str(error.value).startswith(str(path))


def test_config_file_with_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_bytes(b"model:\n  name: caf\xe9\n")
    with pytest.raises(ConfigError, match=rf"^{path}:2: not valid UTF-8"):
        read_config_file(path)


def test_snakemake_refuses_a_duplicate_key_in_a_configfile(tmp_path):
    """Snakemake's own loader keeps the last 'eu' (Catalan text for Basque) without a word."""
    path = tmp_path / "my.yaml"
    path.write_text(
        TINY_TEXT.replace("  eu: {corpus: eu}\n", "  eu: {corpus: eu}\n  eu: {corpus: ca}\n")
    )
    result = run_snakemake(tmp_path, "--configfile", str(path))
    assert_refused_before_any_job(result, tmp_path, f"{path}:23: duplicate key 'languages.eu'")


def test_snakemake_names_the_line_of_a_syntax_error_in_the_default_config(tmp_path):
    """Without --configfile the workflow reads ./config.yaml itself, strictly."""
    (tmp_path / "config.yaml").write_text(TINY_TEXT.replace("budgets: [2000]", "budgets: [2000"))
    line = TINY_TEXT.splitlines().index("budgets: [2000]") + 2  # the parser notices one later
    result = run_snakemake(tmp_path)
    assert_refused_before_any_job(
        result, tmp_path, f"{tmp_path / 'config.yaml'}:{line}: not valid YAML"
    )


def test_the_config_checker_names_the_line_snakemake_omits(tmp_path):
    """Snakemake parses a --configfile before the Snakefile runs and reports a syntax error in it
    without a line; ``python -m workflow.config FILE`` gives the line."""
    path = tmp_path / "my.yaml"
    path.write_text("model: {name: tiny, source: scratch\nbudgets: [1000]\n")
    result = subprocess.run([SNAKEMAKE[0], "-m", "workflow.config", str(path)], cwd=PROJECT,
                            capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert result.stderr.startswith(f"invalid config: {path}:2: not valid YAML"), result.stderr


# --------------------------------------------------------------------------------------------
# 3: --config values inside lists and mappings are typed as YAML types them
# --------------------------------------------------------------------------------------------


def test_config_overrides_with_numbers_in_lists_plan_a_run(tmp_path):
    """parse_config leaves '1000' and '0.5' strings; the workflow types them, so a grid given on
    the command line plans the same jobs as one written in the file."""
    grid = "merges=[{method: ties, lambda: [0.5, 1.0], normalize: [true, false]}]"
    result = snakemake(
        tmp_path, tiny_config(), "--dry-run", "--config", "budgets=[1000,2000]", grid, check=False
    )
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-3000:]
    assert "results/data/tiny/eu/1000/" in text and "results/data/tiny/eu/2000/" in text
    labels = {label.lower() for label in re.findall(r"lambda[\d.]+-normalize\w+", text)}
    assert labels == {"lambda0.5-normalizetrue", "lambda0.5-normalizefalse",
                      "lambda1-normalizetrue", "lambda1-normalizefalse"}
    assert not (tmp_path / "results").exists()


def test_config_override_of_the_wrong_type_is_still_refused(tmp_path):
    """Typing is YAML's, not a guess from the schema: a word stays a word and is refused."""
    config_file = tmp_path / "my.yaml"
    config_file.write_text(TINY_TEXT)
    overrides = parse_config(["budgets=[1000,lots]", "ct={train: {lr: 1e-3}}"])
    assert overrides["budgets"] == ["1000", "lots"]  # what Snakemake hands the Snakefile
    with pytest.raises(ConfigError, match=r"^config key 'budgets\[1\]': 'lots' is not of type"):
        load_workflow_config([config_file], overrides, PROJECT)
    del overrides["budgets"]
    assert load_workflow_config([config_file], overrides, PROJECT)["ct"]["train"]["lr"] == 1e-3


# --------------------------------------------------------------------------------------------
# 4: corpora that are not UTF-8 (or not gzip) name the file and line
# --------------------------------------------------------------------------------------------


def write_corpus(path: Path, lines: list[bytes]) -> Path:
    data = b"".join(line + b"\n" for line in lines)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)
    return path


GOOD_JSON = json.dumps({"text": "Kaixo mundua, hau dokumentu bat da."}).encode()
BAD_JSON = b'{"text": "Latin-1 here: caf\xe9"}'


@pytest.mark.parametrize(
    ("name", "lines", "line"),
    [
        pytest.param("c.jsonl", [GOOD_JSON, GOOD_JSON, BAD_JSON], 3, id="jsonl"),
        pytest.param("c.jsonl.gz", [GOOD_JSON, BAD_JSON], 2, id="jsonl-gz"),
        pytest.param("c.txt", [b"first doc", b"", b"second doc caf\xe9"], 3, id="txt"),
        pytest.param("c.txt.gz", [b"\xff\xfe utf-16 bom"], 1, id="txt-gz"),
    ],
)
def test_invalid_utf8_in_a_corpus_names_file_and_line(tmp_path, name, lines, line):
    path = write_corpus(tmp_path / name, lines)
    with pytest.raises(CorpusError, match=rf"^{path}:{line}: not valid UTF-8 \(byte 0x"):
        read_corpus(path)


def test_a_corrupt_gzip_corpus_names_the_file(tmp_path):
    path = tmp_path / "c.jsonl.gz"
    path.write_bytes(gzip.compress(GOOD_JSON + b"\n")[:-12])  # truncated
    with pytest.raises(CorpusError, match=rf"^{path}: not a readable gzip file"):
        read_corpus(path)


def test_the_data_stage_reports_invalid_utf8_with_the_line(tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", [GOOD_JSON, BAD_JSON])
    out = tmp_path / "evalset"
    recipe = {"stage": "evalset", "version": "1",
              "params": {"heldout_fraction": 0.5, "max_topic_docs": 4, "max_heldout_docs": 4}}
    result = subprocess.run(
        [SNAKEMAKE[0], "-m", "workflow.data", "evalset", "--recipe", json.dumps(recipe),
         "--corpus", str(corpus), "--out", str(out)],
        capture_output=True, text=True, check=False, cwd=PROJECT,
    )
    assert result.returncode != 0
    assert f"error: {corpus}:2: not valid UTF-8 (byte 0xe9 at column 28)" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


# --------------------------------------------------------------------------------------------
# 5: local model directories are checked at parse time
# --------------------------------------------------------------------------------------------


def hf_base(model_id: str):
    return lambda c: c["model"].update(source="hf", hf={"id": model_id})


def hf_sft(model_id: str):
    return lambda c: c["sft"].update(source="hf", hf={"id": model_id})


def released(model_id: str):
    return lambda c: c["languages"]["eu"].update(released_ct=[{"tokens": 2000, "id": model_id}])


@pytest.mark.parametrize(
    ("change", "files", "expected"),
    [
        pytest.param(hf_base("/nonexistent/llama"), None,
                     ["config key 'model.hf.id': local model directory not found: "
                      "/nonexistent/llama"], id="missing-absolute-dir"),
        pytest.param(hf_base("./models/base"), None,
                     ["config key 'model.hf.id': local model directory not found: ",
                      "models/base"], id="missing-relative-dir"),
        pytest.param(hf_sft("~/no-such-lrmerge-model"), None,
                     ["config key 'sft.hf.id': local model directory not found: ",
                      "no-such-lrmerge-model"], id="missing-home-dir"),
        pytest.param(released("checkpoints/eu/final"), None,
                     ["config key 'languages.eu.released_ct[0].id': local model directory not "
                      "found: ", "checkpoints/eu/final"], id="released-ct-path-with-two-slashes"),
        pytest.param(hf_sft("./sft"), ["model.safetensors", "tokenizer.json"],
                     ["config key 'sft.hf.id': local model directory ", "has no config.json"],
                     id="dir-without-config-json"),
        pytest.param(hf_sft("./sft"), ["config.json", "pytorch_model.bin", "tokenizer.json"],
                     ["config key 'sft.hf.id'", "holds only PyTorch .bin weights",
                      "save_pretrained(dir, safe_serialization=True)"], id="dir-with-only-bin"),
        pytest.param(hf_sft("./sft"), ["config.json", "tokenizer.json"],
                     ["config key 'sft.hf.id'", "has no *.safetensors weights"],
                     id="dir-without-weights"),
        pytest.param(hf_sft("./sft"), ["config.json", "model.safetensors"],
                     ["config key 'sft.hf.id'", "has no tokenizer"], id="dir-without-tokenizer"),
    ],
)
def test_local_model_errors_name_the_key_and_path(tmp_path, change, files, expected):
    if files is not None:
        hf_dir(tmp_path / "sft", *files)
    message = refusal(with_changes(tiny_config(), change), tmp_path)
    for part in expected:
        assert part in message


def test_hub_ids_and_complete_local_dirs_pass(tmp_path):
    hf_dir(tmp_path / "sft", "config.json", "model-00001-of-00002.safetensors", "tokenizer.json")
    for change in (hf_sft("./sft"), hf_sft(str(tmp_path / "sft")), hf_sft("pkupie/FLAN-7b"),
                   released("HiTZ/Latxa-Llama-3.1-8B")):
        validate_config(with_changes(tiny_config(), change), tmp_path)


def test_snakemake_refuses_a_local_model_with_only_bin_weights(tmp_path):
    hf_dir(tmp_path / "models" / "sft", "config.json", "pytorch_model.bin", "tokenizer.json")
    config = with_changes(tiny_config(), hf_sft("./models/sft"))
    result = snakemake(tmp_path, config, "--dry-run", check=False)
    assert_refused_before_any_job(
        result, tmp_path, "config key 'sft.hf.id'", str(tmp_path / "models" / "sft"),
        "safe_serialization=True",
    )


# --------------------------------------------------------------------------------------------
# 6, 7, 8: the schema is the one contract: training settings, merge parameters, integrity
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        pytest.param(lambda c: c["ct"]["train"].update(lora={"dropout": 1}),
                     "config key 'ct.train.lora.dropout': 1 is greater than or equal to the "
                     "maximum of 1", id="lora-dropout-1"),
        pytest.param(lambda c: c["sft"]["train"].update(lora={"target_modules": "attention"}),
                     "config key 'sft.train.lora.target_modules': 'attention' is not valid",
                     id="lora-target-modules-string"),
        pytest.param(lambda c: c["ct"]["train"].update(lora={}, fsdp="full_shard auto_wrap"),
                     "config key 'ct.train.fsdp': cannot be combined with lora",
                     id="lora-with-fsdp"),
        pytest.param(lambda c: c["languages"]["gl"].update(ct_train={"warmup_ratio": 1.0}),
                     "config key 'languages.gl.ct_train.warmup_ratio'", id="warmup-ratio-1"),
        pytest.param(lambda c: c["sft"]["train"].update(lr=1e-5),
                     "config key 'sft.train.min_lr': must not exceed lr (0.0001 > 1e-05)",
                     id="min-lr-above-lr"),
        pytest.param(lambda c: c.update(resources={"ct": {"gpu": 4}}),
                     "config key 'ct.train.grad_accum': 1 must be a multiple of the 4 processes "
                     "of a ct job: 4 GPUs (resources.ct.gpu)", id="grad-accum-vs-gpus"),
        pytest.param(lambda c: (c["ct"]["train"].update(grad_accum=4),
                                c.update(resources={"ct": {"gpu": 2, "nodes": 3}})),
                     "config key 'ct.train.grad_accum': 4 must be a multiple of the 6 processes "
                     "of a ct job: 2 GPUs (resources.ct.gpu) on each of 3 nodes "
                     "(resources.ct.nodes)", id="grad-accum-vs-gpus-across-nodes"),
        pytest.param(lambda c: c["merges"][1].update(lamda=0.5),
                     "config key 'merges[1].lamda' is not a known key (allowed: filter_wise, "
                     "lambda, method, ", id="unknown-merge-parameter"),
        pytest.param(lambda c: c["merges"][1]["models"]["sft"].update(epsilon=[0.1, "x"]),
                     "config key 'merges[1].models.sft.epsilon[1]': 'x' is not of type 'number'",
                     id="merge-grid-with-a-string"),
        pytest.param(lambda c: c["merges"][0].update(filter_wise=True),
                     "config key 'merges[0]': merge method 'linear' has no parameter "
                     "'filter_wise'", id="parameter-of-another-method"),
        pytest.param(lambda c: c.update(integrity={"allow_nonfinite": "yes"}),
                     "config key 'integrity.allow_nonfinite': 'yes' is not of type 'boolean'",
                     id="integrity-not-a-bool"),
    ],
)
def test_bad_values_are_refused_naming_the_key(change, expected):
    assert expected in refusal(with_changes(tiny_config(), change), PROJECT)


def test_yaml_1_2_scalars_keep_language_codes_and_type_exponents(tmp_path):
    """YAML 1.1 reads Norwegian's code 'no' as false and 1e-3 as a string."""
    path = tmp_path / "my.yaml"
    path.write_text("languages:\n  no: {corpus: no}\nct:\n  train: {lr: 1e-3, min_lr: 1E-5}\n")
    config = read_config_file(path)
    assert config["languages"] == {"no": {"corpus": "no"}}
    assert config["ct"]["train"] == {"lr": 1e-3, "min_lr": 1e-5}
    assert yaml.safe_load(path.read_text())["ct"]["train"]["lr"] == "1e-3"  # the lax reading
