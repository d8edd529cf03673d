"""Streaming kernels: the hot methods (linear, task_arithmetic, ties, ties_sv, ties_yadav) chunk
by chunk.

They compute exactly what the reference functions in :mod:`workflow.merge.methods` compute, op for
op in float32 (tests check bit equality), but:

- Work runs over cache-sized chunks of the flattened tensor into reused per-thread buffers, so
  each elementwise pass stays in cache and no full-size float32 temporaries are allocated
  (DESIGN §8: fresh allocations and page faults cost as much as the math).
- Chunks are spread over a pool of worker threads that each run torch single-threaded. torch's
  own intra-op threading splits every ~20 us op over all cores and waits for the slowest: on a
  machine shared with another job (a training run) one descheduled thread stalls each op for a
  time slice, and a merge was measured 5-20x slower that way. Chunk-level threads only meet at
  the end of a tensor. Results do not depend on the thread count or timing (per-chunk counts are
  summed in chunk order).
- The top-k threshold of each task vector is found without sorting: a fixed random sample gives a
  narrow band of |tau| values that must contain the k-th largest; one pass over the chunks, shared
  by all models (the base is converted once), counts the entries above each band and collects
  those inside it (numpy compares: torch's bool-output ops are ~5x slower on CPU), and a selection
  over the band gives the exact threshold. Ties at the threshold are kept from the lowest flat
  index up (like :func:`~workflow.merge.methods.topk_mask`): the per-chunk bands already hold
  every tied entry, so counting them per chunk finds the one chunk where the cut falls, and only
  that chunk is read again. Huge tie groups (bf16 deltas of one ulp) cost O(n) like everything
  else. When the band misses (never seen in practice) the exact whole-tensor selection runs
  instead. The steps between the passes (sample, selection) run per model on the workers, and
  the caller's own torch ops run single-threaded meanwhile: with torch's default intra-op
  threads they were measured 4x slower on a shared machine, and were most of a TIES merge.
- NaN magnitudes (inputs merged with ``allow_nonfinite``) rank below every number, as in
  :func:`~workflow.merge.methods.topk_mask`: every compare with NaN is false, so they never
  count above a band nor fall inside one, and a sample they distort only sends the selection to
  the exact fallback.
- Masks in the merge pass are float 0/1, not bool: multiplying by them is bit for bit the same
  and torch writes them several times faster on CPU. A keep mask is one compare per entry
  (``>=`` up to the tie cut, ``>`` after it).
- Several scales ``lambda`` come out of one pass (a sweep shares everything up to the scaling).
- Diagnostics are counted in the same pass, on the merged delta before the cast to the output
  dtype (its sign and zeros do not depend on a positive lambda), with float sign vectors and
  dot products rather than boolean masks and counts (several times cheaper on CPU; counts of
  at most 2^24 per chunk are exact in float32).

Inputs are flat 1-D tensors (any float dtype, possibly read-only mmap views); outputs are flat
tensors of the output dtype, written in place.

ties_yadav trims over the whole model, so its thresholds cannot come from one tensor:
:func:`whole_model_statistics` streams the model's tensors three times before the merge (two
passes of an exact radix selection on the float32 bits of |tau|, :class:`MagnitudeSelection`,
then one counting the elected signs for the majority), in chunks on the worker threads, holding
a few 65,536-bin histograms per model and one tensor at a time. Its merge pass is this TIES
kernel with weights 1, the given thresholds (keep ``>=``, every tie) and the majority sign for
zero sums. Measured: 1.6x the time of a per-tensor ties merge of the same inputs (117M bf16
parameters, two models, density 0.5, on 2 shared CPU cores).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from workflow.merge.methods import (
    Consensus,
    DiagnosticCounts,
    MergeMethod,
    Sparsification,
    kth_largest,
    nan_count,
    topk_count,
)

CPU_CHUNK = 1 << 18  # elements: 1 MiB of float32 per buffer keeps the working set in L2/L3
MAX_CHUNK = 1 << 24  # float32 sums of 0/1 stay exact up to here (GPU chunks are whole tensors)
SAMPLE = 1 << 16
T = TypeVar("T")


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
        """The keep mask of the chunk starting at flat index ``start``, into ``out`` (bool, or
        float 0/1: torch writes float masks several times faster than bool ones on CPU)."""
        # Entries up to the cut keep ties too: >= there, > after (one compare per entry).
        split = min(max(self.cut - start + 1, 0), magnitude.numel())
        torch.ge(magnitude[:split], self.threshold, out=out[:split])
        torch.gt(magnitude[split:], self.threshold, out=out[split:])
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
    # ties_yadav: per model, keep |tau| >= threshold (whole-model values, -inf: keep all) ...
    thresholds: tuple[float, ...] | None = None
    # ... and the sign elected where the sum is exactly 0 (+1 or -1; None: the sum's sign bit).
    zero_sign: float | None = None

    @property
    def key(self) -> tuple:
        return (self.linear, self.weights, self.densities, self.trim, self.consensus,
                self.normalize, self.task_index, self.slack, self.thresholds, self.zero_sign)


def stream_plan(method: MergeMethod, params: dict, per_model: Sequence[dict],
                task_index: int | None,
                context: Mapping[str, Any] | None = None) -> StreamPlan | None:
    """The streaming plan of a method and resolved params (``context``: a whole-model method's
    statistics), or None where only the reference function applies (random, breadcrumbs,
    rescale, slerp, model_stock)."""
    if method.kernel.__name__ == "ties_yadav":
        if context is None:
            return None
        # Unweighted disjoint mean: TIES with weights 1 and given thresholds; a zero-sum
        # election takes the majority sign (0 elects the negative side, as the reference).
        m = len(per_model)
        return StreamPlan(False, (1.0,) * m, tuple(float(d["density"]) for d in per_model),
                          True, True, True, None, 0.0,
                          thresholds=tuple(float(t) for t in context["thresholds"]),
                          zero_sign=1.0 if context["majority"] > 0 else -1.0)
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



# --------------------------------------------------------------------------------------------
# Chunk-level threads
# --------------------------------------------------------------------------------------------

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
_LOCAL = threading.local()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            # torch's thread setting is per OS thread: workers run single-threaded, the caller's
            # own setting is untouched.
            _POOL = ThreadPoolExecutor(max(1, torch.get_num_threads()),
                                       thread_name_prefix="lrmerge-chunk",
                                       initializer=torch.set_num_threads, initargs=(1,))
        return _POOL


def _map(fn: Callable[[int], T], starts: Iterable[int], device: torch.device) -> list[T]:
    """``fn`` over chunk starts, results in order: on worker threads on CPU, inline otherwise."""
    starts = list(starts)
    if device.type != "cpu":
        return [fn(s) for s in starts]
    return list(_pool().map(fn, starts))


def _scratch(key: tuple, make: Callable[[], T]) -> T:
    """A per-thread buffer set, made once per (thread, key) and reused for every chunk."""
    cache = getattr(_LOCAL, "cache", None)
    if cache is None:
        cache = _LOCAL.cache = {}
    if key not in cache:
        if len(cache) > 8:  # shapes vary little (model count, chunk); keep memory bounded
            cache.clear()
        cache[key] = make()
    return cache[key]


# --------------------------------------------------------------------------------------------
# Top-k keep sets
# --------------------------------------------------------------------------------------------


@contextmanager
def _serial() -> Iterator[None]:
    """Run this thread's torch ops single-threaded (see the module docstring: an op split over
    cores on a shared machine waits for a descheduled thread; the small ops between the chunk
    passes, a sample sort or a band count, were measured 4x slower than single-threaded)."""
    _pool()  # sized from the caller's setting, before it changes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@lru_cache(maxsize=32)
def _sample_positions(n: int) -> Tensor:
    """SAMPLE fixed random flat indices below n, sorted (reads in address order)."""
    gen = torch.Generator().manual_seed(n)
    return torch.randint(0, n, (SAMPLE,), generator=gen).sort().values


def _exact_keep(magnitude: Tensor, k: int) -> Keep:
    n = magnitude.numel()
    if k <= 0:
        return Keep.nothing()
    # NaN magnitudes (allow_nonfinite) rank below every number, as in topk_mask: a k reaching
    # past the numbers keeps them all, which is everything (a mask leaves NaN as it is).
    nan = nan_count(magnitude) if k < n else 0
    if k >= n - nan:
        return Keep.everything()
    threshold = kth_largest(magnitude, k, nan)
    missing = k - int((magnitude > threshold).count_nonzero())
    return Keep(threshold, _nth_tie(magnitude, threshold, missing, 0))


def _nth_tie(magnitude: Tensor, threshold: float, missing: int, start: int) -> int:
    """Flat index of the ``missing``-th entry equal to ``threshold`` (-1 for none).

    ``threshold`` is a number (the selections skip NaN), so the ties counted before the call
    are there; a shortfall would be a bug in the selection, reported as one."""
    if missing <= 0:
        return -1
    ties = (magnitude == threshold).nonzero().squeeze(1)
    if ties.numel() < missing:
        raise RuntimeError(f"top-k selection found {ties.numel()} entries equal to its "
                           f"threshold {threshold} where it needs {missing}")
    return start + int(ties[missing - 1])


def _magnitude(x: Tensor, base: Tensor, start: int, end: int, chunk: int,
               device: torch.device) -> Tensor:
    """|x - base| (float32) of one chunk, in this thread's scratch buffers."""
    bf, mag = _scratch(("mag", chunk, device), lambda: (
        torch.empty(chunk, dtype=torch.float32, device=device),
        torch.empty(chunk, dtype=torch.float32, device=device)))
    b = bf[: end - start].copy_(base[start:end])
    return torch.sub(x[start:end].to(device), b, out=mag[: end - start]).abs_()


def _band_scan(a: Tensor, lo: float, hi: float) -> tuple[int, Tensor | np.ndarray]:
    """How many entries of ``a`` exceed ``hi``, and those in ``[lo, hi]`` (in index order)."""
    if a.device.type != "cpu":
        return int((a > hi).count_nonzero()), a[(a >= lo) & (a <= hi)]
    # numpy's comparisons into bool arrays are ~5x faster than torch's on CPU (torch vectorizes
    # float outputs, not bool ones) and np.compress beats boolean indexing. The band stays a
    # numpy array: torch.from_numpy on each small piece was measured to pin ~1 MB apiece.
    an = a.numpy()
    flag, flag2 = _scratch(("band", a.numel()), lambda: (
        np.empty(a.numel(), dtype=np.bool_), np.empty(a.numel(), dtype=np.bool_)))
    above = int(np.count_nonzero(np.greater(an, hi, out=flag)))
    np.greater_equal(an, lo, out=flag)
    np.less_equal(an, hi, out=flag2)
    return above, np.compress(np.logical_and(flag, flag2, out=flag), an)


def _count_equal(piece: Tensor | np.ndarray, value: float) -> int:
    if isinstance(piece, np.ndarray):
        return int(np.count_nonzero(piece == np.float32(value)))
    return int((piece == value).count_nonzero())


def keep_sets(x: Tensor, base: Tensor, ks: Sequence[int], chunk: int,
              device: torch.device) -> list[Keep]:
    """For each k, the top-k entries of ``|x - base|`` (float32), as :class:`Keep`."""
    return keep_sets_many([x], base, [ks], chunk, device)[0]


def keep_sets_many(xs: Sequence[Tensor], base: Tensor, ks: Sequence[Sequence[int]], chunk: int,
                   device: torch.device) -> list[list[Keep]]:
    """:func:`keep_sets` of each ``xs[i]`` with its ``ks[i]``, in one pass over the chunks (the
    base is read once per chunk for every model)."""
    with _serial():
        return _keep_sets_many(xs, base, ks, chunk, device)


def _keep_sets_many(xs: Sequence[Tensor], base: Tensor, ks: Sequence[Sequence[int]], chunk: int,
                    device: torch.device) -> list[list[Keep]]:
    n = base.numel()
    result = [[Keep.everything() if k >= n else Keep.nothing() for k in model_ks]
              for model_ks in ks]
    todo = [(i, j) for i, model_ks in enumerate(ks) for j, k in enumerate(model_ks) if 0 < k < n]
    if not todo:
        return result
    if n <= chunk:
        b = base.to(device).float()
        for i in sorted({i for i, _ in todo}):
            magnitude = (xs[i].to(device).float() - b).abs_()
            for i2, j in todo:
                if i2 == i:
                    result[i][j] = _exact_keep(magnitude, ks[i][j])
        return result
    # A fixed sample (the result never depends on it, only the speed).
    pos = _sample_positions(n)
    base_sample = base[pos].float()
    per_model: dict[int, list[int]] = {}
    for i, j in todo:
        per_model.setdefault(i, []).append(j)

    def band_limits(i: int) -> list[tuple[int, float, float]]:
        sample = (xs[i][pos].float() - base_sample).abs_().numpy()
        limits = []
        for j in per_model[i]:
            p = ks[i][j] / n
            rank = p * SAMPLE
            margin = 6 * math.sqrt(SAMPLE * p * (1 - p)) + 16
            hi_rank, lo_rank = math.floor(rank - margin), math.ceil(rank + margin)
            # Descending rank r is ascending index SAMPLE - 1 - r: two selections, no sort.
            hi = float(np.partition(sample, SAMPLE - 1 - hi_rank)[SAMPLE - 1 - hi_rank]) \
                if hi_rank >= 0 else math.inf
            lo = float(np.partition(sample, SAMPLE - 1 - lo_rank)[SAMPLE - 1 - lo_rank]) \
                if lo_rank < SAMPLE else -math.inf
            limits.append((j, lo, hi))
        return limits

    models = sorted(per_model)
    # Per model on the workers: the random reads of the sample fault pages in, slowly.
    bands = dict(zip(models, _map(band_limits, models, device), strict=True))

    def scan(start: int) -> list[list[tuple[int, Tensor | np.ndarray]]]:
        end = min(n, start + chunk)
        bf, mag = _scratch(("mag", chunk, device), lambda: (
            torch.empty(chunk, dtype=torch.float32, device=device),
            torch.empty(chunk, dtype=torch.float32, device=device)))
        b = bf[: end - start].copy_(base[start:end])
        found = []
        for i in models:  # the base converted once for every model
            a = torch.sub(xs[i][start:end].to(device), b, out=mag[: end - start]).abs_()
            found.append([_band_scan(a, lo, hi) for _, lo, hi in bands[i]])
        return found

    starts = range(0, n, chunk)
    scanned = _map(scan, starts, device)

    def select(s: int) -> list[Keep]:
        """The keep sets of models[s] from the scan (on a worker: models run in parallel)."""
        i = models[s]
        found = []
        for b, (j, _, _) in enumerate(bands[i]):
            k = ks[i][j]
            above = sum(per_chunk[s][b][0] for per_chunk in scanned)
            pieces = [per_chunk[s][b][1] for per_chunk in scanned]
            band = (torch.from_numpy(np.concatenate(pieces))
                    if isinstance(pieces[0], np.ndarray) else torch.cat(pieces))
            if not above < k <= above + band.numel():
                # The sample lied: fall back to the exact selection on the whole tensor.
                found.append(_exact_keep(
                    (xs[i].to(device).float() - base.to(device).float()).abs_(), k))
                continue
            threshold = kth_largest(band, k - above)
            need = k - above - int((band > threshold).count_nonzero())
            del band
            cut = -1
            if need > 0:
                # Every entry tied at the threshold lies in the bands: count them per chunk to
                # find the chunk holding the need-th one, and read only that chunk again.
                seen = 0
                for start, piece in zip(starts, pieces, strict=True):
                    count = _count_equal(piece, threshold)
                    if seen + count >= need:
                        end = min(n, start + chunk)
                        a = _magnitude(xs[i], base, start, end, chunk, device)
                        cut = _nth_tie(a, threshold, need - seen, start)
                        break
                    seen += count
            found.append(Keep(threshold, cut))
        return found

    for i, found in zip(models, _map(select, range(len(models)), device), strict=True):
        for (j, _, _), keep in zip(bands[i], found, strict=True):
            result[i][j] = keep
    return result


# --------------------------------------------------------------------------------------------
# Whole-model top-k (ties_yadav)
# --------------------------------------------------------------------------------------------

_RADIX = 1 << 16


class MagnitudeSelection:
    """Exact order statistics of the float32 magnitudes of a stream of tensors, in two passes
    and O(1) memory: a radix selection on the bits.

    A non-negative float32 orders like its bits read as an integer, so pass 1 counts the top 16
    bits of every magnitude (:meth:`count_high`); :meth:`choose` finds, for each wanted rank,
    the bin it falls in, and pass 2 counts the low 16 bits inside those bins only
    (:meth:`count_low`); :meth:`value` reads the exact value off the two histograms. Ties need
    no care: the value is what is selected, and every entry equal to it is kept (``>=``, as the
    reference does). NaN magnitudes count as 0: they rank at the bottom, and a threshold at 0
    keeps everything anyway (a mask cannot remove NaN). The counting is split into pure
    functions (:meth:`high_counts`, :meth:`low_counts`) and sums (:meth:`add_high`,
    :meth:`add_low`) so that chunks can be counted on worker threads.
    """

    def __init__(self) -> None:
        self.n = 0
        self._high = np.zeros(_RADIX, dtype=np.int64)
        self._low: dict[int, np.ndarray] = {}  # high bin -> histogram of the low bits
        self._where: dict[int, tuple[int, int]] = {}  # rank -> (high bin, rank inside it)

    @staticmethod
    def _keys(magnitude: Tensor) -> Tensor:
        flat = magnitude.reshape(-1).float()
        if nan_count(flat):
            flat = torch.where(torch.isnan(flat), 0.0, flat)
        return flat.contiguous().view(torch.int32)

    @staticmethod
    def _bincount(keys: Tensor) -> np.ndarray:
        # torch's bincount takes int32 as it is (numpy's casts first: measured 10x slower).
        return keys.bincount(minlength=_RADIX).cpu().numpy()

    @staticmethod
    def high_counts(magnitude: Tensor) -> np.ndarray:
        """Pass 1 of some magnitudes: the histogram of their top 16 bits."""
        keys = MagnitudeSelection._keys(magnitude)
        return MagnitudeSelection._bincount(keys >> 16) if keys.numel() else \
            np.zeros(_RADIX, dtype=np.int64)

    @property
    def bins(self) -> list[int]:
        """The high bins pass 2 counts inside (after :meth:`choose`)."""
        return list(self._low)

    @staticmethod
    def low_counts(magnitude: Tensor, bins: Sequence[int]) -> dict[int, np.ndarray]:
        """Pass 2 of some magnitudes: per high bin, the histogram of the low 16 bits inside."""
        keys = MagnitudeSelection._keys(magnitude)
        high = keys >> 16
        counts = {}
        for bin_ in bins:
            inside = keys[high == bin_]
            if inside.numel():
                counts[bin_] = MagnitudeSelection._bincount(inside & 0xFFFF)
        return counts

    def add_high(self, counts: np.ndarray) -> None:
        self.n += int(counts.sum())
        self._high += counts

    def add_low(self, counts: Mapping[int, np.ndarray]) -> None:
        for bin_, histogram in counts.items():
            self._low[bin_] += histogram

    def count_high(self, magnitude: Tensor) -> None:
        """Pass 1: count the top 16 bits of each magnitude."""
        self.add_high(self.high_counts(magnitude))

    def choose(self, ranks: Iterable[int]) -> None:
        """After pass 1: the 1-based ascending ranks (1 <= rank <= n) :meth:`value` will give."""
        cumulative = np.cumsum(self._high)
        for rank in ranks:
            if not 1 <= rank <= self.n:
                raise ValueError(f"rank {rank} outside 1..{self.n}")
            high = int(np.searchsorted(cumulative, rank))  # the first bin reaching the rank
            before = int(cumulative[high - 1]) if high else 0
            self._where[rank] = (high, rank - before)
            self._low.setdefault(high, np.zeros(_RADIX, dtype=np.int64))

    def count_low(self, magnitude: Tensor) -> None:
        """Pass 2 (same tensors as pass 1): count the low 16 bits inside the chosen bins."""
        self.add_low(self.low_counts(magnitude, self.bins))

    def value(self, rank: int) -> float:
        """The rank-th smallest magnitude (after both passes)."""
        high, within = self._where[rank]
        low = int(np.searchsorted(np.cumsum(self._low[high]), within))
        return float(np.array([(high << 16) | low], dtype=np.int32).view(np.float32)[0])


STATS_CHUNK = 1 << 20  # elements per work item of the statistics passes


def whole_model_statistics(tensors: Callable[[], Iterable[tuple[Tensor, list[Tensor]]]],
                           density_sets: Sequence[Sequence[float]],
                           chunk: int = STATS_CHUNK) -> list[dict[str, Any]]:
    """ties_yadav's whole-model statistics, streamed: three passes over ``tensors()``, which
    yields (base, models) per merged tensor (the same tensors, in the same order, each time).

    For each density set (one density per model) returns the kernel's context: per model
    ``thresholds`` (the (n - k)-th smallest |tau| over all n merged entries, k = int(d n);
    -inf where k == n) and ``majority`` (sign of #positive - #negative elected signs
    ``sign(sum_i tau_hat_i)`` over the whole model, :func:`~workflow.merge.methods.
    yadav_trimmed` on each chunk). Each tensor is counted in chunks on the worker threads
    (counts are integers: the result does not depend on the order). Memory: a few histograms
    per model, one tensor's chunks at a time. Only models some density trims are selected over.
    """
    from workflow.merge.methods import yadav_keep_count, yadav_sign_counts, yadav_trimmed

    models = len(density_sets[0]) if density_sets else 0
    trimmed_models = sorted({i for ds in density_sets for i, d in enumerate(ds) if d < 1})
    selections = {i: MagnitudeSelection() for i in trimmed_models}

    def each_chunk(fn: Callable[[Tensor, list[Tensor]], T]) -> Iterator[T]:
        """``fn`` of every chunk of every tensor, base and models sliced alike."""
        for base, xs in tensors():
            b, flat = base.reshape(-1), [x.reshape(-1) for x in xs]
            n = b.numel()

            def one(start: int, b: Tensor = b, flat: list[Tensor] = flat, n: int = n) -> T:
                end = min(n, start + chunk)
                return fn(b[start:end], [x[start:end] for x in flat])

            yield from _map(one, range(0, n, chunk), b.device)

    def magnitudes(b: Tensor, xs: list[Tensor]) -> list[Tensor]:
        b32 = b.float()
        return [(xs[i].float() - b32).abs_() for i in trimmed_models]

    ranks: dict[tuple[int, float], int | None] = {}
    if selections:
        for found in each_chunk(lambda b, xs: [MagnitudeSelection.high_counts(m)
                                               for m in magnitudes(b, xs)]):
            for i, counts in zip(trimmed_models, found, strict=True):
                selections[i].add_high(counts)
        for ds in density_sets:
            for i in trimmed_models:
                n = selections[i].n
                k = yadav_keep_count(ds[i], n)
                ranks[(i, ds[i])] = n - k if k < n else None
        for i in trimmed_models:
            selections[i].choose({r for (j, _), r in ranks.items() if j == i and r})
        bins = [selections[i].bins for i in trimmed_models]
        for found in each_chunk(lambda b, xs: [
                MagnitudeSelection.low_counts(m, chosen)
                for m, chosen in zip(magnitudes(b, xs), bins, strict=True)]):
            for i, counts in zip(trimmed_models, found, strict=True):
                selections[i].add_low(counts)
    thresholds = []
    for ds in density_sets:
        row = []
        for i in range(models):
            rank = ranks.get((i, ds[i]))
            row.append(selections[i].value(rank) if rank else -math.inf)
        thresholds.append(row)
    totals = [[0, 0] for _ in density_sets]
    for found in each_chunk(lambda b, xs: [yadav_sign_counts(yadav_trimmed(b, xs, row))
                                           for row in thresholds]):
        for total, (positive, negative) in zip(totals, found, strict=True):
            total[0] += positive
            total[1] += negative
    return [{"thresholds": row, "majority": (pos > neg) - (pos < neg)}
            for row, (pos, neg) in zip(thresholds, totals, strict=True)]


# --------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------


class _Buffers:
    """Chunk-sized scratch of one thread, reused for every chunk."""

    def __init__(self, models: int, chunk: int, device: torch.device) -> None:
        def f32() -> Tensor:
            return torch.empty(chunk, dtype=torch.float32, device=device)

        def flag() -> Tensor:
            return torch.empty(chunk, dtype=torch.bool, device=device)

        self.base, self.total, self.mixed, self.divisor = f32(), f32(), f32(), f32()
        self.tmp, self.tmp2, self.mag, self.raw_task, self.top = f32(), f32(), f32(), f32(), f32()
        self.s_sft, self.a_sft, self.touched = f32(), f32(), f32()
        self.v = [f32() for _ in range(models)]
        self.d = [f32() for _ in range(models)]  # linear's task vectors, for diagnostics
        # dot(ones, x) sums x in the same order as dot(mask, x): "all kept" gives exactly 1.
        self.ones = torch.ones(chunk, dtype=torch.float32, device=device)
        # Masks are float 0/1 (multiplying by them is what a bool mask does, bit for bit, and
        # torch writes and reads them several times faster on CPU); protect stays bool.
        self.keep, self.flag, self.flag2 = f32(), f32(), f32()
        self.protect = flag()


class NonFiniteInput(ValueError):
    """``stream_merge(require_finite=True)`` read a NaN or Inf in the base or a tensor; the
    caller, which knows the files, finds out which."""


# Per-chunk diagnostic sums: both_nonzero, conflicts, sft_nonzero, touched, topk_mass, then per
# lambda sign (-1, 0, 1 as present): sft kept count, top-k mass kept, trimmed.
_FIXED = 5


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
    require_finite: bool = False,
) -> list[DiagnosticCounts] | None:
    """Merge flat ``tensors`` onto flat ``base`` into each ``outs[j]`` with scale ``lams[j]``.

    With ``diag_task`` (the SFT model's index; ``diag_ct`` the CT models') it also returns the
    diagnostic counts per output, as :func:`~workflow.merge.methods.delta_diagnostics` defines
    them on the merged delta before the cast. With ``require_finite`` it raises
    :class:`NonFiniteInput` once every chunk is done (``outs`` then hold garbage) if the base or
    a tensor held NaN or Inf, or values whose float32 sums overflow.
    """
    device = torch.device(device)
    n = base.numel()
    m = len(tensors)
    if chunk is None:
        chunk = CPU_CHUNK if device.type == "cpu" else MAX_CHUNK
    chunk = max(1, min(chunk, n, MAX_CHUNK))
    if n == 0:
        return [DiagnosticCounts() for _ in outs] if diag_task is not None else None

    keeps: list[Keep] = [Keep.everything()] * m
    protect: Keep | None = None
    task = plan.task_index
    if plan.thresholds is not None:
        # Keep every entry >= its threshold: a tie cut past the end.
        keeps = [Keep(t, n) if t != -math.inf else Keep.everything() for t in plan.thresholds]
    elif plan.trim:
        ks: list[list[int]] = []
        for i in range(m):
            ks.append([])
            if plan.densities[i] < 1:
                ks[i].append(topk_count(plan.densities[i], n))
            if i == task and plan.slack > 0 and plan.weights[i] != 0:
                ks[i].append(int(plan.slack * n))
        found = keep_sets_many(tensors, base, ks, chunk, device)
        for i in range(m):
            if plan.densities[i] < 1:
                keeps[i] = found[i].pop(0)
            if found[i]:
                protect = found[i][0]

    signs = sorted({(lam > 0) - (lam < 0) for lam in lams}) if diag_task is not None else []
    positive_weights = all(w > 0 for w in plan.weights)
    # Where all weights are positive a nonzero divisor is at least the smallest weight, so a
    # clamp replaces the compare-and-fill of zero divisors (their numerator is 0 there).
    floor = float(torch.tensor(min(plan.weights) / 2, dtype=torch.float32)) \
        if positive_weights else 0.0

    def work(start: int) -> tuple[list[float] | None, bool]:
        end = min(n, start + chunk)
        c = end - start
        buf = _scratch(("merge", m, chunk, device), lambda: _Buffers(m, chunk, device))
        b = buf.base[:c].copy_(base[start:end])
        vs = [buf.v[i][:c] for i in range(m)]
        for i in range(m):
            x = tensors[i][start:end].to(device)
            if plan.linear:
                vs[i].copy_(x)
            else:
                torch.sub(x, b, out=vs[i])
        finite = True
        if require_finite:
            # NaN and Inf survive a sum (x - b is finite only where both are): one sum per
            # float32 copy, in cache, cost 1-8% of a linear or task arithmetic merge, a
            # separate pass over bf16 inputs ~15%.
            total = float(b.sum())
            for v in vs:
                total += float(v.sum())
            finite = math.isfinite(total)
        sums: list[float] | None = None
        if diag_task is not None:
            sums, raw = _diag_before(plan, vs, b, diag_ct, diag_task, buf, c)
        top: Tensor | None = None
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
                keep = keeps[i].mask(mag, start, buf.keep[:c])
                v.mul_(keep)
                if i == diag_task:
                    # The top-k mass: |trimmed sft| (zeros weigh nothing).
                    top = torch.abs(v, out=buf.top[:c])
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
                if task is not None and protect is not None:
                    positive = torch.ge(total, 0, out=buf.flag[:c])
                    positive = torch.where(buf.protect[:c], vs[task] > 0, positive)
                    sign = torch.mul(positive, 2, out=buf.tmp[:c]).sub_(1)
                else:
                    # +1 where total >= 0, else -1. copysign gives -1 at total == -0.0 too, but
                    # a sum is -0.0 only where every v is, and then no v agrees with any sign.
                    sign = torch.copysign(buf.ones[:c], total, out=buf.tmp[:c])
                    if plan.zero_sign is not None:
                        sign.masked_fill_(total == 0, plan.zero_sign)
                # v agrees with the elected sign iff v * sign > 0 (sign is +1/-1).
                mixed, divisor = buf.mixed[:c], buf.divisor[:c]
                for i in range(m):
                    w = plan.weights[i]
                    # With weight 1 the divisor's first term is the mask itself (agree * 1).
                    direct = i == 0 and w == 1 and plan.normalize
                    agree = divisor if direct else buf.flag2[:c]
                    torch.gt(torch.mul(vs[i], sign, out=buf.mag[:c]), 0, out=agree)
                    if i == 0:
                        torch.mul(vs[0], agree, out=mixed)
                        if plan.normalize and not direct:
                            torch.mul(agree, w, out=divisor)
                    else:
                        mixed += vs[i].mul_(agree)
                        if plan.normalize:
                            divisor += agree if w == 1 else torch.mul(agree, w, out=buf.mag[:c])
                if plan.normalize:  # the divisor only matters here
                    if positive_weights:
                        divisor.clamp_(min=floor)
                    else:
                        divisor.masked_fill_(divisor == 0, 1)
                    mixed /= divisor
                if plan.zero_sign is not None:
                    # The reference's sum starts from +0, so its zeros are +0.0 (a base entry
                    # of -0.0 keeps that sign otherwise): adding +0.0 changes nothing else.
                    mixed += 0.0
            else:
                mixed = total
                if plan.normalize:
                    d = float(sum(plan.weights))
                    mixed /= d if abs(d) >= 1e-8 else 1.0
        if sums is not None:
            _diag_after(plan, mixed, b, raw, top, buf, sums, signs, c)
        for lam, out in zip(lams, outs, strict=True):
            target = out[start:end]
            if plan.linear:
                target.copy_(mixed)
                continue
            scaled = mixed if lam == 1 else torch.mul(mixed, lam, out=buf.tmp[:c])
            if target.device == device:
                # Computed in float32 and rounded once into the output dtype, as add-then-cast.
                torch.add(b, scaled, out=target)
            else:
                target.copy_(torch.add(b, scaled, out=buf.tmp[:c]))
        return sums, finite

    per_chunk = _map(work, range(0, n, chunk), device)
    # Raised here, not in a worker: no chunk is still writing into ``outs`` afterwards.
    if not all(finite for _, finite in per_chunk):
        raise NonFiniteInput("the base or a merged tensor holds NaN or Inf")
    if diag_task is None:
        return None
    totals = [0.0] * (_FIXED + 3 * len(signs))
    for sums, _ in per_chunk:  # chunk order: the same sums whatever the threads did
        for j, value in enumerate(sums):
            totals[j] += value
    both, conflicts, nonzero, touched, top_mass = totals[:_FIXED]
    by_sign = {}
    for j, sign in enumerate(signs):
        kept, mass_kept, trimmed = totals[_FIXED + 3 * j: _FIXED + 3 * j + 3]
        by_sign[sign] = DiagnosticCounts(
            conflicts=round(conflicts), both_nonzero=round(both), topk_mass_kept=mass_kept,
            topk_mass=top_mass, sft_dropped=round(nonzero - kept), sft_nonzero=round(nonzero),
            trimmed=round(trimmed), touched=round(touched))
    return [by_sign[(lam > 0) - (lam < 0)] for lam in lams]


def _diag_before(plan: StreamPlan, vs: list[Tensor], b: Tensor, diag_ct: Sequence[int],
                 diag_task: int, buf: _Buffers, c: int) -> tuple[list[float], Tensor]:
    """Sums over the raw task vectors (before trimming); returns them and the raw SFT delta."""
    if plan.linear:
        deltas = [torch.sub(v, b, out=buf.d[i][:c]) for i, v in enumerate(vs)]
    else:
        deltas = vs
    # The SFT delta must survive the in-place trimming and weighting of its vector.
    sft = buf.raw_task[:c].copy_(deltas[diag_task])
    s_sft = torch.sign(sft, out=buf.s_sft[:c])
    a_sft = torch.abs(s_sft, out=buf.a_sft[:c])
    touched = buf.touched[:c]
    agree_minus_conflict = both = 0.0
    for i, delta in enumerate(deltas):
        if i == diag_task:
            a = a_sft
        else:
            s = torch.sign(delta, out=buf.tmp[:c])
            if i in diag_ct:
                agree_minus_conflict += float(torch.dot(s, s_sft))
            a = s.abs_()
            if i in diag_ct:
                both += float(torch.dot(a, a_sft))
        if i == 0:
            touched.copy_(a)
        else:
            torch.maximum(touched, a, out=touched)
    conflicts = (both - agree_minus_conflict) / 2
    return [both, conflicts, float(a_sft.sum()), float(touched.sum()), 0.0], sft


def _diag_after(plan: StreamPlan, mixed: Tensor, b: Tensor, sft: Tensor, top: Tensor | None,
                buf: _Buffers, sums: list[float], signs: Sequence[int], c: int) -> None:
    merged = torch.sub(mixed, b, out=buf.tmp[:c]) if plan.linear else mixed
    if top is None:
        top = torch.abs(sft, out=buf.top[:c])
    sums[4] = float(torch.dot(buf.ones[:c], top))
    touched = sums[3]
    product = torch.mul(merged, sft, out=buf.tmp2[:c])
    agreement = torch.sign(product, out=product)  # +1 where the merge kept the SFT sign
    if plan.linear:
        # Untouched entries may round away from the base in a weighted average: count exactly.
        changed = float(torch.dot(buf.touched[:c], torch.sign(merged, out=buf.mag[:c]).abs_()))
    else:
        # Untouched entries merge to exactly 0 in task arithmetic. (A float 0/1 sum is exact
        # here and several times faster than count_nonzero.)
        changed = float(torch.ne(merged, 0, out=buf.mag[:c]).sum())
    for sign in signs:
        if sign == 0:  # lambda 0: the merge changes nothing
            sums += [0.0, 0.0, touched]
            continue
        kept = agreement if sign > 0 else torch.neg(agreement, out=buf.mag[:c])
        kept = kept.clamp(min=0) if len(signs) > 1 else kept.clamp_(min=0)
        sums += [float(kept.sum()), float(torch.dot(kept, top)), touched - changed]
