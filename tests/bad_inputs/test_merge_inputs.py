"""Bad merge inputs: NaN/Inf weights, truncated or corrupt safetensors, mismatched tensors; and
what a merge leaves on disk (file modes, the temporaries of a killed merge).

Inputs are tiny one-layer Llama checkpoints written tensor by tensor (no model is built except
for merge-on-load); the command line runs as a real subprocess.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_merge_engine import ALL as ALL_METHOD_PARAMS

from workflow.artifacts import read_json
from workflow.merge.engine import (
    CheckpointError,
    load_merged_model,
    merge_many,
    merge_models,
    merged_state_dict,
)
from workflow.merge.kernels import keep_sets, stream_merge, stream_plan
from workflow.merge.methods import MERGE_METHODS, resolve_merge_spec, topk_count, topk_mask

PROJECT = Path(__file__).resolve().parents[2]
NAN, INF = float("nan"), float("inf")
POISONED = "model.layers.0.mlp.up_proj.weight"
HIDDEN, INTERMEDIATE, VOCAB = 32, 64, 64
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB,
          "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": 1,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
          "tie_word_embeddings": False, "torch_dtype": "float32"}


def _layout() -> dict[str, tuple[int, ...]]:
    p = "model.layers.0."
    return {
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
        p + "self_attn.k_proj.weight": (HIDDEN // 2, HIDDEN),
        p + "self_attn.v_proj.weight": (HIDDEN // 2, HIDDEN),
        p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
        POISONED: (INTERMEDIATE, HIDDEN),
        p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
        p + "input_layernorm.weight": (HIDDEN,),
        p + "post_attention_layernorm.weight": (HIDDEN,),
        "model.norm.weight": (HIDDEN,),
        "lm_head.weight": (VOCAB, HIDDEN),
    }


def _write(directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(CONFIG))
    return directory


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"[UNK]": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="w1")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """base, ct and sft: the fine-tunes are the base plus small random deltas."""
    root = tmp_path_factory.mktemp("bad_inputs")
    gen = torch.Generator().manual_seed(0)
    base = {name: torch.randn(shape, generator=gen) * 0.02 for name, shape in _layout().items()}
    dirs = {"base": _write(root / "base", base)}
    for name in ("ct", "sft"):
        dirs[name] = _write(root / name, {k: v + 0.01 * torch.randn(v.shape, generator=gen)
                                          for k, v in base.items()})
    _tokenizer().save_pretrained(dirs["base"])
    return dirs


# Every registered method with parameters that make it trim, vote and rescale (one table for
# the engine tests and these).
PARAMS = ALL_METHOD_PARAMS
# Methods whose non-finite outputs are exactly the non-finite input entries; the others take
# whole-tensor norms or sums (slerp, model_stock, L1 rescaling): one NaN spoils the tensor.
ENTRYWISE = {"linear", "task_arithmetic", "ties", "ties_sv", "ties_yadav", "breadcrumbs",
             "breadcrumbs_ties"}


def test_the_method_table_covers_the_registry():
    assert set(PARAMS) == set(MERGE_METHODS)


def _recipe(method: str) -> dict:
    params, ct, sft = PARAMS[method]
    return {"stage": "merge", "version": "1", "method": method, "params": params, "base": "b",
            "models": [{"role": "ct", **ct}, {"role": "sft", **sft}]}


def _poison(source: Path, directory: Path, *, nan: int = 0, inf: int = 0,
            name: str = POISONED) -> Path:
    """A copy of ``source`` whose tensor ``name`` holds ``nan`` NaNs then ``inf`` Infs (+ and -)
    at spread-out flat indices."""
    tensors = load_file(source / "model.safetensors")
    flat = tensors[name].reshape(-1)
    for i in range(nan + inf):
        flat[(7 + 131 * i) % flat.numel()] = NAN if i < nan else (-1) ** i * INF
    return _write(directory, tensors)


def _leftovers(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if ".tmp-" in p.name]


# ---------------------------------------------------------------- NaN / Inf


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_nonfinite_input_is_refused_naming_the_tensor_and_file(method, inputs, tmp_path):
    ct = _poison(inputs["ct"], tmp_path / "ct", nan=3)
    out = tmp_path / "merged"
    with pytest.raises(CheckpointError) as caught:
        merge_models(_recipe(method), inputs["base"], [ct, inputs["sft"]], out)
    assert str(caught.value) == (
        f"non-finite values (3 NaN, 0 Inf) in tensor {POISONED} of {ct / 'model.safetensors'}; "
        "set integrity.allow_nonfinite: true (--allow-nonfinite) to merge anyway")
    assert not out.exists() and not _leftovers(tmp_path)


@pytest.mark.parametrize("role", ["base", "sft"])
def test_nonfinite_base_or_task_model_is_refused_with_counts(role, inputs, tmp_path):
    dirs = dict(inputs)
    dirs[role] = _poison(inputs[role], tmp_path / role, nan=2, inf=3, name="model.norm.weight")
    with pytest.raises(CheckpointError, match=re.escape(
            f"(2 NaN, 3 Inf) in tensor model.norm.weight of {dirs[role] / 'model.safetensors'};")):
        merge_models(_recipe("ties"), dirs["base"], [dirs["ct"], dirs["sft"]], tmp_path / "m")


def test_every_entry_point_refuses_nonfinite_unless_allowed(inputs, tmp_path):
    ct = _poison(inputs["ct"], tmp_path / "ct", inf=1)
    models = [ct, inputs["sft"]]
    recipe = _recipe("ties_sv")
    message = re.escape(f"(0 NaN, 1 Inf) in tensor {POISONED} of {ct}")
    sweep = [recipe, {**recipe, "params": {"slack": 0.1}}]
    outs = [tmp_path / "a", tmp_path / "b"]
    for weights in (True, False):
        with pytest.raises(CheckpointError, match=message):
            merge_many(sweep, inputs["base"], models, outs, weights=weights)
        assert not _leftovers(tmp_path) and not any(o.exists() for o in outs)
    with pytest.raises(CheckpointError, match=message):
        merged_state_dict(recipe, inputs["base"], models)
    with pytest.raises(CheckpointError, match=message):
        load_merged_model(recipe, inputs["base"], models)

    merge_many(sweep, inputs["base"], models, outs, weights=False, allow_nonfinite=True)
    # The poisoned tensor is left out of the diagnostics; the others are there.
    tensors = read_json(outs[0] / "diagnostics.json")["tensors"]
    assert POISONED not in tensors and "model.norm.weight" in tensors
    merged, _, _ = merged_state_dict(recipe, inputs["base"], models, allow_nonfinite=True)
    assert int((~torch.isfinite(merged[POISONED])).sum()) == 1
    model, _ = load_merged_model(recipe, inputs["base"], models, allow_nonfinite=True)
    assert not torch.isfinite(model.state_dict()[POISONED]).all()


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_allow_nonfinite_merges_every_method_deterministically(method, inputs, tmp_path):
    ct = _poison(inputs["ct"], tmp_path / "ct", nan=4, inf=3)
    bad_in = ~torch.isfinite(load_file(ct / "model.safetensors")[POISONED])
    outs = [tmp_path / "m1", tmp_path / "m2"]
    for out in outs:
        merge_models(_recipe(method), inputs["base"], [ct, inputs["sft"]], out,
                     allow_nonfinite=True)
    first, second = (load_file(out / "model.safetensors") for out in outs)
    bad_out = ~torch.isfinite(first[POISONED])
    if method in ENTRYWISE:
        assert torch.equal(bad_out, bad_in)
    else:
        assert bad_out.all()
    assert all(torch.isfinite(t).all() for k, t in first.items() if k != POISONED)
    for name, tensor in first.items():  # reruns give the same bits, NaN included
        assert torch.equal(tensor.view(torch.int32), second[name].view(torch.int32)), name


def _nonfinite_case(n: int, nan_share: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=gen)
    xs = [base + 0.002 * torch.randn(n, generator=gen) for _ in range(2)]
    nan = torch.randperm(n, generator=gen)[: max(1, int(nan_share * n))]
    xs[0][nan] = NAN
    xs[1][torch.randperm(n, generator=gen)[:5]] = INF
    xs[1][torch.randperm(n, generator=gen)[:5]] = -INF
    base[torch.randperm(n, generator=gen)[:2]] = NAN
    return base, xs


@pytest.mark.parametrize("nan_share", [1e-5, 0.3, 0.6])
@pytest.mark.parametrize(("method", "params"), [("ties", {"lambda": 0.7}),
                                                ("ties_sv", {"slack": 0.3})])
def test_streaming_ties_with_nonfinite_inputs_equals_the_reference(method, params, nan_share):
    # 120k entries in chunks of 10k: the sampled-band top-k; with 60% NaN the density 0.5
    # reaches past the numbers of model 0 (everything kept).
    n = 120_007
    base, xs = _nonfinite_case(n, nan_share, seed=3)
    models = [{"role": "ct", "density": 0.5}, {"role": "sft", "density": 0.4}]
    spec = MERGE_METHODS[method]
    resolved, per_model, task = resolve_merge_spec(method, params, models)
    expected = spec(base, xs, resolved, per_model, task)
    out = torch.empty(n)
    stream_merge(stream_plan(spec, resolved, per_model, task), base, xs, [out],
                 [resolved["lambda"]], chunk=10_000)
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    bad_in = ~torch.isfinite(base) | ~torch.isfinite(xs[0]) | ~torch.isfinite(xs[1])
    assert torch.equal(~torch.isfinite(out), bad_in)


@pytest.mark.parametrize("chunk", [7_000, 200_000])  # sampled bands; one exact selection
def test_top_k_never_keeps_nan_and_keeps_k_numbers(chunk):
    n = 100_003
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(n, generator=gen)
    x[torch.randperm(n, generator=gen)[:20_000]] = NAN
    x[:3] = INF
    numbers = n - 20_000
    ks = [1, topk_count(0.1, n), topk_count(0.5, n), numbers - 1, numbers, numbers + 7]
    magnitude = x.abs()
    for k, keep in zip(ks, keep_sets(x, torch.zeros(n), ks, chunk, torch.device("cpu")),
                       strict=True):
        mask = torch.empty(n, dtype=torch.bool)
        for start in range(0, n, chunk):
            keep.mask(magnitude[start:start + chunk], start, mask[start:start + chunk])
        want = topk_mask(magnitude, k)
        assert torch.equal(mask, want), k
        assert int(want.sum()) == min(k, numbers) and not want[x.isnan()].any()
        assert int(want[:3].sum()) == min(k, 3)  # Inf is the largest magnitude


# ---------------------------------------------------------------- corrupt files


def _header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), data[8 + length:]


def _rewrite(path: Path, header: object, body: bytes, length: int | None = None) -> None:
    text = json.dumps(header).encode()
    length = len(text) if length is None else length
    path.write_bytes(struct.pack("<Q", length) + text + body)


def _corrupt(kind: str, path: Path) -> set[str] | None:
    """Damage one safetensors file; the tensors the error may name (None: only the file)."""
    header, body = _header(path)
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[:-1000])
        return {k for k, v in header.items()
                if k != "__metadata__" and v["data_offsets"][1] > len(body) - 1000}
    if kind == "truncated_in_header":
        path.write_bytes(data[:40])
        return None
    if kind == "shorter_than_8_bytes":
        path.write_bytes(data[:5])
        return None
    if kind == "garbage_header":
        length = struct.unpack("<Q", data[:8])[0]
        path.write_bytes(data[:8] + bytes(range(256)) * (length // 256) + b"\x80" * (length % 256)
                         + body)
        return None
    if kind == "header_length_beyond_file":
        path.write_bytes(struct.pack("<Q", 1 << 62) + data[8:])
        return None
    if kind == "header_not_an_object":
        _rewrite(path, [1, 2, 3], body)
        return None
    if kind == "offsets_beyond_file":
        start, end = header[POISONED]["data_offsets"]
        header[POISONED]["data_offsets"] = [start + len(body), end + len(body)]
        _rewrite(path, header, body)
        return {POISONED}
    if kind == "offsets_not_matching_shape":
        start, end = header[POISONED]["data_offsets"]
        header[POISONED]["data_offsets"] = [start, end - 4]
        _rewrite(path, header, body)
        return {POISONED}
    raise AssertionError(kind)


CORRUPTIONS = ["truncated", "truncated_in_header", "shorter_than_8_bytes", "garbage_header",
               "header_length_beyond_file", "header_not_an_object", "offsets_beyond_file",
               "offsets_not_matching_shape"]


def _one_sentence(message: str, path: Path, tensors: set[str] | None) -> None:
    assert "\n" not in message and str(path) in message
    if tensors is not None:
        assert any(repr(tensor) in message for tensor in tensors), message


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupt_safetensors_is_an_error_naming_the_file(kind, inputs, tmp_path):
    ct = tmp_path / "ct"
    shutil.copytree(inputs["ct"], ct)
    tensors = _corrupt(kind, ct / "model.safetensors")
    out = tmp_path / "merged"
    with pytest.raises(CheckpointError) as caught:
        merge_models(_recipe("ties"), inputs["base"], [ct, inputs["sft"]], out)
    _one_sentence(str(caught.value), ct / "model.safetensors", tensors)
    assert not out.exists() and not _leftovers(tmp_path)


def test_corrupt_shard_of_a_sharded_input_names_the_shard(inputs, tmp_path):
    tensors = load_file(inputs["ct"] / "model.safetensors")
    names = sorted(tensors)
    ct = tmp_path / "ct"
    ct.mkdir()
    shards = {"model-00001-of-00002.safetensors": names[:6],
              "model-00002-of-00002.safetensors": names[6:]}
    for file, members in shards.items():
        save_file({k: tensors[k] for k in members}, ct / file, metadata={"format": "pt"})
    (ct / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, members in shards.items() for k in members}}))
    (ct / "config.json").write_text(json.dumps(CONFIG))
    merge_models(_recipe("ties"), inputs["base"], [ct, inputs["sft"]], tmp_path / "ok")
    shard = ct / "model-00002-of-00002.safetensors"
    tensors = _corrupt("truncated", shard)
    out = tmp_path / "merged"
    with pytest.raises(CheckpointError) as caught:
        merge_models(_recipe("ties"), inputs["base"], [ct, inputs["sft"]], out)
    _one_sentence(str(caught.value), shard, tensors)
    assert not out.exists() and not _leftovers(tmp_path)


@pytest.mark.parametrize("file", ["config.json", "model.safetensors.index.json"])
def test_corrupt_config_or_index_names_the_file(file, inputs, tmp_path):
    ct = tmp_path / "ct"
    shutil.copytree(inputs["ct"], ct)
    (ct / file).write_text('{"vocab_size": 64,')
    with pytest.raises(CheckpointError) as caught:
        merge_models(_recipe("ties"), inputs["base"], [ct, inputs["sft"]], tmp_path / "m")
    _one_sentence(str(caught.value), ct / file, None)


# ---------------------------------------------------------------- mismatched tensors


def test_shape_mismatch_names_the_tensor_and_the_model(inputs, tmp_path):
    tensors = load_file(inputs["sft"] / "model.safetensors")
    tensors[POISONED] = torch.zeros(INTERMEDIATE, HIDDEN + 1)
    sft = _write(tmp_path / "sft", tensors)
    with pytest.raises(ValueError, match=re.escape(
            f"tensor {POISONED!r} has shape [64, 33] in {sft} but [64, 32] in the base "
            f"{inputs['base']}")):
        merge_models(_recipe("ties"), inputs["base"], [inputs["ct"], sft], tmp_path / "m")


def test_dtype_mismatch_names_the_tensor_and_the_model(inputs, tmp_path):
    tensors = load_file(inputs["sft"] / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(HIDDEN, dtype=torch.int32)
    sft = _write(tmp_path / "sft", tensors)
    with pytest.raises(ValueError, match=re.escape(
            f"tensor 'model.norm.weight' is torch.int32 in {sft} but torch.float32 in the base "
            f"{inputs['base']}")):
        merge_models(_recipe("ties"), inputs["base"], [inputs["ct"], sft], tmp_path / "m")


# ---------------------------------------------------------------- the command line


def _cli(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workflow.merge", *args], cwd=PROJECT,
                          capture_output=True, text=True, timeout=300, **kwargs)


def _cli_args(recipe: dict, base: Path, models: list[Path], out: Path) -> list[str]:
    return ["--recipe", json.dumps(recipe), "--base", str(base),
            "--models", *map(str, models), "--out", str(out)]


def test_cli_reports_a_truncated_input_in_one_line(inputs, tmp_path):
    ct = tmp_path / "ct"
    shutil.copytree(inputs["ct"], ct)
    tensors = _corrupt("truncated", ct / "model.safetensors")
    result = _cli(_cli_args(_recipe("ties"), inputs["base"], [ct, inputs["sft"]],
                            tmp_path / "m"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    _one_sentence(last, ct / "model.safetensors", tensors)


def test_cli_refuses_nonfinite_inputs_unless_allowed(inputs, tmp_path):
    ct = _poison(inputs["ct"], tmp_path / "ct", nan=1)
    args = _cli_args(_recipe("ties_sv"), inputs["base"], [ct, inputs["sft"]], tmp_path / "m")
    refused = _cli(args)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: non-finite values (1 NaN, 0 Inf) in tensor {POISONED} of "
        f"{ct / 'model.safetensors'}; set integrity.allow_nonfinite: true (--allow-nonfinite) "
        "to merge anyway")
    allowed = _cli([*args, "--allow-nonfinite"])
    assert allowed.returncode == 0, allowed.stderr
    assert int((~torch.isfinite(load_file(tmp_path / "m" / "model.safetensors")[POISONED])).sum()
               ) == 1


# ---------------------------------------------------------------- what a merge leaves on disk


def test_merged_files_get_normal_permissions(inputs, tmp_path):
    """Under umask 022 every file of a merge is 0644 and every directory 0755, whatever the
    temporary directory (mkdtemp: 0700) or a copied side file (here 0600) had."""
    sft = tmp_path / "sft"
    shutil.copytree(inputs["sft"], sft)
    _tokenizer().save_pretrained(sft)
    os.chmod(sft / "tokenizer.json", 0o600)
    out = tmp_path / "merged"
    result = _cli(_cli_args(_recipe("ties"), inputs["base"], [inputs["ct"], sft], out),
                  umask=0o022)
    assert result.returncode == 0, result.stderr
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")}
    assert modes == dict.fromkeys(modes, 0o644)


def test_a_killed_merge_leaves_no_temporaries_once_rerun(tmp_path):
    """kill -9 mid-merge leaves ``.merged.tmp-*`` (with its preallocated shard); the rerun
    removes it and publishes a complete output."""
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(2048, 4096, generator=gen)  # 32 MB: merging takes long enough to kill
    dirs = [_write(tmp_path / "base", {"w": base})]
    for name in ("ct", "sft"):
        dirs.append(_write(tmp_path / name, {"w": base + 0.01 * torch.randn(base.shape,
                                                                             generator=gen)}))
    out = tmp_path / "merged"
    recipe = _recipe("ties")
    proc = subprocess.Popen([sys.executable, "-m", "workflow.merge",
                             *_cli_args(recipe, dirs[0], dirs[1:], out)], cwd=PROJECT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if any((tmp / "model.safetensors").exists() for tmp in _leftovers(tmp_path)):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait(timeout=60)
    if proc.returncode == -signal.SIGKILL:
        assert not out.exists() and _leftovers(tmp_path)
    else:  # the merge outran the polling: leave a stale temporary by hand instead
        shutil.rmtree(out)
        (tmp_path / ".merged.tmp-xyz").mkdir()
        (tmp_path / ".merged.tmp-xyz" / "model.safetensors").write_bytes(b"\0" * 1024)
    merge_models(recipe, dirs[0], dirs[1:], out)
    assert not _leftovers(tmp_path)
    assert read_json(out / "recipe.json")["recipe"] == recipe
    merged = load_file(out / "model.safetensors")
    assert merged.keys() == {"w"} and torch.isfinite(merged["w"]).all()


@pytest.mark.parametrize("method", ["task_arithmetic", "breadcrumbs"])  # streamed; reference
def test_huge_finite_values_are_not_taken_for_nonfinite(method, inputs, tmp_path):
    """Sums of finite values can overflow to Inf: the exact count then clears the tensor."""
    tensors = load_file(inputs["base"] / "model.safetensors")
    tensors["model.norm.weight"][:4] = 3e38
    base = _write(tmp_path / "base", tensors)
    out = tmp_path / "merged"
    merge_models(_recipe(method), base, [base, base], out)  # zero task vectors: out = base
    assert torch.equal(load_file(out / "model.safetensors")["model.norm.weight"],
                       tensors["model.norm.weight"])


def test_a_refused_merge_leaves_its_traceback_readable(inputs, tmp_path):
    """The kernel refuses NaN after writing into the output shard's map; the traceback's frames
    still hold views of it, and showing their values (pytest, a debugger) must not segfault."""
    ct = _poison(inputs["ct"], tmp_path / "ct", nan=1)
    script = f"""
import traceback
from workflow.merge.engine import CheckpointError, merge_models
try:
    merge_models({_recipe("ties")!r}, {str(inputs["base"])!r}, [{str(ct)!r},
                 {str(inputs["sft"])!r}], {str(tmp_path / "m")!r})
except CheckpointError as error:
    shown = traceback.TracebackException.from_exception(error, capture_locals=True)
    print("".join(shown.format()).count("tensor("), "tensors shown")
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=PROJECT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"^[1-9]\d* tensors shown$", result.stdout, re.M), result.stdout
