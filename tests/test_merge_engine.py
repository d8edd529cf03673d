"""Merge engine features: streaming kernels equal the reference methods bit for bit, sweeps in
one pass, extended vocabularies, tied embeddings, merge-on-load, every method end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from workflow.artifacts import read_json
from workflow.merge.__main__ import main as merge_main
from workflow.merge.engine import load_merged_model, merge_models
from workflow.merge.kernels import Keep, keep_sets, keep_sets_many, stream_merge, stream_plan
from workflow.merge.methods import (
    MERGE_METHODS,
    delta_diagnostics,
    resolve_merge_spec,
    topk_count,
    topk_mask,
)

KERNEL_CASES = [
    ("ties", {"lambda": 0.8}, [{"role": "ct", "density": 0.5}, {"role": "ct", "density": 0.9},
                               {"role": "sft", "density": 0.3, "weight": 1.3}]),
    ("ties_sv", {"slack": 0.2}, [{"role": "ct", "density": 0.5}, {"role": "sft", "density": 0.3}]),
    ("ties_sv", {"slack": 0.1}, [{"role": "ct", "density": 0.5}, {"role": "sft"}]),
    ("task_arithmetic", {"lambda": 0.6}, [{"role": "ct", "weight": 0.5}, {"role": "sft"}]),
    ("linear", {}, [{"role": "ct", "weight": 0.25}, {"role": "sft", "weight": 0.75}]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("method", "params", "models"), KERNEL_CASES)
def test_streaming_kernel_equals_reference(dtype, method, params, models):
    gen = torch.Generator().manual_seed(5)
    n = 120_007  # several chunks of 10k: the sampled-band threshold path
    base = torch.randn(n, generator=gen).to(dtype)
    # bf16 deltas of a few ulps: huge tie groups at the top-k threshold
    xs = [(base.float() + 0.002 * torch.randn(n, generator=gen)).to(dtype) for _ in models]
    spec = MERGE_METHODS[method]
    resolved, per_model, task = resolve_merge_spec(method, params, models)
    expected = spec(base, xs, resolved, per_model, task)
    plan = stream_plan(spec, resolved, per_model, task)
    assert plan is not None
    lams = [resolved.get("lambda", 1.0), 0.5]
    outs = [torch.empty(n, dtype=dtype) for _ in lams]
    threads = torch.get_num_threads()
    stream_merge(plan, base, xs, outs, lams, chunk=10_000)
    assert torch.get_num_threads() == threads  # the caller's setting is restored
    assert _same_bits(outs[0], expected)
    if method != "linear":
        other = spec(base, xs, {**resolved, "lambda": 0.5}, per_model, task)
        assert _same_bits(outs[1], other)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality (torch.equal takes -0.0 for 0.0)."""
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    return a.dtype == b.dtype and torch.equal(a.view(ints[a.dtype]), b.view(ints[b.dtype]))


def _keep_mask(keep: Keep, magnitude: torch.Tensor, chunk: int) -> torch.Tensor:
    out = torch.empty(magnitude.numel(), dtype=torch.bool)
    for start in range(0, magnitude.numel(), chunk):
        end = min(magnitude.numel(), start + chunk)
        keep.mask(magnitude[start:end], start, out[start:end])
    return out


@pytest.mark.parametrize("values", ["ulps", "spread"])
def test_keep_sets_equal_topk_mask_with_huge_tie_groups(values):
    gen = torch.Generator().manual_seed(11)
    n, chunk = 200_003, 7_000
    base = torch.zeros(n)
    if values == "ulps":  # bf16 fine-tunes of 0-2 ulps: a third of the entries tie at each level
        x = torch.randint(-2, 3, (n,), generator=gen).float()
    else:
        x = torch.randn(n, generator=gen) * torch.rand(n, generator=gen)
    ks = [1, topk_count(0.1, n), topk_count(0.5, n), topk_count(0.9, n), n - 1, n, 0]
    found = keep_sets(x, base, ks, chunk, torch.device("cpu"))
    for k, keep in zip(ks, found, strict=True):
        mask = _keep_mask(keep, x.abs(), chunk)
        assert int(mask.sum()) == k
        assert torch.equal(mask, topk_mask(x.abs(), k)), k


def test_keep_sets_many_equal_topk_mask_per_model_and_float_masks():
    gen = torch.Generator().manual_seed(12)
    n, chunk = 150_001, 5_000
    base = torch.randn(n, generator=gen).bfloat16()
    # bf16 fine-tunes: few distinct |deltas|, so the cut falls inside a tie group
    xs = [(base.float() + scale * torch.randn(n, generator=gen)).bfloat16()
          for scale in (1e-2, 3e-3, 1e-3)]
    ks = [[topk_count(0.5, n)], [topk_count(0.2, n), topk_count(0.7, n)], [], [n]]
    found = keep_sets_many([*xs, xs[0]], base, ks, chunk, torch.device("cpu"))
    assert found[2] == [] and found[3] == [Keep.everything()]
    for x, model_ks, keeps in zip(xs, ks, found, strict=False):
        magnitude = (x.float() - base.float()).abs()
        for k, keep in zip(model_ks, keeps, strict=True):
            want = topk_mask(magnitude, k)
            assert keep.cut >= 0  # the tie path is exercised
            assert torch.equal(_keep_mask(keep, magnitude, chunk), want)
            floats = torch.empty(n)
            for start in range(0, n, chunk):
                end = min(n, start + chunk)
                keep.mask(magnitude[start:end], start, floats[start:end])
            assert torch.equal(floats, want.float())


DIAG_CASES = [
    ("ties", {}, [{"role": "ct", "density": 0.5}, {"role": "sft", "density": 0.4}]),
    ("ties_sv", {"slack": 0.2}, [{"role": "ct", "density": 0.5}, {"role": "sft", "density": 0.3}]),
    ("task_arithmetic", {}, [{"role": "ct", "weight": 0.5}, {"role": "ct"}, {"role": "sft"}]),
    ("linear", {}, [{"role": "ct", "weight": 0.25}, {"role": "sft", "weight": 0.75}]),
]


@pytest.mark.parametrize(("method", "params", "models"), DIAG_CASES)
def test_streaming_diagnostics_equal_reference(method, params, models):
    gen = torch.Generator().manual_seed(7)
    n = 60_001
    # Deltas on a zero base: the reference's merged output is then the merged delta itself.
    base = torch.zeros(n)
    xs = [(0.01 * torch.randn(n, generator=gen)).bfloat16().float() for _ in models]
    xs[0][:5000] = 0  # untouched and one-sided entries
    xs[-1][2000:7000] = 0
    spec = MERGE_METHODS[method]
    resolved, per_model, task = resolve_merge_spec(method, params, models)
    plan = stream_plan(spec, resolved, per_model, task)
    ct = [i for i, m in enumerate(models) if m["role"] == "ct"]
    lams = [1.0, -0.5, 0.0] if method != "linear" else [1.0]
    outs = [torch.empty(n) for _ in lams]
    counts = stream_merge(plan, base, xs, outs, lams, diag_ct=ct, diag_task=task, chunk=4_000)
    merged = spec(base, xs, {**resolved, "lambda": 1.0} if method != "linear" else resolved,
                  per_model, task)
    density = per_model[task].get("density", 1.0) if method.startswith("ties") else 1.0
    for lam, got in zip(lams, counts, strict=True):
        want = delta_diagnostics([xs[i] for i in ct], xs[task], merged * lam, density)
        for key in ("conflicts", "both_nonzero", "sft_dropped", "sft_nonzero", "trimmed",
                    "touched"):
            assert getattr(got, key) == getattr(want, key), (lam, key)
        assert got.topk_mass == pytest.approx(want.topk_mass, rel=1e-5)
        assert got.topk_mass_kept == pytest.approx(want.topk_mass_kept, rel=1e-5, abs=1e-9)
    assert counts[0].trimmed > 0 if method.startswith("ties") else True


# ---------------------------------------------------------------- tiny checkpoints


def _save(directory: Path, seed: int, *, vocab: int = 64, tied: bool = False) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if seed:
                param.add_(torch.randn(param.shape, generator=gen) * 0.02)
    model.save_pretrained(directory, safe_serialization=True)
    _tokenizer(vocab).save_pretrained(directory)
    return directory


def _tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"[UNK]": 0, **{f"w{i}": i for i in range(1, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="w1")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    return {"base": _save(root / "base", 0), "ct": _save(root / "ct", 1),
            "sft": _save(root / "sft", 2), "ct_big": _save(root / "ct_big", 3, vocab=80),
            "root": root}


def _recipe(method: str, params: dict, ct: dict | None = None, sft: dict | None = None):
    return {"stage": "merge", "version": "1", "method": method, "params": params, "base": "b",
            "models": [{"role": "ct", **(ct or {})}, {"role": "sft", **(sft or {})}]}


ALL = {
    "linear": ({}, {}, {}),
    "task_arithmetic": ({"lambda": 0.9}, {}, {}),
    "ties": ({}, {"density": 0.5}, {"density": 0.5}),
    "ties_sv": ({"slack": 0.2}, {"density": 0.5}, {"density": 0.5}),
    "dare_ties": ({"seed": 3}, {"density": 0.5}, {"density": 0.5}),
    "dare_linear": ({}, {"density": 0.5}, {"density": 0.7}),
    "breadcrumbs": ({}, {"density": 0.5}, {"density": 0.5}),
    "breadcrumbs_ties": ({}, {"density": 0.5}, {"density": 0.5, "gamma": 0.05}),
    "della": ({}, {"density": 0.5}, {"density": 0.5}),
    "della_linear": ({}, {"density": 0.5, "epsilon": 0.1}, {"density": 0.5}),
    "slerp": ({"t": 0.4}, {}, {}),
    "model_stock": ({}, {}, {}),
}


def test_every_method_end_to_end(ckpts, tmp_path):
    assert set(ALL) == set(MERGE_METHODS)
    base = load_file(ckpts["base"] / "model.safetensors")
    for method, (params, ct, sft) in ALL.items():
        out = tmp_path / method
        merge_models(_recipe(method, params, ct, sft), ckpts["base"],
                     [ckpts["ct"], ckpts["sft"]], out)
        merged = load_file(out / "model.safetensors")
        assert merged.keys() == base.keys()
        assert all(torch.isfinite(t).all() for t in merged.values()), method
        assert not torch.equal(merged["model.layers.0.mlp.up_proj.weight"],
                               base["model.layers.0.mlp.up_proj.weight"]), method
        assert (out / "mergekit.yaml").is_file() == (method != "ties_sv")
        assert "```json" in (out / "README.md").read_text()
        assert set(read_json(out / "diagnostics.json")["overall"]) >= {"sign_conflict"}


def test_random_methods_are_seeded(ckpts, tmp_path):
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        merge_models(_recipe("dare_ties", {"seed": seed}, {"density": 0.5}, {"density": 0.5}),
                     ckpts["base"], [ckpts["ct"], ckpts["sft"]], tmp_path / name)
        runs[name] = load_file(tmp_path / name / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(runs["a"][key], runs["b"][key])
    assert not torch.equal(runs["a"][key], runs["c"][key])


def test_sweep_in_one_pass_equals_separate_merges(ckpts, tmp_path):
    recipes = [_recipe("ties", {"lambda": lam}, {"density": 0.5}, {"density": 0.4})
               for lam in (0.5, 1.0)]
    recipes.append(_recipe("ties", {}, {"density": 0.3}, {"density": 0.3}))
    outs = [tmp_path / f"sweep{i}" for i in range(3)]
    merge_main(["--recipes", json.dumps(recipes), "--base", str(ckpts["base"]),
                "--models", str(ckpts["ct"]), str(ckpts["sft"]),
                "--outs", *map(str, outs)])
    for i, recipe in enumerate(recipes):
        single = tmp_path / f"single{i}"
        merge_models(recipe, ckpts["base"], [ckpts["ct"], ckpts["sft"]], single)
        a = load_file(outs[i] / "model.safetensors")
        b = load_file(single / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert read_json(outs[i] / "recipe.json")["recipe"] == recipe
        assert read_json(outs[i] / "diagnostics.json") == read_json(single / "diagnostics.json")


def test_extended_vocabulary_rows_come_from_the_model_that_has_them(ckpts, tmp_path):
    out = tmp_path / "merged"
    merge_models(_recipe("ties", {}, {"density": 0.5}, {"density": 0.5}), ckpts["base"],
                 [ckpts["ct_big"], ckpts["sft"]], out)
    merged = load_file(out / "model.safetensors")
    big = load_file(ckpts["ct_big"] / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert merged[name].shape == (80, 32)
        assert torch.equal(merged[name][64:], big[name][64:])
    assert read_json(out / "config.json")["vocab_size"] == 80
    assert len(read_json(out / "tokenizer.json")["model"]["vocab"]) == 80
    # the other order: a base with more rows than a model is never cropped
    with pytest.raises(ValueError, match=r"'(lm_head|model\.embed_tokens)\.weight' .*cropped"):
        merge_models(_recipe("ties", {}, {"density": 0.5}, {"density": 0.5}), ckpts["ct_big"],
                     [ckpts["ct"], ckpts["sft"]], tmp_path / "bad")


def test_shape_mismatch_in_another_dim_names_the_tensor(ckpts, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    tensors = load_file(ckpts["sft"] / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(64, 33)
    save_file(tensors, bad / "model.safetensors")
    (bad / "config.json").write_text((ckpts["sft"] / "config.json").read_text())
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' has shape"):
        merge_models(_recipe("linear", {}), ckpts["base"], [ckpts["ct"], bad], tmp_path / "o")


def test_load_merged_model_equals_the_written_checkpoint(ckpts, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = _recipe("ties_sv", {"slack": 0.1}, {"density": 0.5}, {"density": 0.5})
    merge_models(recipe, ckpts["base"], [ckpts["ct"], ckpts["sft"]], tmp_path / "m")
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=False)
    model, tokenizer = load_merged_model(recipe, ckpts["base"], [ckpts["ct"], ckpts["sft"]])
    ids = tokenizer("w3 w4 w5", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, written(**ids).logits)
    assert not list(Path(ckpts["root"]).glob("**/.m.tmp-*"))


def test_load_merged_model_casts_to_the_evaluation_dtype(ckpts, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = _recipe("task_arithmetic", {})
    merge_models(recipe, ckpts["base"], [ckpts["ct"], ckpts["sft"]], tmp_path / "m")
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    model, _ = load_merged_model(recipe, ckpts["base"], [ckpts["ct"], ckpts["sft"]],
                                 dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for (name, ours), (_, theirs) in zip(model.state_dict().items(),
                                         written.state_dict().items(), strict=True):
        assert torch.equal(ours, theirs), name


def test_full_disk_is_an_error_naming_the_shard_and_leaves_no_output(ckpts, tmp_path,
                                                                    monkeypatch):
    import errno
    import os

    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(OSError, match=r"no space left on device .*model\.safetensors"):
        merge_models(_recipe("linear", {}), ckpts["base"], [ckpts["ct"], ckpts["sft"]],
                     tmp_path / "m")
    assert not (tmp_path / "m").exists()
    assert not list(tmp_path.glob(".m*"))


def test_diagnostics_only_sweep_writes_no_weights_and_the_same_diagnostics(ckpts, tmp_path):
    from workflow.merge.engine import merge_many

    recipes = [_recipe("ties_sv", {"slack": 0.1, "lambda": lam}, {"density": 0.5},
                       {"density": 0.4}) for lam in (0.5, 1.0)]
    models = [ckpts["ct"], ckpts["sft"]]
    full = [tmp_path / f"full{i}" for i in range(2)]
    diag = [tmp_path / f"diag{i}" for i in range(2)]
    merge_many(recipes, ckpts["base"], models, full)
    merge_many(recipes, ckpts["base"], models, diag, weights=False)
    for written, diagnosed in zip(full, diag, strict=True):
        assert not list(diagnosed.glob("*.safetensors"))
        assert not (diagnosed / "config.json").exists()
        assert read_json(diagnosed / "diagnostics.json") == read_json(written / "diagnostics.json")
        assert (diagnosed / "README.md").is_file()
    with pytest.raises(ValueError, match="only for its diagnostics"):
        merge_many(recipes, ckpts["base"], models, diag, weights=False, diagnostics=False)
