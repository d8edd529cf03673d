"""Evaluation through lm-eval on a tiny random Llama and tiny offline suites."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from workflow import evaluate as ev
from workflow.artifacts import digest_of, read_json, write_recipe
from workflow.prompts import LABELS, TOPICS, topic_answer, topic_prompt, topic_record

REPO = Path(__file__).resolve().parents[1]

EU_TOPIC = [
    ("Kalkulu-orri batean gelaxkak hautatu eta formula bat idatzi.", 0),
    ("  Testu-dokumentu batean paragrafoaren estiloa aldatu.\n", 1),
    ("Aurkezpen batean diapositiba berri bat txertatu.", 2),
    ("Marrazki batean forma bat biratu eta kolorea aldatu.", 3),
    ("Formula matematiko bat editorean idatzi.", 4),
    ("Diagrama baten ardatzak eta legenda formateatu.", 5),
    ("Makro bat Basic lengoaian grabatu eta exekutatu.", 6),
]
EN_TOPIC = [
    ("Select cells in a spreadsheet and type a formula.", 0),
    ("Change the paragraph style in a text document.", 1),
    ("Open the database and run a query on the table.", 7),
    ("General settings that apply to every module.", 8),
]
HELDOUT = [
    "Gelaxka bat hautatzeko, egin klik gainean eta sakatu Sartu tekla. " * 3,
    "Aukeratu Formatua - Karaktereak menua testuaren letra-tipoa aldatzeko.",
    "Diapositiba aurkezpenak 1234 [a, b] bezalako testua ere izan dezake.",
]


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")


def _eval_dir(path: Path, topic: list[tuple[str, int]] | None, heldout: list[str]) -> str:
    path.mkdir(parents=True)
    if topic is not None:
        _write_jsonl(
            path / "topic.jsonl",
            [topic_record(t, TOPICS[label]) for t, label in topic],
        )
    _write_jsonl(path / "heldout.jsonl", [{"text": t} for t in heldout])
    recipe = {"stage": "evalset", "version": "1", "params": {"lang": path.name}}
    write_recipe(path, recipe)
    return digest_of(recipe)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A random 2-layer Llama with a byte-level BPE tokenizer trained on the test text."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("model")
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [t for t, _ in EU_TOPIC + EN_TOPIC] + HELDOUT + LABELS
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>",
    )
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    recipe = {"stage": "model", "version": "1", "params": {"tiny": True}}
    write_recipe(directory, recipe)
    return directory, digest_of(recipe)


@pytest.fixture(scope="session")
def suites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    root = tmp_path_factory.mktemp("evalsets")
    return {
        "eu": (root / "eu", _eval_dir(root / "eu", EU_TOPIC, HELDOUT)),
        "en": (root / "en", _eval_dir(root / "en", EN_TOPIC, HELDOUT[:1])),
        "gl": (root / "gl", _eval_dir(root / "gl", None, HELDOUT[1:])),
    }


def _recipe(model_digest: str, suites: dict[str, tuple[Path, str]], limit: int | None) -> dict:
    return {
        "stage": "evaluate",
        "version": "1",
        "model": model_digest,
        "subject": {"kind": "base", "name": "tiny", "lang": "eu"},
        "suites": {
            "eu": {"tasks": ["topic", "bpb"], "data": suites["eu"][1]},
            "en": {"tasks": ["topic"], "data": suites["en"][1]},
        },
        "params": {"limit": limit, "batch_size": 4, "num_fewshot": 0, "max_length": None,
                   "dtype": "float32", "chat_template": "auto", "fewshot_as_multiturn": True},
    }


def _run_cli(recipe: dict, model: Path, suite_args: list[str], out: Path, cwd: Path):
    cmd = [sys.executable, "-m", "workflow.evaluate", "--recipe", json.dumps(recipe),
           "--model", str(model), "--out", str(out), "--threads", "2"]
    for arg in suite_args:
        cmd += ["--suite", arg]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "HF_DATASETS_CACHE")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_cli_scores_every_task_and_metric(tiny_model, suites, tmp_path):
    model, model_digest = tiny_model
    recipe = _recipe(model_digest, suites, limit=5)
    out = tmp_path / "scores" / "score.json"
    proc = _run_cli(recipe, model, [f"eu={suites['eu'][0]}", f"en={suites['en'][0]}"], out,
                    tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    score = read_json(out)
    assert score["digest"] == digest_of(recipe)
    assert score["recipe"] == recipe and score["subject"] == recipe["subject"]
    assert score["lm_eval_version"].startswith("0.4")
    assert score["wall_s"] > 0
    got = {(r["suite"], r["task"], r["kind"], r["metric"]): r for r in score["results"]}
    expected = {
        ("eu", "lrm_topic_eu", "topic", "acc"), ("eu", "lrm_topic_eu", "topic", "acc_norm"),
        ("en", "lrm_topic_en", "topic", "acc"), ("en", "lrm_topic_en", "topic", "acc_norm"),
        ("eu", "lrm_bpb_eu", "bpb", "word_perplexity"),
        ("eu", "lrm_bpb_eu", "bpb", "byte_perplexity"),
        ("eu", "lrm_bpb_eu", "bpb", "bits_per_byte"),
    }
    assert set(got) == expected
    for key, row in got.items():
        if key[2] == "topic":
            assert 0.0 <= row["value"] <= 1.0
            assert row["stderr"] is not None and row["stderr"] >= 0.0
        else:
            assert math.isfinite(row["value"]) and row["value"] > 0
    # A random model over a ~400-token vocabulary is far from compressing text.
    assert got[("eu", "lrm_bpb_eu", "bpb", "bits_per_byte")]["value"] > 1.0
    # limit=5 caps the 7 eu paragraphs; the other files are smaller than the limit.
    assert score["n_samples"] == {"lrm_topic_eu": 5, "lrm_topic_en": 4, "lrm_bpb_eu": 3}
    # The scratch directory (task YAMLs, HF datasets cache) is gone; only the score is left.
    assert [p.name for p in out.parent.iterdir()] == ["score.json"]


def test_topic_prompt_matches_prompts_module(suites, tmp_path, monkeypatch):
    # datasets reads these at import (here, in-process): keep its cache out of ~/.cache.
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    directory = suites["eu"][0]
    planned = [ev.PlannedTask("eu", "lrm_topic_eu", "topic", (directory / "topic.jsonl"))]
    ev.write_task_yamls(planned, tmp_path / "tasks")
    task = ev.make_task_manager(tmp_path / "tasks", with_registry=False).load(
        ["lrm_topic_eu"]
    )["tasks"]["lrm_topic_eu"]
    docs = list(task.test_docs())
    assert len(docs) == len(EU_TOPIC)
    doc = docs[1]  # the paragraph with surrounding whitespace
    assert task.doc_to_text(doc) == topic_prompt(EU_TOPIC[1][0])
    assert task.doc_to_choice(doc) == LABELS
    assert task.doc_to_target(doc) == 1
    # The exact loglikelihood request: prompt, then the answer the SFT data teaches.
    task.build_all_requests(limit=2)
    request = [i for i in task.instances if i.doc_id == 1 and i.idx == 1][0]
    assert request.arguments == (topic_prompt(EU_TOPIC[1][0]), topic_answer(TOPICS[1]))


def test_cli_rejects_missing_suite_dir(tiny_model, suites, tmp_path):
    model, model_digest = tiny_model
    recipe = _recipe(model_digest, suites, limit=None)
    missing = tmp_path / "no-such-evalset"
    proc = _run_cli(recipe, model, [f"eu={suites['eu'][0]}", f"en={missing}"],
                    tmp_path / "score.json", tmp_path)
    assert proc.returncode == 2
    assert "suite en" in proc.stderr and str(missing) in proc.stderr
    assert not (tmp_path / "score.json").exists()


def test_cli_rejects_malformed_and_repeated_suite_args(tiny_model, suites, tmp_path):
    model, model_digest = tiny_model
    recipe = _recipe(model_digest, suites, limit=None)
    eu = f"eu={suites['eu'][0]}"
    for args, message in (([eu, "en"], "--suite must look like NAME=PATH, got 'en'"),
                          ([eu, eu], "--suite eu is given twice")):
        proc = _run_cli(recipe, model, args, tmp_path / "score.json", tmp_path)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "score.json").exists()


def test_inputs_validated_before_running(tiny_model, suites, tmp_path):
    model, model_digest = tiny_model
    recipe = _recipe(model_digest, suites, limit=None)
    dirs = {name: path for name, (path, _) in suites.items()}
    with pytest.raises(ev.EvaluateError, match=r"--suite \['gl'\] not in the recipe"):
        ev.plan_tasks(recipe, dirs)
    with pytest.raises(ev.EvaluateError, match=r"recipe suites \['en'\] have no --suite"):
        ev.plan_tasks(recipe, {"eu": dirs["eu"]})
    # A corpus without topic labels has no topic.jsonl: asking for "topic" names the file.
    recipe["suites"]["eu"]["data"] = suites["gl"][1]
    with pytest.raises(ev.EvaluateError, match=r"gl/topic\.jsonl"):
        ev.plan_tasks(recipe, {"eu": dirs["gl"], "en": dirs["en"]})
    with pytest.raises(ev.EvaluateError, match="suite eu: eval data .* digest"):
        ev.plan_tasks(recipe, {"eu": dirs["eu"], "en": dirs["en"]})
    bad = dict(recipe, params={**recipe["params"], "batch_sise": 4})
    with pytest.raises(ev.EvaluateError, match="batch_sise"):
        ev.validate_recipe(bad)
    for value in ("yes", 1, None):  # 1 == True in Python: refused all the same
        bad = dict(recipe, params={**recipe["params"], "chat_template": value})
        with pytest.raises(ev.EvaluateError, match=r"params\.chat_template must be true"):
            ev.validate_recipe(bad)
    bad = dict(recipe, params={**recipe["params"], "fewshot_as_multiturn": "no"})
    with pytest.raises(ev.EvaluateError, match=r"params\.fewshot_as_multiturn"):
        ev.validate_recipe(bad)
    with pytest.raises(ev.EvaluateError, match="model directory .* lacks config.json"):
        ev.check_model_dir(tmp_path, model_digest)
    ev.check_model_dir(model, model_digest)
    with pytest.raises(ev.EvaluateError, match="model .* digest"):
        ev.check_model_dir(model, "0" * 12)


def test_bad_label_named_with_line(tmp_path):
    path = tmp_path / "topic.jsonl"
    _write_jsonl(path, [{"text": "a", "prompt": topic_prompt("a"), "label": 0},
                        {"text": "b", "prompt": topic_prompt("b"), "label": len(LABELS)}])
    with pytest.raises(ev.EvaluateError, match=r"topic\.jsonl:2: 'label'"):
        ev._check_records(path, "topic")
    # An evalset from before the prompt field would be scored on the literal word "prompt".
    _write_jsonl(path, [{"text": "a", "label": 0}])
    with pytest.raises(ev.EvaluateError, match=r"topic\.jsonl:1: 'prompt' must be"):
        ev._check_records(path, "topic")


def test_cli_rejects_unknown_registry_task(tiny_model, suites, tmp_path):
    # Exercises the include_defaults=True path (lm-eval indexes its registry, ~8 s).
    model, model_digest = tiny_model
    recipe = _recipe(model_digest, suites, limit=None)
    recipe["suites"]["en"]["tasks"] = ["topic", "no_such_task_xyz"]
    out = tmp_path / "out" / "score.json"
    proc = _run_cli(recipe, model, [f"eu={suites['eu'][0]}", f"en={suites['en'][0]}"], out,
                    tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "suite en: task 'no_such_task_xyz'" in proc.stderr
    assert list(out.parent.iterdir()) == []  # no score, no scratch left behind


def test_collect_results_flattens_groups_tags_and_filters():
    # The shape simple_evaluate returns, for a group with aggregate metrics and a tag.
    raw = {
        "results": {
            "lrm_topic_eu": {"alias": "lrm_topic_eu", "name": "x", "sample_len": 7,
                             "acc,none": 0.5, "acc_stderr,none": 0.1},
            "grp": {"alias": "grp", "acc,none": 0.25, "acc_stderr,none": "N/A"},
            "grp_a": {"alias": " - grp_a", "acc,none": 0.25, "acc_stderr,none": 0.05},
            "tagged_1": {"alias": "tagged_1", "exact_match,strict-match": 0.75,
                         "exact_match_stderr,strict-match": 0.2},
        },
        "group_subtasks": {"grp": ["grp_a"]},
        "n-samples": {"lrm_topic_eu": {"original": 9, "effective": 7},
                      "grp_a": {"original": 4, "effective": 4},
                      "tagged_1": {"original": 3, "effective": 3}},
    }
    planned = [ev.PlannedTask("eu", "lrm_topic_eu", "topic", Path("t.jsonl")),
               ev.PlannedTask("eu", "grp", "grp"), ev.PlannedTask("en", "tag", "tag")]
    rows, n_samples = ev.collect_results(raw, planned, tags={"tag": ["tagged_1"]})
    assert [(r["suite"], r["task"], r["kind"], r["metric"], r["value"], r["stderr"])
            for r in rows] == [
        ("eu", "lrm_topic_eu", "topic", "acc", 0.5, 0.1),
        ("eu", "grp", "grp", "acc", 0.25, None),
        ("eu", "grp_a", "grp", "acc", 0.25, 0.05),
        ("en", "tagged_1", "tag", "exact_match,strict-match", 0.75, 0.2),
    ]
    assert n_samples == {"lrm_topic_eu": 7, "grp_a": 4, "tagged_1": 3}


# ----------------------------------------------------------------------------- chat template

# A minimal Zephyr-style template: each turn tagged with its role, then the assistant's tag.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="session")
def chat_model(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The tiny model as an instruct model: the same weights, a chat template in its tokenizer."""
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(tiny_model[0], directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    recipe = {"stage": "model", "version": "1", "params": {"tiny": True, "chat": True}}
    write_recipe(directory, recipe)
    return directory, digest_of(recipe)


def test_chat_template_renders_each_prompt_as_a_user_turn(chat_model, suites, tmp_path,
                                                         monkeypatch):
    from lm_eval.models.huggingface import HFLM

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    directory = suites["eu"][0]
    planned = [ev.PlannedTask("eu", "lrm_topic_eu", "topic", directory / "topic.jsonl")]
    tokenizer = ev.load_tokenizer(chat_model[0])
    assert ev.resolve_chat_template("auto", tokenizer, "chat model") == CHAT_TEMPLATE
    lm = HFLM(pretrained=str(chat_model[0]), tokenizer=tokenizer, batch_size=2, device="cpu")
    requests = {}
    for applied in (False, True):
        task = ev.make_task_manager(ev.process_task_dir(planned), False).load(
            ["lrm_topic_eu"])["tasks"]["lrm_topic_eu"]
        task.build_all_requests(limit=2, apply_chat_template=applied,
                                chat_template=lm.apply_chat_template if applied else None)
        requests[applied] = [i for i in task.instances if i.doc_id == 1 and i.idx == 1][0]
    prompt = topic_prompt(EU_TOPIC[1][0])
    assert requests[False].arguments == (prompt, topic_answer(TOPICS[1]))
    # With the template: the prompt is the user's turn, the answer opens the assistant's.
    context, answer = requests[True].arguments
    assert context == f"<|user|>\n{prompt}</s>\n<|assistant|>\n"
    # lm-eval drops the " " target delimiter after the assistant's tag.
    assert answer == LABELS[1] == topic_answer(TOPICS[1]).lstrip()


def test_score_file_records_the_chat_template(tiny_model, chat_model, suites, tmp_path):
    eu = {"eu": suites["eu"][0], "en": suites["en"][0]}
    scores = {}
    indexed = ev.make_task_manager.cache_info()
    for name, (model, digest), setting in (("chat", chat_model, "auto"),
                                           ("plain", tiny_model, "auto"),
                                           ("off", chat_model, False)):
        recipe = _recipe(digest, suites, limit=3)
        recipe["params"]["chat_template"] = setting
        scores[name] = ev.evaluate(recipe, model, eu, tmp_path / name / "score.json", 1)
        assert read_json(tmp_path / name / "score.json") == scores[name]
    # Three evaluations in one process: each job's HF cache went to its own scratch directory,
    # removed after it (not to the first job's, which datasets would recreate), ...
    for name in scores:
        assert [p.name for p in (tmp_path / name).iterdir()] == ["score.json"]
    # ... and the same tasks were indexed once (one TaskManager for the three).
    cached = ev.make_task_manager.cache_info()
    assert (cached.hits - indexed.hits, cached.misses - indexed.misses) in ((2, 1), (3, 0))
    sha = hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest()
    assert scores["chat"]["chat_template"] == {"applied": True, "sha256": sha}
    assert scores["plain"]["chat_template"] == {"applied": False, "sha256": None}
    assert scores["off"]["chat_template"] == {"applied": False, "sha256": None}
    # The setting is in the recipe, so in the digest: the same model scored both ways is two
    # score files.
    assert scores["chat"]["digest"] != scores["off"]["digest"]
    assert scores["chat"]["recipe"]["params"]["chat_template"] == "auto"
    # true requires a template: named, before any model is loaded.
    recipe = _recipe(tiny_model[1], suites, limit=3)
    recipe["params"]["chat_template"] = True
    with pytest.raises(ev.EvaluateError, match=r"params\.chat_template is true but model .* "
                       "has no chat template"):
        ev.evaluate(recipe, tiny_model[0], eu, tmp_path / "true" / "score.json", 1)
    assert not (tmp_path / "true" / "score.json").exists()


def test_plan_sets_the_chat_template_per_model_role(tmp_path):
    from workflow_utils import PROJECT, tiny_config

    from workflow.config import validate_config
    from workflow.plan import Plan

    def settings(config) -> dict[str, set]:
        plan = Plan(validate_config(config, PROJECT), workdir=tmp_path)
        found: dict[str, set] = {}
        for artifact in plan.evaluations:
            params = artifact.recipe["params"]
            found.setdefault(artifact.recipe["subject"]["kind"], set()).add(
                (params["chat_template"], params["fewshot_as_multiturn"]))
        return found

    config = tiny_config()
    # Defaults: instruct roles as they were tuned (sft.chat_template: auto), bases false; no
    # few-shot examples, so multi-turn is off (it would change nothing).
    assert settings(config) == {"base": {(False, False)}, "ct": {(False, False)},
                                "sft": {("auto", False)}, "ctsft": {("auto", False)},
                                "merge": {("auto", False)}}
    config["evaluation"]["num_fewshot"] = 2
    assert settings(config) == {"base": {(False, False)}, "ct": {(False, False)},
                                "sft": {("auto", True)}, "ctsft": {("auto", True)},
                                "merge": {("auto", True)}}
    config["sft"]["chat_template"] = False  # SFT trained on the plain format: scored on it
    assert settings(config) == {"base": {(False, False)}, "ct": {(False, False)},
                                "sft": {(False, False)}, "ctsft": {(False, False)},
                                "merge": {(False, False)}}
    config["evaluation"]["chat_template"] = {"sft": True, "merge": "auto"}
    assert settings(config) == {"base": {(False, False)}, "ct": {(False, False)},
                                "sft": {(True, True)}, "ctsft": {(False, False)},
                                "merge": {("auto", True)}}  # ctsft: still as tuned
    config["evaluation"]["fewshot_as_multiturn"] = False
    assert {kind: {multiturn for _, multiturn in found}
            for kind, found in settings(config).items()} == dict.fromkeys(
        ("base", "ct", "sft", "ctsft", "merge"), {False})
    config["evaluation"]["chat_template"] = {"sft": "yes"}
    with pytest.raises(ValueError, match="chat_template"):
        validate_config(config, PROJECT)


def test_task_dirs_of_killed_processes_are_removed(tmp_path, monkeypatch):
    """A SIGKILLed evaluation leaves its task directory behind (no exit hooks): the next
    evaluation process removes those whose process is gone, and only those."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead_dir = tmp_path / f"lrmerge-tasks-{gone.pid}-abc"
        live_dir = tmp_path / f"lrmerge-tasks-{alive.pid}-def"
        other = tmp_path / "lrmerge-tasks-notapid"
        for directory in (dead_dir, live_dir, other):
            (directory / "x").mkdir(parents=True)
        ev._remove_orphaned_task_roots()
        assert not dead_dir.exists()
        assert live_dir.exists() and other.exists()
    finally:
        alive.kill()
        alive.wait()
