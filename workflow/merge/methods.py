"""Merge methods: small pure functions of tensors in and a tensor out, registered by name.

Semantics and defaults follow mergekit 0.1.5 (``merge_methods/linear.py``,
``merge_methods/generalized_task_arithmetic.py``, ``sparsify.py``, ``merge_methods/registry.py``).
Notation: base ``b``, model tensors ``x_i``, task vectors ``tau_i = x_i - b``, weights ``w_i``,
densities ``d_i``, scale ``lambda``.

- linear (Wortsman et al. 2022, model soups)::

      out = sum_i w_i x_i / (sum_i w_i if normalize else 1)

- task_arithmetic (Ilharco et al. 2023), ties (Yadav et al. 2023) and ties_sv (Tao et al. 2024)
  are configured instances of one generalized task arithmetic (:func:`generalized_task_arithmetic`):
  a sparsification kind, a sign-consensus kind, and normalize/rescale defaults. DARE, breadcrumbs
  and DELLA plug in as further :class:`Sparsification` kinds.

Differences from mergekit, all deliberate:
- Math runs in float32 and the result is cast to the base dtype (mergekit computes in the base
  dtype); parity holds exactly on float32 inputs.
- Top-k trimming keeps exactly ``k = int(d * numel)`` entries (truncation, as mergekit); ties at
  the threshold go to the lowest flat index, so bf16 ties are broken deterministically (mergekit's
  ``argsort`` leaves them to the sort). ``k == 0`` trims the whole task vector where mergekit
  asserts.
- Non-floating tensors are copied from the base.
- A model's ``weight`` defaults to 1 (mergekit requires it).

Also here: per-tensor merge diagnostics (:func:`delta_diagnostics`), pure functions as well.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

import numpy as np
import torch
from torch import Tensor

# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


class Sparsification(StrEnum):
    """How each task vector is trimmed before mixing (mergekit's SparsificationMethod)."""

    NONE = "none"
    MAGNITUDE = "magnitude"  # TIES: keep the top-d fraction by |tau|


class Consensus(StrEnum):
    """How the elected sign is chosen (mergekit's ConsensusMethod)."""

    NONE = "none"  # plain sum: no sign election
    SUM = "sum"  # TIES: gamma = sign(sum_i w_i tau_i), ties (sum == 0) go to +1


def topk_mask(values: Tensor, k: int) -> Tensor:
    """Boolean mask of exactly ``k`` entries of ``values`` with the largest values.

    Entries equal to the k-th largest value are kept in flat-index order (lowest index first), so
    the result is deterministic and keeps exactly k even when many values tie at the threshold.
    Masks for k1 <= k2 are nested.
    """
    flat = values.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(values, dtype=torch.bool)
    # A selection, far cheaper than the full argsort mergekit does; numpy's is the fastest on CPU.
    if flat.device.type == "cpu" and flat.dtype == torch.float32:
        threshold = float(np.partition(flat.numpy(), n - k)[n - k])
    else:
        threshold = float(flat.kthvalue(n - k + 1).values)
    mask = flat > threshold
    missing = k - int(mask.count_nonzero())
    if missing > 0:
        # nonzero() lists indices in increasing order: the lowest indices win the ties.
        mask[(flat == threshold).nonzero().squeeze(1)[:missing]] = True
    return mask.reshape(values.shape)


def magnitude_trim(tau: Tensor, density: float, *, rescale: bool = False) -> Tensor:
    """Keep the top ``k = int(density * numel)`` entries of ``|tau|``, zero the rest.

    With ``rescale`` the kept entries are scaled to restore the L1 norm of ``tau`` (mergekit's
    ``rescale_norm=l1``; skipped when either norm is below 1e-7).
    """
    if density >= 1:
        return tau
    mask = topk_mask(tau.abs(), int(density * tau.numel()))
    trimmed = tau * mask
    if rescale:
        before, after = tau.abs().sum(), trimmed.abs().sum()
        if before >= 1e-7 and after >= 1e-7:
            trimmed = trimmed * (before / after)
    return trimmed


def sparsify(tau: Tensor, density: float, kind: Sparsification, *, rescale: bool) -> Tensor:
    if kind is Sparsification.NONE:
        return tau
    if kind is Sparsification.MAGNITUDE:
        return magnitude_trim(tau, density, rescale=rescale)
    raise NotImplementedError(f"sparsification {kind.value!r} is not implemented")


def linear(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], *,
           normalize: bool) -> Tensor:
    """Weighted average (Wortsman et al. 2022): ``sum_i w_i x_i / (sum_i w_i if normalize)``.

    The base tensor only sets the output dtype (as in mergekit, the base is not averaged in).
    """
    out = torch.zeros(base.shape, dtype=torch.float32)
    for x, w in zip(tensors, weights, strict=True):
        out.add_(x.float(), alpha=w)
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
) -> Tensor:
    """Generalized task arithmetic (mergekit's GTATask), with the TIES-SV slack.

    With ``tau_hat_i = sparsify(tau_i, d_i)`` and ``v_i = w_i * tau_hat_i``:

    - no consensus: ``m = sum_i v_i``; divisor ``D = sum_i w_i`` (1 where ``|D| < 1e-8``).
    - sum consensus: ``gamma = +1 where sum_i v_i >= 0 else -1``;
      TIES-SV: let ``P`` be the top ``int(slack * numel)`` entries of ``|v_t|`` (t =
      ``task_index``; for ``w_t != 0`` the top entries of ``|tau_hat_t|``, same tie rule as
      trimming, so ``P`` lies inside the kept set when slack <= d_t); on ``P`` where
      ``v_t != 0`` the elected sign is ``sign(v_t)`` instead (the task model's most important
      entries cannot be outvoted);
      ``mask_i = sign(v_i) == gamma``; ``m = sum_i v_i mask_i``; ``D = sum_i w_i mask_i``
      (1 where 0).
    - ``out = base + lambda * (m / D if normalize else m)``, cast to the base dtype.

    ``slack == 0`` leaves ``gamma`` untouched, so ties_sv equals ties bit for bit.
    """
    b = base.float()
    mixed = torch.zeros_like(b)
    divisor = torch.zeros_like(b)
    if consensus is Consensus.NONE:
        for x, w, d in zip(tensors, weights, densities, strict=True):
            mixed.add_(sparsify(x.float() - b, d, sparsification, rescale=rescale), alpha=w)
        divisor.fill_(sum(weights))
        divisor[divisor.abs() < 1e-8] = 1
    else:
        weighted = [
            sparsify(x.float() - b, d, sparsification, rescale=rescale) * w
            for x, w, d in zip(tensors, weights, densities, strict=True)
        ]
        elected = elect_sign(weighted, consensus)
        if task_index is not None and slack > 0:
            task = weighted[task_index]
            protected = topk_mask(task.abs(), int(slack * task.numel())) & (task != 0)
            elected = torch.where(protected, task.sign(), elected)
        for v, w in zip(weighted, weights, strict=True):
            agree = v.sign() == elected  # zeros (trimmed entries) never agree
            mixed.add_(v * agree)
            divisor.add_(agree.float(), alpha=w)
        divisor[divisor == 0] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return (b + mixed).to(base.dtype)


def elect_sign(weighted: Sequence[Tensor], consensus: Consensus) -> Tensor:
    """The elected sign (+1/-1 per entry); a zero total goes to +1 (mergekit's get_mask)."""
    if consensus is Consensus.SUM:
        total = torch.stack(list(weighted)).sum(dim=0)
        return torch.where(total >= 0, 1.0, -1.0)
    raise NotImplementedError(f"consensus {consensus.value!r} is not implemented")


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
    kind: type  # bool or float
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


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: a pure kernel plus the parameters it takes from a recipe.

    ``fixed`` are keyword arguments that configure the kernel (the GTA variants), ``params``
    the recipe's global parameters and ``model_params`` the per-model ones (passed to the
    kernel as lists in model order).
    """

    name: str
    reference: str  # the paper the method comes from
    kernel: Callable[..., Tensor]
    params: tuple[ParamSpec, ...]
    model_params: tuple[ParamSpec, ...]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    needs_task_model: bool = False

    def __call__(self, base: Tensor, tensors: Sequence[Tensor], params: Mapping[str, Any],
                 model_params: Sequence[Mapping[str, Any]],
                 task_index: int | None = None) -> Tensor:
        """Merge one tensor; ``params``/``model_params`` are resolved (see resolve_merge_spec)."""
        if not base.is_floating_point():
            return base.clone()
        kwargs: dict[str, Any] = dict(self.fixed)
        for spec in self.params:
            kwargs[spec.arg] = params[spec.name]
        for spec in self.model_params:
            kwargs[spec.arg] = [m[spec.name] for m in model_params]
        if self.needs_task_model:
            kwargs["task_index"] = task_index
        return self.kernel(base, tensors, **kwargs)


def _gta(name: str, reference: str, sparsification: Sparsification, consensus: Consensus,
         normalize: bool, rescale: bool, *extra: ParamSpec,
         needs_task_model: bool = False) -> MergeMethod:
    return MergeMethod(
        name=name,
        reference=reference,
        kernel=generalized_task_arithmetic,
        params=(_flag("normalize", normalize), _flag("rescale", rescale), _lambda(), *extra),
        # mergekit accepts density for every GTA method, even where nothing is sparsified.
        model_params=(_weight(), _density()),
        fixed={"sparsification": sparsification, "consensus": consensus},
        needs_task_model=needs_task_model,
    )


_SLACK = ParamSpec("slack", "slack", REQUIRED, float, lambda v: 0 <= v <= 1, "in [0, 1]")

MERGE_METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod("linear", "https://arxiv.org/abs/2203.05482", linear,
                    params=(_flag("normalize", True),), model_params=(_weight(),)),
        _gta("task_arithmetic", "https://arxiv.org/abs/2212.04089",
             Sparsification.NONE, Consensus.NONE, normalize=False, rescale=False),
        _gta("ties", "https://arxiv.org/abs/2306.01708",
             Sparsification.MAGNITUDE, Consensus.SUM, normalize=True, rescale=False),
        _gta("ties_sv", "Tao et al. 2024, Unlocking the Potential of Model Merging for "
             "Low-Resource Languages (EMNLP Findings)",
             Sparsification.MAGNITUDE, Consensus.SUM, True, False, _SLACK,
             needs_task_model=True),
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
                             f"accepted: {', '.join(sorted(known))}")
    where = f"(method {method!r})"
    resolved = {p.name: p.resolve(params.get(p.name, REQUIRED), where) for p in spec.params}

    if not models:
        raise ValueError(f"merge method {method!r} needs at least one model")
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
                                 f"parameter {key!r}; accepted: {', '.join(sorted(model_known))}")
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
    - sft_topk_mass_kept: of the SFT delta's top ``int(density * numel)`` entries by magnitude
      (its TIES-kept set), the fraction of their |delta| mass at entries where the merged delta
      is nonzero with the SFT sign.
    - sft_dropped: fraction of nonzero SFT entries where the merged delta is zero or of the
      opposite sign.
    - trimmed: of the entries some input changed, the fraction the merge left at the base value.
    """
    merged = merged_delta.float()
    counts = DiagnosticCounts()
    any_change = torch.zeros(merged.shape, dtype=torch.bool)
    for delta in [*ct_deltas, *([sft_delta] if sft_delta is not None else [])]:
        any_change |= delta != 0
    counts.touched = int(any_change.count_nonzero())
    counts.trimmed = int((any_change & (merged == 0)).count_nonzero())
    if sft_delta is None:
        return counts
    sft = sft_delta.float()
    sft_sign = sft.sign()
    for ct in ct_deltas:
        both = (ct != 0) & (sft != 0)
        counts.both_nonzero += int(both.count_nonzero())
        counts.conflicts += int((both & (ct.float().sign() != sft_sign)).count_nonzero())
    kept = (merged.sign() == sft_sign) & (sft != 0)
    magnitude = sft.abs()
    top = topk_mask(magnitude, int(density * sft.numel()))
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
