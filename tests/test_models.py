"""Model sources: tokenizer training, scratch config, hf import, gguf's missing-package error."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from workflow.artifacts import read_json
from workflow.models import import_gguf, main, scratch_config, tokenizer_texts

WORDS = {
    "scalc": "cell sheet formula column row sum value range chart pivot".split(),
    "swriter": "page paragraph style font text heading table footnote margin".split(),
}


def write_corpus(path: Path, seed: int, lines: int = 60, prefix: str = "") -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(lines):
            topic = "scalc" if i % 2 else "swriter"
            text = prefix + " ".join(rng.choice(WORDS[topic]) for _ in range(12)) + "."
            handle.write(json.dumps({"text": text, "topic": topic, "split": "train"}) + "\n")
    return path


def tokenizer_recipe(**params) -> str:
    base = {"vocab_size": 300, "mix": {"en": 1.0}, "max_chars": 20_000}
    return json.dumps({"stage": "tokenizer", "version": "1", "params": {**base, **params}})


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpora")
    return {
        "en": write_corpus(root / "en.jsonl", 1),
        "es": write_corpus(root / "es.jsonl", 2, prefix="la hoja de cálculo "),
    }


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, corpora) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    main(
        [
            "tokenizer",
            "--recipe",
            tokenizer_recipe(model_max_length=64),
            "--corpus",
            f"en={corpora['en']}",
            "--out",
            str(out),
        ]
    )
    return out


def test_tokenizer_round_trips_and_declares_special_tokens(tokenizer_dir):
    assert (tokenizer_dir / "tokenizer.json").is_file()
    assert read_json(tokenizer_dir / "recipe.json")["recipe"]["stage"] == "tokenizer"
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    assert len(tok) == 300
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<unk>",
        "</s>",
        "</s>",
        "<pad>",
    )
    assert tok.model_max_length == 64
    # Unseen characters and whitespace survive: byte-level BPE has no unknowns.
    text = "cell formula  Ñandú\n\t漢字 page!"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids
    # No post-processor: special tokens are never added implicitly.
    assert tok(text, add_special_tokens=True)["input_ids"] == ids
    # Merges were learned from the corpus: a frequent word is shorter than its bytes.
    assert len(tok("formula")["input_ids"]) < len("formula")


def test_tokenizer_is_deterministic(tmp_path, corpora, tokenizer_dir):
    again = tmp_path / "again"
    main(
        [
            "tokenizer",
            "--recipe",
            tokenizer_recipe(model_max_length=64),
            "--corpus",
            f"en={corpora['en']}",
            "--out",
            str(again),
        ]
    )
    assert (again / "tokenizer.json").read_bytes() == (
        tokenizer_dir / "tokenizer.json"
    ).read_bytes()


def test_tokenizer_mix_takes_shares_and_caps_chars(corpora):
    texts = tokenizer_texts(corpora, {"en": 3.0, "es": 1.0}, 2000)
    es = sum(len(t) for t in texts if t.startswith("la hoja"))
    en = sum(len(t) for t in texts) - es
    assert (en, es) == (1500, 500)


def test_tokenizer_mix_without_corpus_is_an_error(corpora):
    with pytest.raises(ValueError, match="'gl'"):
        tokenizer_texts(corpora, {"gl": 1.0}, 1000)


def test_scratch_config_takes_vocab_and_ids_from_tokenizer(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    arch = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "max_position_embeddings": 64,
        "tie_embeddings": False,
    }
    config = scratch_config(arch, tok)
    assert (config.vocab_size, config.num_hidden_layers, config.num_key_value_heads) == (300, 2, 2)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    assert not config.tie_word_embeddings
    with pytest.raises(ValueError, match="num_layer"):
        scratch_config({**arch, "num_layer": 2}, tok)
    with pytest.raises(ValueError, match="num_kv_heads 3"):
        scratch_config({**arch, "num_kv_heads": 3}, tok)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_source_imports_a_local_model_dir(tmp_path, tokenizer_dir, dtype):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    arch = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "max_position_embeddings": 64,
    }
    torch.manual_seed(0)
    source = LlamaForCausalLM(scratch_config(arch, tok))
    local = tmp_path / "local"
    source.save_pretrained(local)
    tok.save_pretrained(local)

    out = tmp_path / "imported"
    recipe = {
        "stage": "hf",
        "version": "1",
        "params": {"id": str(local), "revision": None, "dtype": dtype},
    }
    main(["hf", "--recipe", json.dumps(recipe), "--out", str(out)])

    assert (out / "model.safetensors").is_file()
    assert not list(out.glob("*.bin"))
    assert read_json(out / "recipe.json")["recipe"] == recipe
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
    assert model.dtype == getattr(torch, dtype)
    expected = source.model.embed_tokens.weight.to(getattr(torch, dtype))
    assert torch.equal(model.model.embed_tokens.weight, expected)
    again = AutoTokenizer.from_pretrained(out)
    assert again("cell sheet")["input_ids"] == tok("cell sheet")["input_ids"]


def test_gguf_missing_package_names_the_package(tmp_path):
    params = {
        "package": "lrmerge-no-such-gguf",
        "module": "lrmerge_no_such_gguf",
        "file": "model.gguf",
        "dtype": "float32",
    }
    recipe = {"stage": "gguf", "version": "1", "params": params}
    out = tmp_path / "gemma"
    with pytest.raises(ModuleNotFoundError, match="pip install lrmerge-no-such-gguf"):
        import_gguf(recipe, out)
    assert not out.exists()
    with pytest.raises(SystemExit, match="lrmerge-no-such-gguf"):
        main(["gguf", "--recipe", json.dumps(recipe), "--out", str(out)])
