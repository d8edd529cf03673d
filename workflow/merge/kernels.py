"""Streaming kernels: the hot methods (linear, task_arithmetic, ties, ties_sv) chunk by chunk.

They compute exactly what the reference functions in :mod:`workflow.merge.methods` compute, op for
op in float32 (tests check bit equality), but:

- Work runs over cache-sized chunks of the flattened tensor into reused buffers, so each of the
  ~20 elementwise passes stays in cache and no full-size float32 temporaries are allocated
  (DESIGN §8: fresh allocations and page faults cost as much as the math).
- The top-k threshold of each task vector is found without sorting: a fixed random sample gives a
  narrow band of |tau| values that must contain the k-th largest; one pass counts the entries
  above the band and collects those inside it, and a selection over the small band gives the
  exact threshold and which tied entries are kept (the lowest flat indices, like
  :func:`~workflow.merge.methods.topk_mask`). When the band misses (never seen in practice) the
  exact whole-tensor selection runs instead.
- Several scales ``lambda`` come out of one pass (a sweep shares everything up to the scaling).
- Diagnostics are counted in the same pass, on the merged delta before the cast to the output
  dtype (its sign and zeros do not depend on a positive lambda).

Inputs are flat 1-D tensors (any float dtype, possibly read-only mmap views); outputs are flat
tensors of the output dtype, written in place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from workflow.merge.methods import (
    Consensus,
    DiagnosticCounts,
    MergeMethod,
    Sparsification,
    kth_largest,
    topk_count,
)

CPU_CHUNK = 1 << 18  # elements: 1 MiB of float32 per buffer keeps the working set in L2/L3
SAMPLE = 1 << 16


@dataclass(frozen=True)
class Keep:
    """The entries a top-k keeps: |tau| > threshold, plus those equal to it up to flat index
    ``cut`` (ties go to the lowest indices; -1: none)."""

    threshold: float
    cut: int = -1

    @staticmethod
    def everything() -> Keep:
        return Keep(-math.inf)

    @staticmethod
    def nothing() -> Keep:
        return Keep(math.inf)

    def mask(self, magnitude: Tensor, start: int, out: Tensor) -> Tensor:
        """The keep mask of the chunk starting at flat index ``start``, into ``out``."""
        torch.gt(magnitude, self.threshold, out=out)
        if self.cut >= start:
            ties = magnitude == self.threshold
            if self.cut < start + magnitude.numel() - 1:
                ties[self.cut - start + 1:] = False
            out |= ties
        return out


@dataclass(frozen=True)
class StreamPlan:
    """What the streaming kernel computes for one method and its resolved parameters."""

    linear: bool
    weights: tuple[float, ...]
    densities: tuple[float, ...]
    trim: bool
    consensus: bool
    normalize: bool
    task_index: int | None
    slack: float

    @property
    def key(self) -> tuple:
        return (self.linear, self.weights, self.densities, self.trim, self.consensus,
                self.normalize, self.task_index, self.slack)


def stream_plan(method: MergeMethod, params: dict, per_model: Sequence[dict],
                task_index: int | None) -> StreamPlan | None:
    """The streaming plan of a method and resolved params, or None where only the reference
    function applies (random, breadcrumbs, rescale, slerp, model_stock)."""
    if method.kernel.__name__ not in ("linear", "generalized_task_arithmetic"):
        return None
    weights = tuple(float(m["weight"]) for m in per_model)
    if method.kernel.__name__ == "linear":
        return StreamPlan(True, weights, (1.0,) * len(weights), False, False,
                          params["normalize"], None, 0.0)
    if method.kernel.__name__ != "generalized_task_arithmetic" or params.get("rescale"):
        return None
    sparsification = method.fixed["sparsification"]
    if sparsification not in (Sparsification.NONE, Sparsification.MAGNITUDE):
        return None
    trim = sparsification is Sparsification.MAGNITUDE
    densities = tuple(float(m["density"]) if trim else 1.0 for m in per_model)
    return StreamPlan(False, weights, densities, trim, method.fixed["consensus"] is Consensus.SUM,
                      params["normalize"], task_index if method.needs_task_model else None,
                      float(params.get("slack", 0.0)))


def _exact_keep(magnitude: Tensor, k: int) -> Keep:
    n = magnitude.numel()
    if k >= n:
        return Keep.everything()
    if k <= 0:
        return Keep.nothing()
    threshold = kth_largest(magnitude, k)
    missing = k - int((magnitude > threshold).count_nonzero())
    return Keep(threshold, _nth_tie(magnitude, threshold, missing, 0))


def _nth_tie(magnitude: Tensor, threshold: float, missing: int, start: int) -> int:
    """Flat index of the ``missing``-th entry equal to ``threshold`` (-1 for none)."""
    if missing <= 0:
        return -1
    ties = (magnitude == threshold).nonzero().squeeze(1)
    return start + int(ties[missing - 1])


def keep_sets(x: Tensor, base: Tensor, ks: Sequence[int], chunk: int,
              device: torch.device) -> list[Keep]:
    """For each k, the top-k entries of ``|x - base|`` (float32), as :class:`Keep`."""
    n = x.numel()
    todo = [i for i, k in enumerate(ks) if 0 < k < n]
    result = [Keep.everything() if k >= n else Keep.nothing() for k in ks]
    if not todo:
        return result
    if n <= chunk:
        magnitude = (x.to(device).float() - base.to(device).float()).abs_()
        for i in todo:
            result[i] = _exact_keep(magnitude, ks[i])
        return result
    # A fixed sample (the result never depends on it, only the speed).
    gen = torch.Generator().manual_seed(n)
    pos = torch.randint(0, n, (SAMPLE,), generator=gen)
    sample = (x[pos].float() - base[pos].float()).abs_().sort(descending=True).values
    bands = []
    for i in todo:
        p = ks[i] / n
        rank = p * SAMPLE
        margin = 6 * math.sqrt(SAMPLE * p * (1 - p)) + 16
        hi_rank, lo_rank = math.floor(rank - margin), math.ceil(rank + margin)
        hi = float(sample[hi_rank]) if hi_rank >= 0 else math.inf
        lo = float(sample[lo_rank]) if lo_rank < SAMPLE else -math.inf
        bands.append((i, lo, hi))
    above = dict.fromkeys(todo, 0)
    values: dict[int, list[Tensor]] = {i: [] for i in todo}
    bf = torch.empty(chunk, dtype=torch.float32, device=device)
    mag = torch.empty(chunk, dtype=torch.float32, device=device)

    def magnitude_of(start: int, end: int) -> Tensor:
        b = bf[: end - start].copy_(base[start:end])
        return torch.sub(x[start:end].to(device), b, out=mag[: end - start]).abs_()

    for start in range(0, n, chunk):
        a = magnitude_of(start, min(n, start + chunk))
        for i, lo, hi in bands:
            above[i] += int((a > hi).count_nonzero())
            values[i].append(a[(a >= lo) & (a <= hi)])
    missing: dict[int, tuple[float, int]] = {}
    for i, _, _ in bands:
        k = ks[i]
        band = torch.cat(values[i])
        values[i] = []
        if not above[i] < k <= above[i] + band.numel():
            # The sample lied: fall back to the exact selection on the whole tensor.
            result[i] = _exact_keep((x.to(device).float() - base.to(device).float()).abs_(), k)
            continue
        threshold = kth_largest(band, k - above[i])
        missing[i] = (threshold, k - above[i] - int((band > threshold).count_nonzero()))
        result[i] = Keep(threshold)
    # Which tied entries are kept: walk the chunks up to the last one needed.
    seen = dict.fromkeys(missing, 0)
    todo = [i for i, (_, need) in missing.items() if need > 0]
    for start in range(0, n, chunk):
        if not todo:
            break
        a = magnitude_of(start, min(n, start + chunk))
        for i in list(todo):
            threshold, need = missing[i]
            count = int((a == threshold).count_nonzero())
            if seen[i] + count >= need:
                result[i] = Keep(threshold, _nth_tie(a, threshold, need - seen[i], start))
                todo.remove(i)
            seen[i] += count
    return result


class _Buffers:
    """Chunk-sized scratch, allocated once per call and reused for every chunk."""

    def __init__(self, models: int, chunk: int, device: torch.device) -> None:
        def f32() -> Tensor:
            return torch.empty(chunk, dtype=torch.float32, device=device)

        def flag() -> Tensor:
            return torch.empty(chunk, dtype=torch.bool, device=device)

        self.base, self.total, self.mixed, self.divisor = f32(), f32(), f32(), f32()
        self.tmp, self.mag, self.raw_task = f32(), f32(), f32()
        self.v = [f32() for _ in range(models)]
        self.keep, self.keep_task, self.protect, self.flag, self.flag2 = (
            flag(), flag(), flag(), flag(), flag())


def stream_merge(
    plan: StreamPlan,
    base: Tensor,
    tensors: Sequence[Tensor],
    outs: Sequence[Tensor],
    lams: Sequence[float],
    *,
    diag_ct: Sequence[int] = (),
    diag_task: int | None = None,
    device: torch.device | str = "cpu",
    chunk: int | None = None,
) -> list[DiagnosticCounts] | None:
    """Merge flat ``tensors`` onto flat ``base`` into each ``outs[j]`` with scale ``lams[j]``.

    With ``diag_task`` (the SFT model's index; ``diag_ct`` the CT models') it also returns the
    diagnostic counts per output, as :func:`~workflow.merge.methods.delta_diagnostics` defines
    them on the merged delta before the cast.
    """
    device = torch.device(device)
    n = base.numel()
    m = len(tensors)
    if chunk is None:
        chunk = CPU_CHUNK if device.type == "cpu" else max(n, 1)
    chunk = max(1, min(chunk, n))
    if n == 0:
        return [DiagnosticCounts() for _ in outs] if diag_task is not None else None

    keeps: list[Keep] = [Keep.everything()] * m
    protect: Keep | None = None
    task = plan.task_index
    if plan.trim or diag_task is not None:
        for i in range(m):
            ks = []
            if plan.densities[i] < 1:
                ks.append(topk_count(plan.densities[i], n))
            if i == task and plan.slack > 0 and plan.weights[i] != 0:
                ks.append(int(plan.slack * n))
            if not ks:
                continue
            found = keep_sets(tensors[i], base, ks, chunk, device)
            if plan.densities[i] < 1:
                keeps[i] = found.pop(0)
            if found:
                protect = found[0]

    buf = _Buffers(m, chunk, device)
    want_diag = diag_task is not None
    signs = sorted({(lam > 0) - (lam < 0) for lam in lams}) if want_diag else []
    counts = {s: DiagnosticCounts() for s in signs}
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        c = end - start
        b = buf.base[:c].copy_(base[start:end])
        vs = [buf.v[i][:c] for i in range(m)]
        if plan.linear:
            for i in range(m):
                vs[i].copy_(tensors[i][start:end])
        else:
            for i in range(m):
                torch.sub(tensors[i][start:end].to(device), b, out=vs[i])
        if want_diag:
            raw = _diag_before(plan, vs, b, diag_ct, diag_task, buf, counts, c)
        top_mass_keep = None
        for i in range(m):
            v = vs[i]
            trim = keeps[i].threshold != -math.inf
            guard = i == task and protect is not None
            if trim or guard:
                mag = torch.abs(v, out=buf.mag[:c])
            if guard:
                prot = protect.mask(mag, start, buf.protect[:c])
                if protect.threshold <= 0:  # only nonzero entries are protected
                    prot &= mag != 0
            if trim:
                keep = keeps[i].mask(mag, start, (buf.keep_task if i == diag_task
                                                  else buf.keep)[:c])
                v.mul_(keep)
                if i == diag_task:
                    top_mass_keep = keep
            if plan.weights[i] != 1:
                v.mul_(plan.weights[i])
        if plan.linear:
            mixed = vs[0]
            for v in vs[1:]:
                mixed += v
            if plan.normalize:
                mixed /= sum(plan.weights)
        else:
            total = vs[0] if m == 1 else torch.add(vs[0], vs[1], out=buf.total[:c])
            for v in vs[2:]:
                total += v
            if plan.consensus:
                positive = torch.ge(total, 0, out=buf.flag[:c])
                if task is not None and protect is not None:
                    positive = torch.where(buf.protect[:c], vs[task] > 0, positive)
                # +1/-1 per entry: v agrees with the elected sign iff v * sign > 0.
                sign = torch.mul(positive, 2, out=buf.tmp[:c]).sub_(1)
                mixed, divisor = buf.mixed[:c], buf.divisor[:c]
                agree = buf.flag2[:c]
                for i in range(m):
                    torch.gt(torch.mul(vs[i], sign, out=buf.mag[:c]), 0, out=agree)
                    if i == 0:
                        torch.mul(vs[0], agree, out=mixed)
                        torch.mul(agree, plan.weights[0], out=divisor)
                    else:
                        mixed += vs[i].mul_(agree)
                        divisor += torch.mul(agree, plan.weights[i], out=buf.mag[:c])
                divisor.masked_fill_(divisor == 0, 1)
                if plan.normalize:
                    mixed /= divisor
            else:
                mixed = total
                if plan.normalize:
                    d = float(sum(plan.weights))
                    mixed /= d if abs(d) >= 1e-8 else 1.0
        if want_diag:
            _diag_after(plan, mixed, b, raw, top_mass_keep, buf, counts, c)
        for lam, out in zip(lams, outs, strict=True):
            target = out[start:end]
            if plan.linear:
                target.copy_(mixed)
                continue
            scaled = mixed if lam == 1 else torch.mul(mixed, lam, out=buf.tmp[:c])
            if target.dtype == torch.float32 and target.device == device:
                torch.add(b, scaled, out=target)
            else:
                target.copy_(torch.add(b, scaled, out=buf.tmp[:c]))
    if not want_diag:
        return None
    return [counts[(lam > 0) - (lam < 0)] for lam in lams]


@dataclass
class _Raw:
    touched: Tensor
    sft: Tensor


def _diag_before(plan: StreamPlan, vs: list[Tensor], b: Tensor, diag_ct: Sequence[int],
                 diag_task: int, buf: _Buffers, counts: dict[int, DiagnosticCounts],
                 c: int) -> _Raw:
    """Counts on the raw task vectors (before trimming); keeps what the merged delta needs."""
    deltas = vs if not plan.linear else [v - b for v in vs]
    sft = buf.raw_task[:c].copy_(deltas[diag_task])
    touched = torch.ne(deltas[0], 0, out=buf.flag2[:c]).clone()
    for d in deltas[1:]:
        touched |= d != 0
    both = conflicts = 0
    for i in diag_ct:
        product = torch.mul(deltas[i], sft, out=buf.tmp[:c])
        both += int(product.count_nonzero())
        conflicts += int((product < 0).count_nonzero())
    nonzero = int(sft.count_nonzero())
    touched_count = int(touched.count_nonzero())
    for cnt in counts.values():
        cnt.both_nonzero += both
        cnt.conflicts += conflicts
        cnt.sft_nonzero += nonzero
        cnt.touched += touched_count
    return _Raw(touched, sft)


def _diag_after(plan: StreamPlan, mixed: Tensor, b: Tensor, raw: _Raw, top: Tensor | None,
                buf: _Buffers, counts: dict[int, DiagnosticCounts], c: int) -> None:
    merged = mixed - b if plan.linear else mixed
    magnitude = raw.sft.abs()
    top_mass = float((magnitude if top is None else magnitude * top).sum(dtype=torch.float64))
    for sign, cnt in counts.items():
        cnt.topk_mass += top_mass
        if sign == 0:  # lambda 0: the merge changes nothing
            cnt.trimmed += int(raw.touched.count_nonzero())
            cnt.sft_dropped += int(raw.sft.count_nonzero())
            continue
        kept = (merged * raw.sft > 0) if sign > 0 else (merged * raw.sft < 0)
        if top is not None:
            kept_top = kept & top
        else:
            kept_top = kept
        cnt.topk_mass_kept += float((magnitude * kept_top).sum(dtype=torch.float64))
        cnt.sft_dropped += int(raw.sft.count_nonzero()) - int(kept.count_nonzero())
        cnt.trimmed += int((raw.touched & (merged == 0)).count_nonzero())
