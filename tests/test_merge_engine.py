"""Merge engine features: streaming kernels equal the reference methods bit for bit, sweeps in
one pass, extended vocabularies, tied embeddings, merge-on-load, every method end to end."""

from __future__ import annotations

import json
import math
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("densities", [[0.5, 0.3], [0.2, 0.6, 1.0]])
def test_streaming_ties_yadav_equals_reference(dtype, densities):
    """The kernel path with the whole-model statistics of one tensor (a one-tensor model):
    deltas of a few grid steps (huge tie groups at the thresholds) and exact cancellations
    (zero-sum elections, decided by the majority sign)."""
    from workflow.merge.kernels import whole_model_statistics
    from workflow.merge.methods import yadav_trimmed

    gen = torch.Generator().manual_seed(6)
    n = 120_007
    # Values on a 2^-20 grid: float32 differences are exact, so the mirrored deltas below cancel.
    base = ((torch.randn(n, generator=gen) * 256).round() / 1024).to(dtype)
    xs = [(base.float() + (0.002 * torch.randn(n, generator=gen) * 2**20).round() / 2**20)
          .to(dtype) for _ in densities]
    xs[1][:20_000] = (2 * base.float() - xs[0].float()).to(dtype)[:20_000]  # cancellations
    spec = MERGE_METHODS["ties_yadav"]
    models = [{"role": "ct", "density": d} for d in densities]
    resolved, per_model, task = resolve_merge_spec("ties_yadav", {"lambda": 0.8}, models)
    # Two tensors (the base and models split in two), counted in chunks of 7k on the workers.
    split = [(base[:50_000], [x[:50_000] for x in xs]), (base[50_000:], [x[50_000:] for x in xs])]
    (context,) = whole_model_statistics(lambda: split, [densities], chunk=7_000)
    for x, d, threshold in zip(xs, densities, context["thresholds"], strict=True):
        tau = (x.float() - base.float()).abs()
        k = int(d * n)
        assert threshold == (float(tau.kthvalue(n - k).values) if k < n else -math.inf)
    assert whole_model_statistics(lambda: [(base, xs)], [densities]) == [context]
    trimmed = yadav_trimmed(base, xs, context["thresholds"])
    assert int(((trimmed.sum(dim=0) == 0) & (trimmed != 0).any(dim=0)).sum()) > 0
    assert int((base.float().view(torch.int32) == -(2**31)).sum()) > 0  # -0.0 base entries
    expected = spec(base, xs, resolved, per_model, task, context=context)
    plan = stream_plan(spec, resolved, per_model, task, context)
    assert plan is not None and stream_plan(spec, resolved, per_model, task) is None
    for majority in (context["majority"], -context["majority"]):
        ctx = {**context, "majority": majority}
        plan = stream_plan(spec, resolved, per_model, task, ctx)
        outs = [torch.empty(n, dtype=dtype) for _ in range(2)]
        stream_merge(plan, base, xs, outs, [0.8, 1.0], chunk=10_000)
        assert _same_bits(outs[0], spec(base, xs, resolved, per_model, task, context=ctx))
        assert _same_bits(outs[1], spec(base, xs, {"lambda": 1.0}, per_model, task,
                                        context=ctx))
        if majority == context["majority"]:
            assert _same_bits(outs[0], expected)
        else:  # the zero-sum elections happen, and the majority decides them
            assert not _same_bits(outs[0], expected)


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
    "ties_yadav": ({"lambda": 0.9}, {"density": 0.5}, {"density": 0.3}),
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
        assert (out / "mergekit.yaml").is_file() == MERGE_METHODS[method].mergekit
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


# ---------------------------------------------------------------- ties_yadav: the reference


def _yadav_reference(base: dict[str, torch.Tensor], models: list[dict[str, torch.Tensor]],
                     densities: list[float], lam: float) -> dict[str, torch.Tensor]:
    """Yadav et al.'s reference code restated (github prateeky2806/ties-merging,
    src/utils/merge_utils.py: state_dict_to_vector, topk_values_mask, resolve_sign "mass",
    disjoint_merge "dis-mean", ``flat_ptm + lam * merged_tv``): every parameter flattened into
    one vector per model, in memory. One density per model (the reference's single K is the
    case of equal densities); density 1 keeps everything (its notebook's K >= 1)."""
    keys = sorted(base)
    flat_ptm = torch.cat([base[k].reshape(-1) for k in keys])
    tvs = torch.vstack([torch.cat([m[k].reshape(-1) for k in keys]) - flat_ptm for m in models])
    rows = []
    for tv, density in zip(tvs, densities, strict=True):
        d = tv.numel()
        k = d - int(d * density)  # "Keep top k elements instead of bottom k elements"
        if k == 0:
            rows.append(tv)
            continue
        kth = tv.abs().kthvalue(k).values
        rows.append(tv * (tv.abs() >= kth))
    trimmed = torch.vstack(rows)
    sign = torch.sign(trimmed.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())  # resolve_zero_signs(..., "majority")
    keep = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * keep
    counts = (selected != 0).sum(dim=0).float()
    merged = torch.sum(selected, dim=0) / torch.clamp(counts, min=1)
    flat = flat_ptm + lam * merged
    out, start = {}, 0
    for key in keys:
        out[key] = flat[start:start + base[key].numel()].reshape(base[key].shape)
        start += base[key].numel()
    return out


YADAV_SHAPES = {"a.weight": (16, 8), "b.bias": (8,), "c.weight": (5, 7, 3), "d.weight": (33,)}


def _yadav_inputs(values: str, count: int, seed: int) -> tuple[dict, list[dict]]:
    """A base and ``count`` fine-tunes. "grid": every value a multiple of 1/64, deltas of -3..3
    sixty-fourths (exact differences: huge tie groups at every threshold, many zeros, and
    exact cancellations between models, the zero-sum sign elections); "randn": no ties."""
    gen = torch.Generator().manual_seed(seed)
    base, models = {}, [{} for _ in range(count)]
    for name, shape in YADAV_SHAPES.items():
        if values == "grid":
            base[name] = torch.randint(-64, 64, shape, generator=gen) / 64
            deltas = [torch.randint(-3, 4, shape, generator=gen) / 64 for _ in range(count)]
            flip = torch.rand(shape, generator=gen) < 0.2
            deltas[1] = torch.where(flip, -deltas[0], deltas[1])  # exact cancellations
        else:
            base[name] = torch.randn(shape, generator=gen)
            deltas = [0.01 * torch.randn(shape, generator=gen) for _ in range(count)]
        for model, delta in zip(models, deltas, strict=True):
            model[name] = base[name] + delta
    return base, models


def _write_raw(directory: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> Path:
    directory.mkdir(parents=True)
    save_file({k: v.to(dtype) for k, v in tensors.items()}
              | {"position_ids": torch.arange(4)},  # not floating: copied from the base
              directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 8}))
    return directory


@pytest.mark.parametrize(("values", "dtype", "densities", "lams"), [
    ("grid", torch.float32, [0.3, 0.3, 0.3], [1.0, 0.7]),
    ("grid", torch.float32, [0.2, 0.6, 1.0], [1.0]),
    ("grid", torch.float32, [0.9, 0.95, 0.9], [1.0]),  # thresholds at 0: zeros "kept"
    ("randn", torch.float32, [0.1, 0.5, 0.3], [1.0, 0.7]),
    ("grid", torch.bfloat16, [0.3, 0.4, 0.3], [0.7]),
])
def test_ties_yadav_equals_the_reference_algorithm(values, dtype, densities, lams, tmp_path):
    from workflow.merge.engine import merge_many

    base, models = _yadav_inputs(values, len(densities), seed=len(lams) + int(10 * densities[0]))
    # The reference runs on the values the engine reads (bf16 inputs: their float32 upcast).
    base = {k: v.to(dtype).float() for k, v in base.items()}
    models = [{k: v.to(dtype).float() for k, v in m.items()} for m in models]
    dirs = [_write_raw(tmp_path / f"m{i}", m, dtype) for i, m in enumerate([base, *models])]
    roles = ["ct"] * (len(densities) - 1) + ["sft"]
    recipes = [{"stage": "merge", "version": "1", "method": "ties_yadav",
                "params": {"lambda": lam}, "base": "b",
                "models": [{"role": r, "density": d} for r, d in zip(roles, densities,
                                                                      strict=True)]}
               for lam in lams]
    outs = [tmp_path / f"out{j}" for j in range(len(lams))]
    merge_many(recipes, dirs[0], dirs[1:], outs)  # a sweep: the statistics are shared
    for lam, out in zip(lams, outs, strict=True):
        want = _yadav_reference(base, models, densities, lam)
        got = load_file(out / "model.safetensors")
        assert torch.equal(got.pop("position_ids"), torch.arange(4))
        assert got.keys() == want.keys()
        for key in want:
            assert _same_bits(got[key], want[key].to(dtype)), key
        assert not (out / "mergekit.yaml").exists()
    if values == "grid" and densities[0] == densities[1] == 0.3:
        # The case exercises what it should: ties at the threshold keep more than k + 1
        # entries, and zero-sum elections with nonzero entries fall to the majority sign.
        tvs = torch.vstack([torch.cat([m[k].reshape(-1) - base[k].reshape(-1)
                                       for k in sorted(base)]) for m in models])
        kth = tvs.abs().kthvalue(tvs.shape[1] - int(0.3 * tvs.shape[1]), dim=1,
                                 keepdim=True).values
        assert int((tvs[0].abs() >= kth[0]).sum()) > int(0.3 * tvs.shape[1]) + 1
        trimmed = tvs * (tvs.abs() >= kth)
        sign = torch.sign(trimmed.sum(dim=0))
        assert int(((sign == 0) & (trimmed != 0).any(dim=0)).sum()) > 0
        assert int(torch.sign(sign.sum())) == -1  # mergekit's rule (+1 on a zero sum) differs


def test_ties_yadav_trims_over_the_whole_model_not_per_tensor(tmp_path):
    """A model whose task vector is large in one tensor and tiny in another: the whole-model
    top-k keeps nothing of the tiny one; mergekit's per-tensor ties keeps a share of each."""
    base = {"big.weight": torch.zeros(100), "small.weight": torch.zeros(100)}
    gen = torch.Generator().manual_seed(0)
    ct = {"big.weight": 1 + torch.rand(100, generator=gen),
          "small.weight": 0.01 * torch.rand(100, generator=gen)}
    sft = {k: v * 0.5 for k, v in ct.items()}
    dirs = [_write_raw(tmp_path / n, m, torch.float32)
            for n, m in (("base", base), ("ct", ct), ("sft", sft))]
    models = [{"role": "ct", "density": 0.4}, {"role": "sft", "density": 0.4}]
    for method in ("ties_yadav", "ties"):
        recipe = {"stage": "merge", "version": "1", "method": method, "params": {},
                  "base": "b", "models": models}
        merge_models(recipe, dirs[0], dirs[1:], tmp_path / method)
    yadav = load_file(tmp_path / "ties_yadav" / "model.safetensors")
    per_tensor = load_file(tmp_path / "ties" / "model.safetensors")
    assert int((yadav["small.weight"] != 0).sum()) == 0
    assert int((yadav["big.weight"] != 0).sum()) == 81  # k + 1 of 200 entries at density 0.4
    assert int((per_tensor["small.weight"] != 0).sum()) == 40
    # Its diagnostics count the SFT mass over the entries the whole-model trim kept: all kept
    # (CT and SFT agree everywhere), though nothing of the small tensor survives.
    diagnostics = read_json(tmp_path / "ties_yadav" / "diagnostics.json")
    assert "whole-model threshold" in diagnostics["definitions"]["sft_topk_mass_kept"]
    assert diagnostics["overall"]["sft_topk_mass_kept"] == 1.0
    assert diagnostics["tensors"]["small.weight"]["trimmed"] == 1.0
