"""Merge methods: small pure functions of tensors in and a tensor out, registered by name.

These are the reference implementations: whole tensors in, one tensor out, written to be read.
The engine runs the hot ones (linear, task_arithmetic, ties, ties_sv, ties_yadav) through
streaming kernels in :mod:`workflow.merge.kernels` that give bit-identical results (tested).

Semantics and defaults follow mergekit 0.1.5 (``merge_methods/linear.py``, ``slerp.py``,
``model_stock.py``, ``generalized_task_arithmetic.py``, ``sparsify.py``, ``registry.py``).
Notation: base ``b``, model tensors ``x_i``, task vectors ``tau_i = x_i - b``, weights ``w_i``,
densities ``d_i``, scale ``lambda``.

- linear (Wortsman et al. 2022, model soups): ``out = sum_i w_i x_i / (sum_i w_i if normalize)``.
- task_arithmetic, ties, ties_sv, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della
  and della_linear are configured instances of one generalized task arithmetic
  (:func:`generalized_task_arithmetic`): a sparsification kind, a sign-consensus kind, and
  normalize/rescale defaults, as in mergekit's registry.
- ties_yadav: TIES as Yadav et al. 2023's reference code (github prateeky2806/ties-merging)
  rather than as mergekit: top-k over the whole model's task vector (one magnitude threshold per
  model, found by a streaming pass over every tensor first, :class:`MergeMethod.whole_model`),
  an unweighted sign election whose zero sums take the whole model's majority sign, and the
  disjoint mean (:func:`ties_yadav`). mergekit's ``ties`` trims each tensor on its own and elects
  the sign of the weighted sum (+1 on a zero sum).
- ties_sv: not a published formula but this project's reading of Tao et al. 2024's slack
  variable (see :func:`generalized_task_arithmetic`): ties, except that where the SFT model's
  top-``slack`` magnitudes disagree with the elected sign, the SFT sign is elected.
- slerp: spherical interpolation of two models' whole tensors (``t`` towards the second).
- model_stock (Jang et al. 2024): interpolation between the base and the models' average by the
  cosine between their task vectors.

Differences from mergekit, all deliberate:
- Math runs in float32 and the result is cast to the base dtype (mergekit's GTA computes in the
  base dtype); parity holds to fp32 rounding on float32 inputs.
- Top-k trimming keeps exactly ``k = max(1, int(d * numel))`` entries, as mergekit, but ties at
  the threshold go to the lowest flat index, so bf16 ties are broken deterministically
  (mergekit's ``argsort`` leaves them to the sort). Breadcrumbs uses the same rule.
- DARE and DELLA draw their masks from a generator seeded by (``seed``, tensor name, model
  index): reruns are reproducible whatever the tensor order or device. mergekit uses the global
  torch RNG, so these two families cannot be compared to it bit for bit.
- Non-floating tensors are copied from the base.
- A model's ``weight`` defaults to 1 (mergekit requires it).
- slerp interpolates the two models of the recipe (the base is then only the layout reference);
  given a single model it interpolates base to model, as mergekit does.
- Non-finite inputs (the engine refuses them unless ``allow_nonfinite``): top-k selections rank
  NaN below every number (it takes none of the k places; Inf, the largest magnitude, takes
  one), and a mask cannot remove a non-finite entry (NaN * 0 and Inf * 0 are NaN), so each NaN
  or Inf input entry gives a non-finite merged entry and the other entries merge as usual.
  Methods that take whole-tensor norms or sums (slerp, model_stock, DARE and DELLA with
  ``rescale``) give an all-NaN tensor instead.

Also here: per-tensor merge diagnostics (:func:`delta_diagnostics`), pure functions as well.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:

    class _LazyTorch:
        """torch, imported on first use: planning and config validation use only the registry
        (no tensors), and importing torch would add ~1.3 s to every Snakemake start-up."""

        def __getattr__(self, name: str) -> Any:
            import torch as module

            globals()["torch"] = module
            return getattr(module, name)

    torch = _LazyTorch()

# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


class Sparsification(StrEnum):
    """How each task vector is trimmed before mixing (mergekit's SparsificationMethod)."""

    NONE = "none"
    MAGNITUDE = "magnitude"  # TIES: keep the top-d fraction by |tau|
    RANDOM = "random"  # DARE: keep each entry with probability d
    MAGNITUDE_OUTLIERS = "magnitude_outliers"  # breadcrumbs: drop the top gamma, then the bottom
    DELLA_MAGPRUNE = "della_magprune"  # DELLA: keep probability d +- epsilon by magnitude rank


class Consensus(StrEnum):
    """How the elected sign is chosen (mergekit's ConsensusMethod)."""

    NONE = "none"  # plain sum: no sign election
    SUM = "sum"  # TIES: gamma = sign(sum_i w_i tau_i), ties (sum == 0) go to +1


def topk_count(density: float, numel: int) -> int:
    """mergekit's k: ``max(1, int(density * numel))`` entries of a nonempty tensor."""
    return max(1, int(density * numel)) if numel else 0


def nan_count(flat: Tensor) -> int:
    """How many entries of a float tensor are NaN. NaN survives any sum, so a NaN-free tensor
    (every merge unless ``allow_nonfinite``) costs one reduction and no mask."""
    if not math.isnan(float(flat.sum())):
        return 0
    return int(torch.isnan(flat).count_nonzero())


def kth_largest(flat: Tensor, k: int, nan: int | None = None) -> float:
    """The k-th largest number of a 1-D tensor by selection, not sorting, with NaN entries
    ranked below every number (``1 <= k <=`` the count of non-NaN entries; ``nan``: their
    count when the caller knows it)."""
    n = flat.numel() - (nan_count(flat) if nan is None else nan)
    # numpy's partition is the fastest selection on CPU (DESIGN §8); kthvalue elsewhere. Both
    # order NaN after every number, so the k-th largest number sits at n - k of the numbers.
    if flat.device.type == "cpu" and flat.dtype == torch.float32:
        return float(np.partition(flat.numpy(), n - k)[n - k])
    return float(flat.kthvalue(n - k + 1).values)


def topk_mask(values: Tensor, k: int) -> Tensor:
    """Boolean mask of exactly ``k`` entries of ``values`` with the largest values.

    Entries equal to the k-th largest value are kept in flat-index order (lowest index first), so
    the result is deterministic and keeps exactly k even when many values tie at the threshold.
    Masks for k1 <= k2 are nested. NaN entries (inputs merged with ``allow_nonfinite``) rank
    below every number: they take none of the k places, so a top-k below the count of numbers
    never keeps them; masking cannot remove them anyway (NaN * 0 is NaN).
    """
    flat = values.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(values, dtype=torch.bool)
    nan = nan_count(flat)
    if k >= n - nan:
        return ~torch.isnan(values)
    threshold = kth_largest(flat, k, nan)
    mask = flat > threshold
    missing = k - int(mask.count_nonzero())
    if missing > 0:
        # nonzero() lists indices in increasing order: the lowest indices win the ties.
        mask[(flat == threshold).nonzero().squeeze(1)[:missing]] = True
    return mask.reshape(values.shape)


def rescale_l1(tau: Tensor, masked: Tensor, eps: float = 1e-7) -> Tensor:
    """Scale ``masked`` to the L1 norm of ``tau`` (mergekit's rescale_norm=l1; skipped below
    ``eps``)."""
    before, after = tau.abs().sum(), masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def magnitude_trim(tau: Tensor, density: float, *, rescale: bool = False) -> Tensor:
    """Keep the top ``k = max(1, int(density * numel))`` entries of ``|tau|``, zero the rest."""
    if density >= 1:
        return tau
    trimmed = tau * topk_mask(tau.abs(), topk_count(density, tau.numel()))
    return rescale_l1(tau, trimmed) if rescale else trimmed


def magnitude_outliers_trim(tau: Tensor, density: float, gamma: float, *,
                            rescale: bool = False) -> Tensor:
    """Model breadcrumbs: drop the top ``int(gamma * n)`` magnitudes (outliers) and keep the next
    ``int(density * n)``; the outlier count shrinks when both do not fit (as mergekit)."""
    if density >= 1:
        return tau
    n = tau.numel()
    target = int(density * n)
    bottom = max(0, n - target - int(gamma * n))
    magnitude = tau.abs()
    # Rank from the top r kept iff n - bottom - target <= r < n - bottom: a difference of nested
    # top-k masks, so ties break by index like everywhere else.
    mask = topk_mask(magnitude, n - bottom) & ~topk_mask(magnitude, n - bottom - target)
    trimmed = tau * mask
    return rescale_l1(tau, trimmed) if rescale else trimmed


def random_trim(tau: Tensor, density: float, generator: torch.Generator, *,
                rescale: bool = False) -> Tensor:
    """DARE: keep each entry with probability ``density`` (rescale: restore the L1 norm)."""
    if density >= 1:
        return tau
    keep = torch.rand(tau.shape, generator=generator, device=generator.device) < density
    trimmed = tau * keep.to(tau.device)
    return rescale_l1(tau, trimmed) if rescale else trimmed


def della_trim(tau: Tensor, density: float, epsilon: float, generator: torch.Generator, *,
               rescale: bool = False) -> Tensor:
    """DELLA's MagPrune: per row, keep probability rises linearly with magnitude rank from
    ``density - epsilon`` to ``density + epsilon``."""
    if density >= 1:
        return tau
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(f"della needs density +/- epsilon in (0, 1), got density {density} "
                         f"and epsilon {epsilon}")
    rows = tau.unsqueeze(0) if tau.dim() < 2 else tau
    ranks = rows.abs().argsort(dim=1, stable=True).argsort(dim=1).float() + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    probs = (density - epsilon) + ((ranks - low) / (high - low)).clamp(0, 1) * 2 * epsilon
    keep = torch.rand(probs.shape, generator=generator, device=generator.device) < probs.to(
        generator.device)
    trimmed = rows * keep.to(rows.device)
    if rescale:
        trimmed = rescale_l1(rows, trimmed)
    return trimmed.reshape(tau.shape)


def sparsify(tau: Tensor, density: float, kind: Sparsification, *, rescale: bool,
             gamma: float = 0.01, epsilon: float = 0.15,
             generator: torch.Generator | None = None) -> Tensor:
    if kind is Sparsification.NONE:
        return tau
    if kind is Sparsification.MAGNITUDE:
        return magnitude_trim(tau, density, rescale=rescale)
    if kind is Sparsification.MAGNITUDE_OUTLIERS:
        return magnitude_outliers_trim(tau, density, gamma, rescale=rescale)
    if generator is None:
        raise ValueError(f"sparsification {kind.value!r} is random and needs a generator")
    if kind is Sparsification.RANDOM:
        return random_trim(tau, density, generator, rescale=rescale)
    if kind is Sparsification.DELLA_MAGPRUNE:
        return della_trim(tau, density, epsilon, generator, rescale=rescale)
    raise NotImplementedError(f"sparsification {kind.value!r} is not implemented")


def linear(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], *,
           normalize: bool) -> Tensor:
    """Weighted average (Wortsman et al. 2022): ``sum_i w_i x_i / (sum_i w_i if normalize)``.

    The base tensor only sets the output dtype (as in mergekit, the base is not averaged in).
    """
    out = tensors[0].float() * weights[0]
    for x, w in zip(tensors[1:], weights[1:], strict=True):
        out += x.float() * w
    if normalize:
        out /= sum(weights)
    return out.to(base.dtype)


def generalized_task_arithmetic(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    sparsification: Sparsification,
    consensus: Consensus,
    lam: float,
    normalize: bool,
    rescale: bool = False,
    task_index: int | None = None,
    slack: float = 0.0,
    gammas: Sequence[float] | None = None,
    epsilons: Sequence[float] | None = None,
    generators: Sequence[torch.Generator] | None = None,
) -> Tensor:
    """Generalized task arithmetic (mergekit's GTA), with the TIES-SV slack (this project's
    reading of Tao et al. 2024's slack variable, not a formula from the paper).

    With ``tau_hat_i = sparsify(tau_i, d_i)`` and ``v_i = w_i * tau_hat_i``:

    - no consensus: ``m = sum_i v_i``; divisor ``D = sum_i w_i`` (1 where ``|D| < 1e-8``).
    - sum consensus: ``gamma = +1 where sum_i v_i >= 0 else -1``;
      TIES-SV: let ``P`` be the top ``int(slack * numel)`` entries of ``|tau_t|`` (t =
      ``task_index``; same tie rule as trimming, so ``P`` lies inside the kept set since
      slack <= d_t); on ``P`` where ``v_t != 0`` the elected sign is ``sign(v_t)`` instead (the
      task model's most important entries cannot be outvoted);
      ``mask_i = sign(v_i) == gamma``; ``m = sum_i v_i mask_i``; ``D = sum_i w_i mask_i``
      (1 where 0).
    - ``out = base + lambda * (m / D if normalize else m)``, cast to the base dtype.

    ``slack == 0`` leaves ``gamma`` untouched, so ties_sv equals ties bit for bit.
    """
    b = base.float()
    n = len(tensors)
    weighted = []
    for i, x in enumerate(tensors):
        tau = x.float() - b
        trimmed = sparsify(tau, densities[i], sparsification, rescale=rescale,
                           gamma=gammas[i] if gammas else 0.01,
                           epsilon=epsilons[i] if epsilons else 0.15,
                           generator=generators[i] if generators else None)
        weighted.append(trimmed * weights[i])
    # Sums run model by model in order, exactly as the streaming kernels do.
    total = weighted[0].clone()
    for v in weighted[1:]:
        total += v
    if consensus is Consensus.NONE:
        mixed = total
        divisor: Tensor | float = float(sum(weights))
        if abs(divisor) < 1e-8:
            divisor = 1.0
    elif consensus is Consensus.SUM:
        positive = total >= 0  # a zero total elects +, as mergekit's get_mask
        if task_index is not None and slack > 0:
            task = weighted[task_index]
            tau_t = tensors[task_index].float() - b
            protected = topk_mask(tau_t.abs(), int(slack * tau_t.numel())) & (task != 0)
            positive = torch.where(protected, task > 0, positive)
        mixed = torch.zeros_like(b)
        divisor = torch.zeros_like(b)
        for i in range(n):
            v = weighted[i]
            agree = torch.where(positive, v > 0, v < 0)  # zeros (trimmed entries) never agree
            mixed += v * agree
            divisor += agree * weights[i]
        divisor[divisor == 0] = 1
    else:
        raise NotImplementedError(f"consensus {consensus.value!r} is not implemented")
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return (b + mixed).to(base.dtype)


def yadav_keep_count(density: float, numel: int) -> int:
    """The reference's k for a whole task vector of ``numel`` entries: ``int(density * numel)``.

    Yadav et al.'s ``topk_values_mask`` keeps ``|tau| >= kthvalue(numel - k)``, the (k+1)-th
    largest magnitude: k + 1 entries plus every tie at that value (k == numel keeps all)."""
    return int(density * numel)


def yadav_trimmed(base: Tensor, tensors: Sequence[Tensor],
                  thresholds: Sequence[float]) -> Tensor:
    """The trimmed task vectors of one tensor, stacked (models x entries, float32):
    ``tau_i * (|tau_i| >= t_i)`` with ``t_i`` model i's whole-model threshold (-inf keeps all).
    A mask cannot remove NaN (NaN * 0 is NaN): NaN inputs stay NaN, as in the reference."""
    b = base.float().reshape(-1)
    rows = []
    for x, threshold in zip(tensors, thresholds, strict=True):
        tau = x.float().reshape(-1) - b
        rows.append(tau if threshold == -math.inf else tau * (tau.abs() >= threshold))
    return torch.stack(rows)


def yadav_sign_counts(trimmed: Tensor) -> tuple[int, int]:
    """(positive, negative) counts of ``sign(sum_i tau_hat_i)`` over one tensor: the whole-model
    sums give the majority sign that breaks zero-sum elections (NaN sums count as neither)."""
    total = trimmed.sum(dim=0)
    return int((total > 0).count_nonzero()), int((total < 0).count_nonzero())


def ties_yadav(base: Tensor, tensors: Sequence[Tensor], *, densities: Sequence[float],
               lam: float, thresholds: Sequence[float], majority: int) -> Tensor:
    """TIES as Yadav et al. 2023's reference code (github prateeky2806/ties-merging,
    ``merge_methods("topk", ..., resolve_method="mass", merge_func="dis-mean")``), one tensor.

    The whole-model quantities come from passes over every tensor before the merge (the
    engine's :func:`~workflow.merge.kernels.whole_model_statistics`):

    - ``thresholds[i]``: the (n_i - k_i)-th smallest |tau_i| over the model's n_i merged
      entries, ``k_i = int(d_i * n_i)`` (:func:`yadav_keep_count`; -inf where k_i == n_i);
      ``tau_hat_i = tau_i * (|tau_i| >= thresholds[i])``.
    - ``gamma = sign(sum_i tau_hat_i)``, unweighted; where the sum is 0 the elected sign is
      ``majority`` = sign(#positive - #negative gamma over the whole model) (the reference's
      ``resolve_zero_signs(..., "majority")``; 0 elects the negative side, as there).
    - ``tau_m = sum_i tau_hat_i [sign(tau_hat_i) = gamma] / max(1, #{i: agreeing, nonzero})``.
    - ``out = base + lambda * tau_m``, cast to the base dtype.

    ``densities`` only shaped ``thresholds``; they are accepted so the registry passes every
    parameter the same way.
    """
    del densities
    trimmed = yadav_trimmed(base, tensors, thresholds)
    total = trimmed.sum(dim=0)
    sign = torch.sign(total)
    sign[sign == 0] = float(majority)
    keep = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * keep
    counts = (selected != 0).sum(dim=0).float()
    merged = torch.sum(selected, dim=0) / torch.clamp(counts, min=1)
    out = base.float().reshape(-1) + lam * merged
    return out.reshape(base.shape).to(base.dtype)


def slerp(base: Tensor, tensors: Sequence[Tensor], *, t: float, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> Tensor:
    """Spherical interpolation (Shoemake 1985) of the whole tensor, ``t`` from the first model
    to the second (from the base to the model given one); linear when nearly collinear."""
    v0, v1 = (base, tensors[0]) if len(tensors) == 1 else (tensors[0], tensors[1])
    a, c = v0.float().reshape(-1), v1.float().reshape(-1)
    norm_a, norm_c = torch.linalg.vector_norm(a), torch.linalg.vector_norm(c)
    norm_a = norm_a if norm_a > eps else torch.ones_like(norm_a)
    norm_c = norm_c if norm_c > eps else torch.ones_like(norm_c)
    dot = float(((a / norm_a) * (c / norm_c)).sum().clamp(-1, 1))
    if abs(dot) > dot_threshold:
        coef_a, coef_c = 1 - t, t
    else:
        theta = math.acos(dot)
        coef_a = math.sin((1 - t) * theta) / math.sin(theta)
        coef_c = math.sin(t * theta) / math.sin(theta)
    return (coef_a * a + coef_c * c).reshape(base.shape).to(base.dtype)


def model_stock(base: Tensor, tensors: Sequence[Tensor], *, filter_wise: bool) -> Tensor:
    """Model stock (Jang et al. 2024): ``w = t * mean_i x_i + (1 - t) * b`` with
    ``t = N cos / (1 + (N - 1) cos)``, ``cos`` the mean pairwise cosine of the task vectors
    (per row with ``filter_wise``); the base where the denominator vanishes."""
    if len(tensors) < 2:
        raise ValueError("model_stock needs at least two models besides the base")
    w0 = base.float()
    ws = [x.float() for x in tensors]
    shape = w0.shape
    if filter_wise:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, oa in enumerate(offsets):
        for ob in offsets[i + 1:]:
            norms = torch.norm(oa, dim=-1) * torch.norm(ob, dim=-1)
            cosines.append(((oa * ob).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    ratio = torch.where(singular, torch.zeros_like(cos),
                        count * cos / torch.where(singular, torch.ones_like(cos), denominator))
    average = sum(ws) / count
    return (ratio * average + (1 - ratio) * w0).reshape(shape).to(base.dtype)


def tensor_generator(seed: int, tensor_name: str, model_index: int,
                     device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded by (seed, tensor, model): reproducible in any tensor order."""
    digest = hashlib.sha256(f"{seed}\0{tensor_name}\0{model_index}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""Default of a parameter that has no default."""


@dataclass(frozen=True)
class ParamSpec:
    """One merge parameter: its recipe name, kernel keyword, default and accepted values."""

    name: str
    arg: str
    default: Any
    kind: type  # bool, int or float
    check: Callable[[float], bool] = lambda _: True
    accepted: str = "a number"

    def resolve(self, value: Any, where: str) -> Any:
        """Validate ``value`` (REQUIRED when absent) and return it, defaulted."""
        if value is REQUIRED:
            if self.default is REQUIRED:
                raise ValueError(f"merge parameter {self.name!r} is required {where}")
            return self.default
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"merge parameter {self.name!r} {where} must be true or false, "
                                 f"got {value!r}")
            return value
        if self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int) or not self.check(value):
                raise ValueError(f"merge parameter {self.name!r} {where} must be "
                                 f"{self.accepted}, got {value!r}")
            return value
        # bool is an int subclass: refuse it for numbers so `density: true` is caught.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(  # noqa: TRY004 (spec errors are ValueErrors by contract)
                f"merge parameter {self.name!r} {where} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value) or not self.check(value):
            raise ValueError(f"merge parameter {self.name!r} {where} must be {self.accepted}, "
                             f"got {value!r}")
        return value


def _weight() -> ParamSpec:
    # mergekit requires a weight; our configs may leave it out, meaning 1.
    return ParamSpec("weight", "weights", 1.0, float, accepted="a finite number")


def _density() -> ParamSpec:
    return ParamSpec("density", "densities", 1.0, float, lambda v: 0 < v <= 1, "in (0, 1]")


def _lambda() -> ParamSpec:
    return ParamSpec("lambda", "lam", 1.0, float, accepted="a finite number")


def _flag(name: str, default: bool) -> ParamSpec:
    return ParamSpec(name, name, default, bool)


_SEED = ParamSpec("seed", "seed", 0, int, lambda v: v >= 0, "a non-negative integer")
_GAMMA = ParamSpec("gamma", "gammas", 0.01, float, lambda v: 0 <= v < 1, "in [0, 1)")
_EPSILON = ParamSpec("epsilon", "epsilons", 0.15, float, lambda v: 0 <= v < 1, "in [0, 1)")
_SLACK = ParamSpec("slack", "slack", REQUIRED, float, lambda v: 0 <= v <= 1, "in [0, 1]")


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: a pure kernel plus the parameters it takes from a recipe.

    ``fixed`` are keyword arguments that configure the kernel (the GTA variants), ``params``
    the recipe's global parameters and ``model_params`` the per-model ones (passed to the
    kernel as lists in model order). A ``whole_model`` method also needs quantities of the
    whole model (ties_yadav: its global top-k thresholds and majority sign), which the engine
    computes in a pass of its own and passes as ``context``.
    """

    name: str
    reference: str  # the paper the method comes from
    kernel: Callable[..., Tensor]
    params: tuple[ParamSpec, ...]
    model_params: tuple[ParamSpec, ...]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    needs_task_model: bool = False
    min_models: int = 1
    max_models: int | None = None
    mergekit: bool = True  # mergekit 0.1.5 has a method of this name and semantics
    whole_model: bool = False  # needs whole-model statistics (see __call__'s ``context``)

    @property
    def random(self) -> bool:
        return any(p.name == "seed" for p in self.params)

    @property
    def trims(self) -> bool:
        """Whether the method sparsifies task vectors by their ``density``."""
        return self.whole_model or self.fixed.get("sparsification",
                                                  Sparsification.NONE) is not Sparsification.NONE

    def __call__(self, base: Tensor, tensors: Sequence[Tensor], params: Mapping[str, Any],
                 model_params: Sequence[Mapping[str, Any]],
                 task_index: int | None = None, tensor_name: str = "",
                 context: Mapping[str, Any] | None = None) -> Tensor:
        """Merge one tensor; ``params``/``model_params`` are resolved (see resolve_merge_spec).

        ``tensor_name`` seeds the random methods (with the recipe's ``seed``); ``context``
        holds the whole-model statistics of a ``whole_model`` method."""
        if not base.is_floating_point():
            return base.clone()
        kwargs: dict[str, Any] = dict(self.fixed)
        if self.whole_model:
            if context is None:
                raise ValueError(f"merge method {self.name!r} trims over the whole model and "
                                 "needs its statistics (workflow.merge.kernels."
                                 "whole_model_statistics) as context")
            kwargs.update(context)
        for spec in self.params:
            if spec.name != "seed":
                kwargs[spec.arg] = params[spec.name]
        for spec in self.model_params:
            kwargs[spec.arg] = [m[spec.name] for m in model_params]
        if self.needs_task_model:
            kwargs["task_index"] = task_index
        if self.random:
            kwargs["generators"] = [tensor_generator(params["seed"], tensor_name, i)
                                    for i in range(len(tensors))]
        return self.kernel(base, tensors, **kwargs)


def _gta(name: str, reference: str, sparsification: Sparsification, consensus: Consensus,
         normalize: bool, rescale: bool, *extra: ParamSpec, needs_task_model: bool = False,
         mergekit: bool = True) -> MergeMethod:
    model_extra: tuple[ParamSpec, ...] = ()
    if sparsification is Sparsification.MAGNITUDE_OUTLIERS:
        model_extra = (_GAMMA,)
    elif sparsification is Sparsification.DELLA_MAGPRUNE:
        model_extra = (_EPSILON,)
    if sparsification in (Sparsification.RANDOM, Sparsification.DELLA_MAGPRUNE):
        extra = (*extra, _SEED)
    return MergeMethod(
        name=name,
        reference=reference,
        kernel=generalized_task_arithmetic,
        params=(_flag("normalize", normalize), _flag("rescale", rescale), _lambda(), *extra),
        # mergekit accepts density for every GTA method, even where nothing is sparsified.
        model_params=(_weight(), _density(), *model_extra),
        fixed={"sparsification": sparsification, "consensus": consensus},
        needs_task_model=needs_task_model,
        mergekit=mergekit,
    )


_S, _C = Sparsification, Consensus
MERGE_METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod("linear", "https://arxiv.org/abs/2203.05482", linear,
                    params=(_flag("normalize", True),), model_params=(_weight(),)),
        _gta("task_arithmetic", "https://arxiv.org/abs/2212.04089", _S.NONE, _C.NONE,
             normalize=False, rescale=False),
        _gta("ties", "https://arxiv.org/abs/2306.01708", _S.MAGNITUDE, _C.SUM,
             normalize=True, rescale=False),
        _gta("ties_sv", "Tao et al. 2024, Unlocking the Potential of Model Merging for "
             "Low-Resource Languages (EMNLP Findings), https://arxiv.org/abs/2407.03994",
             _S.MAGNITUDE, _C.SUM, True, False, _SLACK, needs_task_model=True, mergekit=False),
        _gta("dare_ties", "https://arxiv.org/abs/2311.03099", _S.RANDOM, _C.SUM,
             normalize=False, rescale=True),
        _gta("dare_linear", "https://arxiv.org/abs/2311.03099", _S.RANDOM, _C.NONE,
             normalize=False, rescale=True),
        _gta("breadcrumbs", "https://arxiv.org/abs/2312.06795", _S.MAGNITUDE_OUTLIERS, _C.NONE,
             normalize=False, rescale=False),
        _gta("breadcrumbs_ties", "https://arxiv.org/abs/2312.06795", _S.MAGNITUDE_OUTLIERS,
             _C.SUM, normalize=False, rescale=False),
        _gta("della", "https://arxiv.org/abs/2406.11617", _S.DELLA_MAGPRUNE, _C.SUM,
             normalize=True, rescale=True),
        _gta("della_linear", "https://arxiv.org/abs/2406.11617", _S.DELLA_MAGPRUNE, _C.NONE,
             normalize=False, rescale=True),
        # Yadav et al.'s reference code: whole-model top-k, unweighted election (no weights).
        MergeMethod("ties_yadav", "Yadav et al. 2023, https://arxiv.org/abs/2306.01708, as "
                    "github.com/prateeky2806/ties-merging", ties_yadav,
                    params=(_lambda(),), model_params=(_density(),), whole_model=True,
                    mergekit=False),
        MergeMethod("slerp", "https://en.wikipedia.org/wiki/Slerp", slerp,
                    params=(ParamSpec("t", "t", REQUIRED, float, lambda v: 0 <= v <= 1,
                                      "in [0, 1]"),),
                    model_params=(), max_models=2),
        MergeMethod("model_stock", "https://arxiv.org/abs/2403.19522", model_stock,
                    params=(_flag("filter_wise", False),), model_params=(), min_models=2),
    )
}

METHOD_PARAMS: dict[str, dict[str, dict[str, Any]]] = {
    name: {
        "global": {p.name: p.default for p in m.params},
        "model": {p.name: p.default for p in m.model_params},
    }
    for name, m in MERGE_METHODS.items()
}
"""Per method: accepted global and per-model parameters with their defaults (REQUIRED if none)."""

ROLES = ("ct", "sft")
# Keys of a recipe's model entry that describe the model rather than parameterise the merge.
MODEL_METADATA_KEYS = frozenset({"role", "lang", "digest", "name", "tokens"})


def resolve_merge_spec(method: str, params: Mapping[str, Any],
                       models: Sequence[Mapping[str, Any]]
                       ) -> tuple[dict[str, Any], list[dict[str, Any]], int | None]:
    """Validate a merge spec and fill defaults.

    Returns (global params, per-model params in model order, index of the "sft" model or None).
    Raises ValueError naming the method, parameter or model at fault.
    """
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}; known: {', '.join(MERGE_METHODS)}")
    spec = MERGE_METHODS[method]
    if not isinstance(params, Mapping):
        raise ValueError(f"merge params must be a mapping, got {params!r}")  # noqa: TRY004
    known = {p.name for p in spec.params}
    for key in params:
        if key not in known:
            raise ValueError(f"merge method {method!r} has no parameter {key!r}; "
                             f"accepted: {', '.join(sorted(known)) or 'none'}")
    where = f"(method {method!r})"
    resolved = {p.name: p.resolve(params.get(p.name, REQUIRED), where) for p in spec.params}

    if not models:
        raise ValueError(f"merge method {method!r} needs at least one model")
    if len(models) < spec.min_models:
        raise ValueError(f"merge method {method!r} needs at least {spec.min_models} models, "
                         f"got {len(models)}")
    if spec.max_models is not None and len(models) > spec.max_models:
        raise ValueError(f"merge method {method!r} takes at most {spec.max_models} models, "
                         f"got {len(models)}")
    model_known = {p.name for p in spec.model_params}
    per_model: list[dict[str, Any]] = []
    task_index: int | None = None
    for i, model in enumerate(models):
        if not isinstance(model, Mapping):
            raise ValueError(f"merge model #{i} must be a mapping, got {model!r}")  # noqa: TRY004
        where = f"for merge model #{i} (method {method!r})"
        for key in model:
            if key not in model_known and key not in MODEL_METADATA_KEYS:
                raise ValueError(f"merge model #{i}: method {method!r} has no per-model "
                                 f"parameter {key!r}; accepted: "
                                 f"{', '.join(sorted(model_known)) or 'none'}")
        role = model.get("role")
        if role not in ROLES:
            raise ValueError(f"merge model #{i} role must be one of {ROLES}, got {role!r}")
        if role == "sft":
            if task_index is not None:
                raise ValueError(f"merge models #{task_index} and #{i} both have role 'sft'; "
                                 "at most one task model is allowed")
            task_index = i
        per_model.append({p.name: p.resolve(model.get(p.name, REQUIRED), where)
                          for p in spec.model_params})

    if spec.needs_task_model and task_index is None:
        raise ValueError(f"merge method {method!r} needs one model with role 'sft'")
    if method == "linear" and resolved["normalize"] and sum(m["weight"] for m in per_model) == 0:
        raise ValueError("merge method 'linear' with normalize needs weights that do not sum to 0")
    if "slack" in resolved and task_index is not None:
        density = per_model[task_index]["density"]
        if resolved["slack"] > density:
            # The protected entries are drawn from the trimmed task vector.
            raise ValueError(f"merge parameter 'slack' ({resolved['slack']}) must not exceed "
                             f"the sft model's density ({density})")
    for i, m in enumerate(per_model):
        if "epsilon" in m and m["density"] < 1 and not (
                0 < m["density"] - m["epsilon"] and m["density"] + m["epsilon"] < 1):
            raise ValueError(f"merge model #{i}: 'density' {m['density']} +/- 'epsilon' "
                             f"{m['epsilon']} must stay inside (0, 1) (method {method!r})")
    return resolved, per_model, task_index


def validate_merge_spec(method: str, params: dict, models: list[dict]) -> None:
    """Raise ValueError if the spec is invalid (for config validation at parse time)."""
    resolve_merge_spec(method, params, models)


# --------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------

DIAGNOSTIC_KEYS = ("sign_conflict", "sft_topk_mass_kept", "sft_dropped", "trimmed")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class DiagnosticCounts:
    """Sums behind the diagnostic ratios; add counts to aggregate over tensors and layers."""

    conflicts: int = 0  # CT/SFT pairs of opposite sign ...
    both_nonzero: int = 0  # ... out of pairs where both are nonzero
    topk_mass_kept: float = 0.0  # |tau_sft| mass of its top-k entries kept by the merge ...
    topk_mass: float = 0.0  # ... out of the whole top-k mass
    sft_dropped: int = 0  # nonzero SFT entries the merge zeroed or flipped ...
    sft_nonzero: int = 0  # ... out of all nonzero SFT entries
    trimmed: int = 0  # entries the merge left unchanged ...
    touched: int = 0  # ... out of entries some input changed

    def __add__(self, other: DiagnosticCounts) -> DiagnosticCounts:
        return DiagnosticCounts(*(getattr(self, f.name) + getattr(other, f.name)
                                  for f in fields(self)))

    def ratios(self) -> dict[str, float | None]:
        """Each ratio in [0, 1], or None where its denominator is 0."""
        def ratio(num: float, den: float) -> float | None:
            return num / den if den else None

        return {
            "sign_conflict": ratio(self.conflicts, self.both_nonzero),
            "sft_topk_mass_kept": ratio(self.topk_mass_kept, self.topk_mass),
            "sft_dropped": ratio(self.sft_dropped, self.sft_nonzero),
            "trimmed": ratio(self.trimmed, self.touched),
        }


def delta_diagnostics(ct_deltas: Sequence[Tensor], sft_delta: Tensor | None,
                      merged_delta: Tensor, density: float) -> DiagnosticCounts:
    """Counts for one tensor, from the CT and SFT task vectors and the merged delta.

    - sign_conflict: over (CT model, entry) pairs where the CT and SFT deltas are both nonzero,
      the fraction of opposite sign.
    - sft_topk_mass_kept: of the SFT delta's top ``max(1, int(density * numel))`` entries by
      magnitude (its TIES-kept set), the fraction of their |delta| mass at entries where the
      merged delta is nonzero with the SFT sign.
    - sft_dropped: fraction of nonzero SFT entries where the merged delta is zero or of the
      opposite sign.
    - trimmed: of the entries some input changed, the fraction the merge left at the base value.
    """
    merged = merged_delta.float()
    counts = DiagnosticCounts()
    any_change = torch.zeros(merged.shape, dtype=torch.bool, device=merged.device)
    for delta in [*ct_deltas, *([sft_delta] if sft_delta is not None else [])]:
        any_change |= delta != 0
    counts.touched = int(any_change.count_nonzero())
    counts.trimmed = int((any_change & (merged == 0)).count_nonzero())
    if sft_delta is None:
        return counts
    sft = sft_delta.float()
    for ct in ct_deltas:
        # The sign of a product is the sign comparison (barring fp32 underflow, as the kernels).
        product = ct.float() * sft
        counts.both_nonzero += int((product != 0).count_nonzero())
        counts.conflicts += int((product < 0).count_nonzero())
    kept = merged * sft > 0
    magnitude = sft.abs()
    k = topk_count(density, sft.numel()) if density < 1 else sft.numel()
    top = topk_mask(magnitude, k)
    counts.topk_mass = float(torch.where(top, magnitude, 0).sum(dtype=torch.float64))
    counts.topk_mass_kept = float(torch.where(top & kept, magnitude, 0).sum(dtype=torch.float64))
    counts.sft_nonzero = int(sft.count_nonzero())
    counts.sft_dropped = counts.sft_nonzero - int(kept.count_nonzero())
    return counts


def layer_of(tensor_name: str) -> str:
    """The layer a tensor belongs to ("0", "1", ...), or "other" (embeddings, final norm)."""
    match = _LAYER.search(tensor_name)
    return match.group(1) if match else "other"


def aggregate_diagnostics(per_tensor: Mapping[str, DiagnosticCounts]) -> dict[str, Any]:
    """Ratios overall, per layer and per tensor, from per-tensor counts."""
    layers: dict[str, DiagnosticCounts] = {}
    overall = DiagnosticCounts()
    for name, counts in per_tensor.items():
        layer = layer_of(name)
        layers[layer] = layers.get(layer, DiagnosticCounts()) + counts
        overall = overall + counts

    def layer_key(name: str) -> tuple[int, int | str]:
        return (0, int(name)) if name.isdigit() else (1, name)

    return {
        "overall": overall.ratios(),
        "layers": {k: layers[k].ratios() for k in sorted(layers, key=layer_key)},
        "tensors": {name: counts.ratios() for name, counts in per_tensor.items()},
    }
