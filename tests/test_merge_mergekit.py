"""Parity with mergekit 0.1.5, run through its CLI (``mergekit-yaml``) from its own venv.

The mergekit executable is ``$LRMERGE_MERGEKIT`` (default ``.venv-mergekit/bin/mergekit-yaml``,
installed by ``make test``). It is required: a missing mergekit fails these tests, it does not
skip them. Each case merges the same tiny random float32 Llamas (2 layers, hidden 32) with our
engine and with mergekit, using the mergekit YAML our engine writes, and compares every tensor.
To pay mergekit's start-up once, all cases run in one process of that venv's python (the
``mergekit-yaml`` entry point's own interpreter) through mergekit's ``run_merge``, which is what
``mergekit-yaml`` calls.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from workflow.merge.engine import MERGEKIT_FILE, merge_models

ROOT = Path(__file__).resolve().parents[1]
MERGEKIT = Path(os.environ.get("LRMERGE_MERGEKIT", ROOT / ".venv-mergekit/bin/mergekit-yaml"))


def _save(directory: Path, seed: int, scale: float) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if seed:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=gen) * scale)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    return {"base": _save(root / "base", 0, 0), "ct": _save(root / "ct", 1, 0.02),
            "sft": _save(root / "sft", 2, 0.02)}


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        out = {}
        for file in set(json.loads(index.read_text())["weight_map"].values()):
            out.update(load_file(directory / file))
        return out
    return load_file(directory / "model.safetensors")


def _recipe(method: str, params: dict, ct: dict, sft: dict) -> dict:
    return {"stage": "merge", "version": "1", "method": method, "params": params, "base": "b",
            "models": [{"role": "ct", **ct}, {"role": "sft", **sft}]}


CASES = [
    ("linear", {}, {"weight": 0.3}, {"weight": 0.7}),
    ("linear", {"normalize": False}, {"weight": 0.3}, {"weight": 0.5}),
    ("task_arithmetic", {"lambda": 0.8}, {"weight": 1.0}, {"weight": 0.6}),
    ("ties", {}, {"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}),
    ("ties", {"lambda": 1.2, "normalize": False}, {"weight": 0.7, "density": 0.3},
     {"weight": 1.3, "density": 0.8}),
    ("breadcrumbs", {}, {"weight": 1.0, "density": 0.6, "gamma": 0.05},
     {"weight": 0.8, "density": 0.7}),
    ("breadcrumbs_ties", {"lambda": 0.9}, {"weight": 1.0, "density": 0.5},
     {"weight": 1.0, "density": 0.6, "gamma": 0.02}),
    ("slerp", {"t": 0.3}, {}, {}),
    ("model_stock", {}, {}, {}),
]


RUNNER = """
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
for config, out in zip(sys.argv[1::2], sys.argv[2::2]):
    with open(config) as handle:
        run_merge(MergeConfiguration.model_validate(yaml.safe_load(handle)), out,
                  options=MergeOptions())
"""


def test_mergekit_is_installed():
    assert MERGEKIT.is_file(), (
        f"mergekit-yaml not found at {MERGEKIT}: run `make test` (it installs mergekit 0.1.5 into "
        ".venv-mergekit) or point LRMERGE_MERGEKIT at it")


@pytest.fixture(scope="module")
def merged(models, tmp_path_factory):
    """Every case merged by us and by mergekit: {case index: (ours dir, theirs dir)}."""
    assert MERGEKIT.is_file(), f"mergekit-yaml not found at {MERGEKIT}"
    root = tmp_path_factory.mktemp("merged")
    pairs, argv = {}, []
    for i, (method, params, ct, sft) in enumerate(CASES):
        ours = root / f"ours-{i}"
        merge_models(_recipe(method, params, ct, sft), models["base"],
                     [models["ct"], models["sft"]], ours)
        assert (ours / MERGEKIT_FILE).is_file(), method
        pairs[i] = (ours, root / f"theirs-{i}")
        argv += [str(ours / MERGEKIT_FILE), str(root / f"theirs-{i}")]
    python = MERGEKIT.parent / "python"
    run = subprocess.run([str(python), "-c", RUNNER, *argv], capture_output=True, text=True,
                         timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return pairs


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0]}-{i}" for i, c in
                                                          enumerate(CASES)])
def test_matches_mergekit(models, merged, case):
    method = CASES[case][0]
    ours, theirs = merged[case]
    a, b = _tensors(ours), _tensors(theirs)
    assert set(a) == set(b)
    base = _tensors(models["base"])
    for name in a:
        assert a[name].dtype == b[name].dtype == torch.float32, name
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
        # and the merge did something (no silent pass-through)
        assert not torch.equal(a[name], base[name]), (method, name)
