"""Benchmark: our merge engine against mergekit (``mergekit-yaml``) on a synthetic ~1B Llama.

    python -m workflow.merge.benchmark --workdir /tmp/lrmerge-bench \
        [--mergekit .venv-mergekit/bin/mergekit-yaml] [--layers 16] [--keep]

Builds a bf16 Llama (hidden 2048, intermediate 5632, 16 layers, vocab 32000, untied) and two
fine-tunes of it (base + random deltas spanning many magnitudes, see :func:`fine_tune_delta`),
then runs the same merges with both tools in this one run: TIES (density 0.5, weight 1 each),
task_arithmetic and linear; then a sweep of 8 TIES variants (a lambda grid) in one pass, and
the same sweep computing only its diagnostics (``merge_options.materialize: false``). For
each it prints wall time, peak anonymous memory (RssAnon summed over the process tree, sampled
from /proc: mmap'd file pages would inflate plain RSS), and the ratios; and the I/O floor
(reading the three inputs and writing one output of the same size). The work directory is
deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from torch import Tensor

from workflow.merge.engine import ShardWriter
from workflow.merge.mergekit_yaml import mergekit_yaml

HIDDEN, INTERMEDIATE, LAYERS, VOCAB, HEADS = 2048, 5632, 16, 32000, 16


def llama_layout(layers: int = LAYERS) -> list[tuple[str, torch.dtype, tuple]]:
    bf16 = torch.bfloat16
    layout = [("model.embed_tokens.weight", bf16, (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        layout += [(p + f"self_attn.{n}_proj.weight", bf16, (HIDDEN, HIDDEN)) for n in "qkvo"]
        layout += [(p + "mlp.gate_proj.weight", bf16, (INTERMEDIATE, HIDDEN)),
                   (p + "mlp.up_proj.weight", bf16, (INTERMEDIATE, HIDDEN)),
                   (p + "mlp.down_proj.weight", bf16, (HIDDEN, INTERMEDIATE)),
                   (p + "input_layernorm.weight", bf16, (HIDDEN,)),
                   (p + "post_attention_layernorm.weight", bf16, (HIDDEN,))]
    layout += [("model.norm.weight", bf16, (HIDDEN,)), ("lm_head.weight", bf16, (VOCAB, HIDDEN))]
    return layout


def fine_tune_delta(shape: tuple, gen: torch.Generator) -> Tensor:
    """A float32 delta shaped like a real fine-tune's: Gaussian with a per-row scale drawn
    log-uniformly from [1e-4, 3e-3] (weights are ~0.02), so the bf16 deltas span from 0 and 1 ulp
    to dozens of ulps instead of all tying at +-1 ulp."""
    rows = shape[0] if len(shape) > 1 else 1
    scale = torch.exp(torch.empty(rows, 1).uniform_(math.log(1e-4), math.log(3e-3),
                                                     generator=gen))
    delta = torch.randn(rows, _numel(shape) // rows, generator=gen).mul_(scale)
    return delta.reshape(shape)


def _numel(shape: tuple) -> int:
    return math.prod(shape)


def build_models(root: Path, layers: int = LAYERS) -> list[Path]:
    """base, ft1, ft2: the fine-tunes are bf16(base_fp32 + delta), see :func:`fine_tune_delta`."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=layers, num_attention_heads=HEADS,
                         num_key_value_heads=HEADS, tie_word_embeddings=False,
                         dtype="bfloat16").to_dict()
    config["architectures"] = ["LlamaForCausalLM"]
    layout = llama_layout(layers)
    dirs = [root / name for name in ("base", "ft1", "ft2")]
    writers = []
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(config, indent=2))
        writers.append(ShardWriter(d, layout, 5 * 10**9))
    gen = torch.Generator().manual_seed(0)
    for name, _, shape in layout:
        base = torch.randn(shape, generator=gen) * 0.02
        if name.endswith("norm.weight"):
            base = base + 1
        writers[0].view(name).copy_(base)
        for w in writers[1:]:
            w.view(name).copy_(fine_tune_delta(shape, gen).add_(base))
        del base
    for w in writers:
        w.finish()
    return dirs


class Peak:
    """Samples RssAnon (kB) over a process tree every 50 ms."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        pids, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            try:
                for task in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{task}/children") as handle:
                        todo += [int(c) for c in handle.read().split()]
            except OSError:
                pass
        return pids

    def _loop(self) -> None:
        while not self._stop:
            total = 0
            for pid in self._tree():
                try:
                    with open(f"/proc/{pid}/status") as handle:
                        for line in handle:
                            if line.startswith("RssAnon:"):
                                total += int(line.split()[1])
                except OSError:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.05)

    def stop(self) -> int:
        self._stop = True
        self._thread.join()
        return self.peak


def timed(cmd: list[str], log: Path) -> tuple[float, float]:
    """Wall seconds and peak RssAnon (GB) of a command."""
    start = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT)
        peak = Peak(proc.pid)
        rc = proc.wait()
    wall = time.perf_counter() - start
    peak_kb = peak.stop()
    if rc != 0:
        raise RuntimeError(f"{cmd[:3]} failed (rc {rc}); see {log}")
    return wall, peak_kb / 1e6


def io_floor(inputs: list[Path], out: Path, outputs: int = 1) -> float:
    """Seconds to read every input shard and write ``outputs`` files of the first one's size."""
    buffer = bytearray(64 << 20)
    view = memoryview(buffer)
    start = time.perf_counter()
    size = 0
    for d in inputs:
        for f in sorted(d.glob("*.safetensors")):
            with open(f, "rb", buffering=0) as handle:
                while n := handle.readinto(buffer):
                    size += n if d == inputs[0] else 0
    files = [out.with_name(f"{out.name}-{j}") for j in range(outputs)]
    for file in files:
        with open(file, "wb", buffering=0) as handle:
            left = size
            while left > 0:
                left -= handle.write(view[: min(left, len(buffer))])
    wall = time.perf_counter() - start
    for file in files:
        file.unlink()
    return wall


def recipe(method: str, lam: float = 1.0) -> dict:
    params = {"lambda": lam} if method != "linear" else {}
    dens = {"density": 0.5} if method == "ties" else {}
    return {"stage": "merge", "version": "1", "method": method, "params": params, "base": "b",
            "models": [{"role": "ct", "weight": 1.0, **dens},
                       {"role": "sft", "weight": 1.0, **dens}]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workflow.merge.benchmark",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lrmerge-bench"))
    parser.add_argument("--mergekit", default=os.environ.get(
        "LRMERGE_MERGEKIT", ".venv-mergekit/bin/mergekit-yaml"))
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--layers", type=int, default=LAYERS,
                        help="decoder layers of the synthetic model (default: %(default)s, ~1.1B "
                             "parameters; fewer for a quicker run)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    root = args.workdir
    root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        models = build_models(root / "models", args.layers)
        size = sum(f.stat().st_size for d in models for f in d.iterdir())
        print(f"built 3 models ({size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s; "
              f"torch threads {torch.get_num_threads()}", flush=True)
        base, fts = models[0], models[1:]
        floor = io_floor(models, root / "floor.bin")
        print(f"I/O floor (read 3 inputs + write 1 output): {floor:.1f} s", flush=True)
        rows = []
        for method in ("ties", "task_arithmetic", "linear"):
            r = recipe(method)
            out = root / f"ours-{method}"
            ours = timed([sys.executable, "-m", "workflow.merge", "--recipe", json.dumps(r),
                          "--base", str(base), "--models", *map(str, fts), "--out", str(out)],
                         root / f"ours-{method}.log")
            shutil.rmtree(out)
            theirs = None
            if not args.skip_mergekit:
                cfg = root / f"{method}.yaml"
                cfg.write_text(mergekit_yaml(r, base, fts, dtype="bfloat16"))
                mk_out = root / f"mk-{method}"
                theirs = timed([args.mergekit, str(cfg), str(mk_out)], root / f"mk-{method}.log")
                shutil.rmtree(mk_out)
            rows.append((method, ours, theirs))
            line = f"{method:16s} ours {ours[0]:7.1f} s {ours[1]:5.2f} GB"
            if theirs:
                line += (f" | mergekit {theirs[0]:7.1f} s {theirs[1]:5.2f} GB | speedup "
                         f"{theirs[0] / ours[0]:5.2f}x, memory {theirs[1] / ours[1]:5.1f}x less")
            print(line + f" | ours / I/O floor {ours[0] / floor:4.2f}", flush=True)
        lams = [0.5 + 0.1 * i for i in range(8)]
        outs = [root / f"sweep-{i}" for i in range(8)]
        sweep = timed([sys.executable, "-m", "workflow.merge",
                       "--recipes", json.dumps([recipe("ties", lam) for lam in lams]),
                       "--base", str(base), "--models", *map(str, fts),
                       "--outs", *map(str, outs)], root / "sweep.log")
        for out in outs:
            shutil.rmtree(out)
        # merge_options.materialize: false: the same pass for the diagnostics, no weights.
        diag_only = timed([sys.executable, "-m", "workflow.merge", "--diagnostics-only",
                           "--recipes", json.dumps([recipe("ties", lam) for lam in lams]),
                           "--base", str(base), "--models", *map(str, fts),
                           "--outs", *map(str, outs)], root / "sweep-diagnostics.log")
        for out in outs:
            shutil.rmtree(out)
        single = rows[0][1][0]
        sweep_floor = io_floor(models, root / "floor.bin", outputs=len(outs))
        print(f"sweep of 8 TIES variants (lambda 0.5..1.2) in one pass: {sweep[0]:.1f} s, "
              f"{sweep[1]:.2f} GB = {sweep[0] / single:.2f}x one TIES merge | I/O floor "
              f"(read 3 inputs + write 8 outputs) {sweep_floor:.1f} s = "
              f"{sweep_floor / single:.2f}x one TIES merge", flush=True)
        print(f"the same sweep for its diagnostics only (materialize: false): "
              f"{diag_only[0]:.1f} s, {diag_only[1]:.2f} GB = {diag_only[0] / single:.2f}x one "
              "TIES merge", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
