"""Merge stage: methods against hand-computed tensors, trimming rules, spec validation, and the
engine end to end on tiny random Llama checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from workflow.artifacts import read_json
from workflow.merge.__main__ import main as merge_main
from workflow.merge.engine import merge_models
from workflow.merge.kernels import MagnitudeSelection
from workflow.merge.methods import (
    DIAGNOSTIC_KEYS,
    MERGE_METHODS,
    METHOD_PARAMS,
    Consensus,
    Sparsification,
    aggregate_diagnostics,
    delta_diagnostics,
    generalized_task_arithmetic,
    layer_of,
    linear,
    magnitude_trim,
    ties_yadav,
    topk_mask,
    validate_merge_spec,
)

T = torch.tensor


def ties(base, tensors, weights, densities, *, lam=1.0, normalize=True, task_index=None,
         slack=0.0):
    return generalized_task_arithmetic(
        base, tensors, weights, densities, sparsification=Sparsification.MAGNITUDE,
        consensus=Consensus.SUM, lam=lam, normalize=normalize, task_index=task_index, slack=slack)


# ---------------------------------------------------------------- methods, by hand


def test_linear_by_hand():
    x1, x2 = T([1.0, 2, 3, 4, 5, 6]), T([7.0, 8, 9, 10, 11, 12])
    base = torch.zeros(6)
    # (1*x1 + 3*x2) / 4 and, unnormalised, 1*x1 + 3*x2.
    assert torch.equal(linear(base, [x1, x2], [1, 3], normalize=True),
                       T([5.5, 6.5, 7.5, 8.5, 9.5, 10.5]))
    assert torch.equal(linear(base, [x1, x2], [1, 3], normalize=False),
                       T([22.0, 26, 30, 34, 38, 42]))


def test_linear_keeps_base_dtype():
    base = torch.zeros(4, dtype=torch.bfloat16)
    out = linear(base, [torch.ones(4, dtype=torch.bfloat16)] * 2, [0.5, 0.5], normalize=True)
    assert out.dtype == torch.bfloat16 and torch.equal(out.float(), torch.ones(4))


def test_task_arithmetic_by_hand():
    base = torch.ones(6)
    x1 = T([2.0, 0, 1, 3, 1, 1])  # tau1 = [1, -1, 0, 2, 0, 0]
    x2 = T([1.0, 3, 0, 1, 1, 2])  # tau2 = [0, 2, -1, 0, 0, 1]
    params = {"lambda": 2.0, "normalize": False, "rescale": False}
    out = MERGE_METHODS["task_arithmetic"](base, [x1, x2], params,
                                           [{"weight": 1.0, "density": 1.0},
                                            {"weight": 0.5, "density": 1.0}])
    # 1 + 2 * (tau1 + 0.5 tau2) = 1 + 2 * [1, 0, -0.5, 2, 0, 0.5]
    assert torch.equal(out, T([3.0, 1, 0, 5, 1, 2]))
    # normalize divides by the weight sum, 1.5
    params["normalize"] = True
    out = MERGE_METHODS["task_arithmetic"](base, [x1, x2], params,
                                           [{"weight": 1.0, "density": 1.0},
                                            {"weight": 0.5, "density": 1.0}])
    torch.testing.assert_close(out, 1 + 2 * T([1.0, 0, -0.5, 2, 0, 0.5]) / 1.5)


# tau1 magnitudes 3,2,1,4,.5,2: top-3 are idx 3, 0 and one of the tied 2s (idx 1 or 5): the
# lowest index, 1, wins. tau2 magnitudes 2,3,.5,6,1,.1: top-3 are idx 3, 1, 0.
TAU1 = T([3.0, -2, 1, -4, 0.5, 2])
TAU2 = T([2.0, 3, -0.5, -6, 1, 0.1])


def test_ties_by_hand():
    base = torch.ones(6)
    # v1 = 1*[3,-2,0,-4,0,0], v2 = 2*[2,3,0,-6,0,0] = [4,6,0,-12,0,0]
    # sum [7,4,0,-16,0,0] -> gamma [+,+,+,-,+,+] (0 -> +)
    # agree1 [T,F,F,T,F,F], agree2 [T,T,F,T,F,F]
    # mixed [7,6,0,-16,0,0], divisor [3,2,1,3,1,1] (0 -> 1)
    out = ties(base, [base + TAU1, base + TAU2], [1, 2], [0.5, 0.5])
    torch.testing.assert_close(out, 1 + T([7 / 3, 3, 0, -16 / 3, 0, 0]), rtol=0, atol=1e-6)
    out = ties(base, [base + TAU1, base + TAU2], [1, 2], [0.5, 0.5], normalize=False, lam=0.5)
    assert torch.equal(out, 1 + 0.5 * T([7.0, 6, 0, -16, 0, 0]))
    # A tied vote (sum 0) elects +, as mergekit's get_mask does.
    assert torch.equal(ties(torch.zeros(2), [T([2.0, 1]), T([-2.0, 1])], [1, 1], [1, 1]),
                       T([2.0, 1]))


def test_ties_through_registry_uses_mergekit_defaults():
    assert METHOD_PARAMS["ties"]["global"] == {"normalize": True, "rescale": False, "lambda": 1.0}
    assert METHOD_PARAMS["task_arithmetic"]["global"]["normalize"] is False
    assert METHOD_PARAMS["linear"] == {"global": {"normalize": True}, "model": {"weight": 1.0}}
    base = torch.ones(6)
    params = {"normalize": True, "rescale": False, "lambda": 1.0}
    out = MERGE_METHODS["ties"](base, [base + TAU1, base + TAU2], params,
                                [{"weight": 1.0, "density": 0.5}, {"weight": 2.0, "density": 0.5}])
    torch.testing.assert_close(out, 1 + T([7 / 3, 3, 0, -16 / 3, 0, 0]), rtol=0, atol=1e-6)


def test_ties_sv_task_sign_wins_by_hand():
    base = torch.zeros(6)
    ct = T([4.0, -3, 2, 1, 0, 0])
    sft = T([-2.0, 2, -3, 0.5, 1, 0])
    # density 1: nothing trimmed. sum [2,-1,-1,1.5,1,0] -> gamma [+,-,-,+,+,+]
    # ties: mixed [4,-3,-3,1.5,1,0] / divisor [1,1,1,2,1,1]
    expected_ties = T([4.0, -3, -3, 0.75, 1, 0])
    assert torch.equal(ties(base, [ct, sft], [1, 1], [1, 1]), expected_ties)
    # slack 0.34: k = int(2.04) = 2 protected: idx 2 (|3|) and, of the tied |2|s, idx 0.
    # idx 0 conflicts (sft -, gamma +): the SFT sign is elected, the CT 4 drops out.
    # idx 1 (+2) is not protected and stays outvoted.
    out = ties(base, [ct, sft], [1, 1], [1, 1], task_index=1, slack=0.34)
    assert torch.equal(out, T([-2.0, -3, -3, 0.75, 1, 0]))
    # slack 0.5: k = 3 adds idx 1, where the SFT's +2 now wins too.
    out = ties(base, [ct, sft], [1, 1], [1, 1], task_index=1, slack=0.5)
    assert torch.equal(out, T([-2.0, 2, -3, 0.75, 1, 0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_sv_with_zero_slack_is_ties_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(64, 48, generator=gen).to(dtype)
    models = [(base.float() + 0.01 * torch.randn(64, 48, generator=gen)).to(dtype)
              for _ in range(3)]
    for densities in ([0.5, 0.3, 0.7], [1.0, 1.0, 0.2]):
        expected = ties(base, models, [1.0, 0.7, 1.3], densities, lam=0.8)
        got = ties(base, models, [1.0, 0.7, 1.3], densities, lam=0.8, task_index=2, slack=0.0)
        assert got.dtype == dtype and torch.equal(got, expected)
        # and a positive slack does change something on random data
        changed = ties(base, models, [1.0, 0.7, 1.3], densities, lam=0.8, task_index=2,
                       slack=min(densities[2], 0.2))
        assert not torch.equal(changed, expected)


def test_non_floating_tensors_are_copied_from_base():
    base = T([1, 2, 3])
    out = MERGE_METHODS["ties"](base, [T([4, 5, 6])],
                                {"normalize": True, "rescale": False, "lambda": 1.0},
                                [{"weight": 1.0, "density": 0.5}])
    assert torch.equal(out, base)


# ---------------------------------------------------------------- trimming


def test_topk_mask_keeps_exactly_k_lowest_index_among_ties():
    values = T([1.0, 1, 1, 1, 1, 1, 1, 1, 0.5, 2])
    mask = topk_mask(values, 5)
    assert mask.tolist() == [True] * 4 + [False] * 5 + [True]
    assert topk_mask(values, 0).sum() == 0 and topk_mask(values, 10).all()


@pytest.mark.parametrize("density", [0.1, 0.25, 0.5, 0.9])
def test_bf16_trimming_keeps_exactly_k_and_nests(density):
    gen = torch.Generator().manual_seed(1)
    # bf16 deltas of similar size: a great many magnitudes tie exactly.
    tau = (torch.randn(300, 41, generator=gen) * 1e-3).to(torch.bfloat16).float()
    assert tau.abs().unique().numel() < tau.numel() / 10
    k = int(density * tau.numel())
    trimmed = magnitude_trim(tau, density)
    assert bool((tau != 0).all()) and int((trimmed != 0).sum()) == k
    mask = topk_mask(tau.abs(), k)
    assert int(mask.sum()) == k
    assert bool((topk_mask(tau.abs(), k // 2) <= mask).all())  # nested
    kept_min = tau.abs()[mask].min()
    assert bool((tau.abs()[~mask] <= kept_min).all())  # nothing dropped beats a kept entry


def test_magnitude_trim_rescale_restores_l1():
    tau = T([3.0, -2, 1, -4, 0.5, 2])
    out = magnitude_trim(tau, 0.5, rescale=True)
    torch.testing.assert_close(out.abs().sum(), tau.abs().sum())
    assert int((out != 0).sum()) == 3


def _mergekit_ties_reference(base, tensors, weights, densities, lam):
    """mergekit 0.1.5 GTATask with magnitude sparsification and sum consensus, transcribed."""
    deltas = []
    for x, d in zip(tensors, densities, strict=True):
        delta = x - base
        k = int(d * delta.numel())
        mask = torch.zeros_like(delta)
        mask.view(-1)[torch.argsort(delta.abs().view(-1), descending=True)[:k]] = 1
        deltas.append(delta * mask)
    deltas = torch.stack(deltas)
    w = torch.tensor(weights).unsqueeze(-1).unsqueeze(-1)
    weighted = deltas * w
    majority = (weighted.sum(dim=0) >= 0).float() * 2 - 1
    mask = weighted.sign() == majority
    mixed = (weighted * mask).sum(dim=0)
    divisor = (w * mask).sum(dim=0)
    divisor[divisor == 0] = 1
    return base + lam * (mixed / divisor)


def test_ties_matches_mergekit_formula_on_fp32():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(40, 30, generator=gen)
    models = [base + torch.randn(40, 30, generator=gen) * s for s in (0.1, 0.2, 0.05)]
    args = (base, models, [1.0, 0.5, 2.0], [0.3, 0.6, 0.9])
    torch.testing.assert_close(ties(*args, lam=0.7), _mergekit_ties_reference(*args, 0.7),
                               rtol=1e-6, atol=1e-6)


def test_ties_yadav_by_hand():
    base = T([0.0, 0.0, 0.0, 0.0, 0.0])
    x1 = T([3.0, -1.0, 2.0, 1.0, 0.5])
    x2 = T([-1.0, 2.0, -2.0, 1.0, -4.0])
    # Thresholds 1 and 2 (whole-model values, given): tau1 keeps 3, -1, 2, 1; tau2 keeps 2, -2, -4.
    # Sums 3, 1, 0, 1, -4: the zero sum at index 2 elects the majority sign.
    for majority, third in ((1, 2.0), (-1, -2.0), (0, -2.0)):  # 0 elects the negative side
        out = ties_yadav(base, [x1, x2], densities=[0.5, 0.5], lam=1.0, thresholds=[1.0, 2.0],
                         majority=majority)
        assert torch.equal(out, T([3.0, 2.0, third, 1.0, -4.0]))
    # -inf keeps everything; agreeing entries average; lambda scales the mean.
    out = ties_yadav(base + 1, [x1 + 1, x2 + 1], densities=[1.0, 1.0], lam=0.5,
                     thresholds=[-math.inf, -math.inf], majority=1)
    assert torch.allclose(out, 1 + 0.5 * T([3.0, 2.0, 2.0, 1.0, -4.0]))


def test_ties_yadav_needs_the_whole_model_statistics():
    assert METHOD_PARAMS["ties_yadav"] == {"global": {"lambda": 1.0}, "model": {"density": 1.0}}
    method = MERGE_METHODS["ties_yadav"]
    assert method.whole_model and method.trims and not method.mergekit
    with pytest.raises(ValueError, match="ties_yadav.*whole model"):
        method(T([0.0, 1.0]), [T([1.0, 2.0])], {"lambda": 1.0}, [{"density": 0.5}])


def test_ties_sv_is_labelled_as_this_projects_reading_in_readme_and_report():
    import pandas as pd

    from workflow.report.tables import TIES_SV_NOTE, legend_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert "**TIES-SV, as read here.**" in readme and "not the paper's method" in readme
    rows = [{"kind": "merge", "model": "m", "langs": "eu", "tokens": 1, "method": method,
             "hparams": "", "label": method} for method in ("ties_sv", "ties_yadav", "ties")]
    legend = legend_markdown(pd.DataFrame(rows))
    assert TIES_SV_NOTE in legend and "this project's reading" in TIES_SV_NOTE
    assert "| TIES-Yadav | ties_yadav |" in legend
    assert TIES_SV_NOTE not in legend_markdown(pd.DataFrame(rows[1:]))


@pytest.mark.parametrize("chunks", [1, 7])
def test_magnitude_selection_equals_kthvalue_over_a_stream(chunks):
    """The two-pass radix selection gives torch.kthvalue of the concatenation, at every rank
    tried, with tie groups, zeros, subnormals, huge values and Inf; NaN counts as 0."""
    gen = torch.Generator().manual_seed(3)
    values = torch.cat([torch.randint(0, 5, (3000,), generator=gen) / 8,  # ties and zeros
                        torch.randn(3000, generator=gen) * 1e-3,
                        torch.randn(500, generator=gen) * 1e30,
                        T([1e-45, 2e-45, math.inf, 3.4e38, 0.0])]).abs()
    values = values[torch.randperm(values.numel(), generator=gen)]
    pieces = values.tensor_split(chunks)
    n = values.numel()
    ranks = [1, 2, n // 3, n // 2, n - 600, n - 1, n]
    selection = MagnitudeSelection()
    for piece in pieces:
        selection.count_high(piece)
    assert selection.n == n
    selection.choose(ranks)
    for piece in pieces:
        selection.count_low(piece)
    for rank in ranks:
        assert selection.value(rank) == float(values.kthvalue(rank).values), rank
    with pytest.raises(ValueError, match="rank 0 outside"):
        selection.choose([0])
    nan = values.clone()
    nan[:10] = math.nan
    selection = MagnitudeSelection()
    selection.count_high(nan)
    selection.choose([11])
    selection.count_low(nan)
    assert selection.value(11) == float(torch.where(nan.isnan(), 0.0, nan).kthvalue(11).values)


# ---------------------------------------------------------------- spec validation


def _models(**sft):
    return [{"role": "ct", "lang": "eu", "digest": "x", "weight": 1.0, "density": 0.5},
            {"role": "sft", "digest": "y", "weight": 1.0, "density": 0.5, **sft}]


@pytest.mark.parametrize(("method", "params", "models", "fault"), [
    ("tie", {}, _models(), "unknown merge method 'tie'"),
    ("ties", {"slack": 0.1}, _models(), "no parameter 'slack'"),
    ("ties", {"lambda": "big"}, _models(), "'lambda'"),
    ("ties", {"normalize": 1}, _models(), "'normalize'"),
    ("ties", {}, _models(density=0.0), "'density'"),
    ("ties", {}, _models(density=1.5), "'density'"),
    ("ties", {}, _models(densty=0.5), "'densty'"),
    ("ties", {}, _models(weight=math.inf), "'weight'"),
    ("ties", {}, _models(role="chat"), "role"),
    ("ties", {}, [], "at least one model"),
    ("ties_sv", {}, _models(), "'slack' is required"),
    ("ties_sv", {"slack": 0.1}, _models()[:1], "role 'sft'"),
    ("ties_sv", {"slack": 0.6}, _models(), "must not exceed"),
    ("linear", {}, _models(density=0.5), "'density'"),
    # The reference election is unweighted and always a disjoint mean.
    ("ties_yadav", {}, _models(), "no per-model parameter 'weight'"),
    ("ties_yadav", {"normalize": True}, [{"role": "ct"}], "no parameter 'normalize'"),
    ("ties_yadav", {}, [{"role": "ct", "density": 0.0}], "'density'"),
    ("linear", {}, [{"role": "ct", "weight": 1}, {"role": "sft", "weight": -1}], "sum to 0"),
])
def test_invalid_specs_name_the_fault(method, params, models, fault):
    with pytest.raises(ValueError, match=fault.replace("(", r"\(")):
        validate_merge_spec(method, params, models)


def test_valid_specs_pass():
    validate_merge_spec("ties_sv", {"slack": 0.1, "lambda": 1.0}, _models())
    validate_merge_spec("ties", {}, [{"role": "ct"}, {"role": "sft"}])  # weight defaults to 1
    validate_merge_spec("linear", {"normalize": False}, [{"role": "ct", "weight": 0.5}])


# ---------------------------------------------------------------- diagnostics


def test_delta_diagnostics_by_hand():
    ct = T([1.0, -1, 2, 0, 3, -2])
    sft = T([-1.0, -2, 0, 4, 0.5, 1])
    merged = T([-1.0, -1.5, 2, 0, 3, 0])
    counts = delta_diagnostics([ct], sft, merged, density=0.5)
    ratios = counts.ratios()
    # both nonzero at idx 0,1,4,5; opposite at 0 and 5
    assert ratios["sign_conflict"] == 2 / 4
    # sft top-3 by |.|: idx 3 (4), 1 (2), then idx 0 and 5 tie at 1 -> idx 0. Mass 7; merged
    # keeps the SFT sign at idx 1 and 0 (idx 3 is 0): 3/7.
    assert ratios["sft_topk_mass_kept"] == pytest.approx(3 / 7)
    # nonzero SFT entries 0,1,3,4,5; kept sign at 0,1,4 -> dropped 3 and 5
    assert ratios["sft_dropped"] == 2 / 5
    # every entry touched; merged unchanged at 3 and 5
    assert ratios["trimmed"] == 2 / 6
    agg = aggregate_diagnostics({"model.layers.0.mlp.up_proj.weight": counts,
                                 "model.layers.1.mlp.up_proj.weight": counts,
                                 "model.norm.weight": counts})
    assert list(agg["layers"]) == ["0", "1", "other"]
    assert agg["overall"]["sign_conflict"] == 2 / 4
    assert layer_of("model.language_model.layers.12.self_attn.q_proj.weight") == "12"


# ---------------------------------------------------------------- engine, end to end


def _tokenizer(eos: str = "w1"):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 64)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token=eos)


def _save_model(directory: Path, seed: int, *, tied: bool, base_seed: int = 0,
                shard: str | None = None, scale: float = 0.02) -> Path:
    """A 2-layer, 32-wide Llama: the base (seed == base_seed) or a perturbation of it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=tied)
    torch.manual_seed(base_seed)
    model = LlamaForCausalLM(config)
    if seed != base_seed:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=gen) * scale)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    base = _save_model(root / "base", 0, tied=False)
    ct = _save_model(root / "ct", 1, tied=False, shard="30KB")  # sharded input
    sft = _save_model(root / "sft", 2, tied=False)
    _tokenizer(eos="w2").save_pretrained(sft)
    _tokenizer().save_pretrained(base)
    tied = {name: _save_model(root / f"tied_{name}", seed, tied=True)
            for name, seed in (("base", 0), ("ct", 1), ("sft", 2))}
    _tokenizer().save_pretrained(tied["base"])  # the tied SFT has none: the base's is used
    return {"base": base, "ct": ct, "sft": sft, "tied": tied, "root": root}


def _recipe(method="ties_sv", params=None, **sft):
    return {"stage": "merge", "version": "1", "method": method,
            "params": {"lambda": 1.0, "slack": 0.1} if params is None else params,
            "models": _models(**sft), "base": "b"}


def _assert_loads_without_nan(directory: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    logits = model(**tokenizer("w3 w4 w5", return_tensors="pt")).logits
    assert torch.isfinite(logits).all()
    return model


def test_engine_end_to_end_ties_sv(checkpoints, tmp_path):
    out = tmp_path / "merged"
    recipe = _recipe()
    merge_models(recipe, checkpoints["base"], [checkpoints["ct"], checkpoints["sft"]], out)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "recipe.json", "diagnostics.json"} <= {p.name for p in out.iterdir()}
    assert read_json(out / "recipe.json")["recipe"] == recipe
    assert read_json(out / "tokenizer_config.json")["eos_token"] == "w2"  # the SFT's
    _assert_loads_without_nan(out)

    # The written tensors are exactly the method applied tensor by tensor.
    base = load_file(checkpoints["base"] / "model.safetensors")
    sft = load_file(checkpoints["sft"] / "model.safetensors")
    ct = _read_sharded(checkpoints["ct"])
    merged = load_file(out / "model.safetensors")
    assert merged.keys() == base.keys()
    name = "model.layers.1.mlp.down_proj.weight"
    expected = ties(base[name], [ct[name], sft[name]], [1.0, 1.0], [0.5, 0.5],
                    task_index=1, slack=0.1)
    assert torch.equal(merged[name], expected)

    diagnostics = read_json(out / "diagnostics.json")
    assert set(diagnostics["overall"]) == set(DIAGNOSTIC_KEYS)
    assert set(diagnostics["layers"]) == {"0", "1", "other"}
    assert name in diagnostics["tensors"]
    for scope in [diagnostics["overall"], *diagnostics["layers"].values()]:
        for key in DIAGNOSTIC_KEYS:
            assert 0.0 <= scope[key] <= 1.0, (key, scope)
    # independent perturbations disagree in sign about half the time
    assert 0.3 < diagnostics["overall"]["sign_conflict"] < 0.7
    # with slack 0.1 of density 0.5, at least the protected top-10% mass is kept
    assert diagnostics["overall"]["sft_topk_mass_kept"] > 0.5


def _read_sharded(directory: Path) -> dict[str, torch.Tensor]:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    tensors = {}
    for file in set(index["weight_map"].values()):
        tensors.update(load_file(directory / file))
    return tensors


def test_slack_keeps_more_sft_mass_than_ties(checkpoints, tmp_path):
    dirs = [checkpoints["ct"], checkpoints["sft"]]
    merge_models(_recipe("ties", {}), checkpoints["base"], dirs, tmp_path / "ties")
    merge_models(_recipe("ties_sv", {"slack": 0.5}), checkpoints["base"], dirs, tmp_path / "sv")
    kept_ties = read_json(tmp_path / "ties" / "diagnostics.json")["overall"]["sft_topk_mass_kept"]
    kept_sv = read_json(tmp_path / "sv" / "diagnostics.json")["overall"]["sft_topk_mass_kept"]
    assert kept_sv == 1.0 > kept_ties


def test_engine_tied_embeddings_and_sharded_output_via_cli(checkpoints, tmp_path):
    tied = checkpoints["tied"]
    out = tmp_path / "merged"
    recipe = {"stage": "merge", "version": "1", "method": "linear", "params": {}, "base": "b",
              "models": [{"role": "ct", "weight": 0.25}, {"role": "sft", "weight": 0.75}]}
    merge_main(["--recipe", json.dumps(recipe),
                "--base", str(tied["base"]), "--models", str(tied["ct"]), str(tied["sft"]),
                "--out", str(out), "--max-shard-bytes", "20000"])
    index = read_json(out / "model.safetensors.index.json")
    assert "lm_head.weight" not in index["weight_map"]
    assert len(set(index["weight_map"].values())) > 1
    model = _assert_loads_without_nan(out)  # tokenizer fell back to the base's
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    merged = _read_sharded(out)
    base = load_file(tied["base"] / "model.safetensors")
    ct = load_file(tied["ct"] / "model.safetensors")
    sft = load_file(tied["sft"] / "model.safetensors")
    name = "model.embed_tokens.weight"
    torch.testing.assert_close(merged[name], 0.25 * ct[name] + 0.75 * sft[name])
    assert set(merged) == set(base)


def test_shape_mismatch_names_the_tensor(checkpoints, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    tensors = load_file(checkpoints["sft"] / "model.safetensors")
    tensors["model.layers.0.post_attention_layernorm.weight"] = torch.ones(33)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    (bad / "config.json").write_text((checkpoints["sft"] / "config.json").read_text())
    out = tmp_path / "merged"
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.post_attention_layernorm\.weight'"
                                         r" has shape \[33\]"):
        merge_models(_recipe(), checkpoints["base"], [checkpoints["ct"], bad], out)
    assert not out.exists()
    assert not list(tmp_path.glob(".merged.tmp-*"))  # nothing half-written left behind

    del tensors["model.norm.weight"]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' of the base .* is missing"):
        merge_models(_recipe(), checkpoints["base"], [checkpoints["ct"], bad], out)


def test_engine_rejects_model_count_mismatch(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="lists 2 models but 1"):
        merge_models(_recipe(), checkpoints["base"], [checkpoints["sft"]], tmp_path / "m")
