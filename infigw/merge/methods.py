"""Per-tensor merge math: task arithmetic, TIES, DARE and RSAF (our reconstruction).

Every method is split in two so that a tensor can be merged chunk by chunk (bounded memory) and still give
one answer whatever the chunking:

1. ``plan(stats)``: from whole-tensor statistics of the deltas ``Δ_m = W_m − W_base`` (only gathered when the
   method sets ``needs_stats``), return a :class:`MergePlan` — per-model weights, optional top-r keep ratios,
   optional DARE drop rate, optional sign election, global scale.
2. :func:`apply_plan` on each chunk: the elementwise part (masking, dropping, weighting, sign election).

All elementwise arithmetic is fp32 (statistics: fp32 reductions per chunk, summed over chunks in fp64); the
engine writes the result back in the base dtype.

Top-r selection rule (used by TIES and RSAF): for ratio ``r`` and a tensor of ``n`` elements keep
``k = clamp(round(r·n), 1, n)`` entries; the threshold ``t`` is the exact k-th largest ``|Δ|`` (found by a
two-level radix select on the fp32 bit patterns, see :class:`MagnitudeSelector`, equal to
``torch.kthvalue(|Δ|, n−k+1)``), and every entry with ``|Δ| ≥ t`` is kept. Ties at the threshold are therefore
all kept (the kept count exceeds k only by exact ties), which makes the mask independent of element order
and of chunking.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import torch

__all__ = [
    "TensorStats",
    "MergePlan",
    "MergeMethod",
    "TaskArithmetic",
    "Ties",
    "Dare",
    "Rsaf",
    "METHODS",
    "get_method",
    "rsaf_keep_ratios",
    "keep_count",
    "apply_plan",
    "MagnitudeSelector",
    "chunk_generator",
]


@dataclass
class TensorStats:
    """Whole-tensor statistics of one tensor's deltas, one entry per fine-tuned model.

    ``abs_sum[m] = Σ|Δ_m|``, ``abs_sq_sum[m] = Σ|Δ_m|²``, ``abs_cube_sum[m] = Σ|Δ_m|³`` (fp64 sums),
    ``base_abs_sum = Σ|W_base|``, ``numel`` = elements per tensor.
    """

    numel: int
    base_abs_sum: float
    abs_sum: list[float]
    abs_sq_sum: list[float]
    abs_cube_sum: list[float]

    def rates(self, eps: float) -> list[float]:
        """Relative change rate ``‖Δ_m‖₁ / (‖W_base‖₁ + eps)`` per model."""
        return [s / (self.base_abs_sum + eps) for s in self.abs_sum]

    def skewness(self) -> list[float]:
        """Population skewness of the entries ``|Δ_m|`` per model (0 when they are constant)."""
        out = []
        n = float(max(self.numel, 1))
        for s1, s2, s3 in zip(self.abs_sum, self.abs_sq_sum, self.abs_cube_sum):
            mean = s1 / n
            var = s2 / n - mean * mean
            third = s3 / n - 3.0 * mean * (s2 / n) + 2.0 * mean**3
            # a variance below the fp32 rounding noise of the raw power sums means |Δ| is (numerically) constant
            if var <= 1e-6 * max(s2 / n, 1e-300):
                out.append(0.0)
            else:
                out.append(third / var**1.5)
        return out


@dataclass
class MergePlan:
    """What to do elementwise with the deltas of one tensor.

    merged = W_base + scale · combine_m( weights[m] · T_m(Δ_m) ), where T_m keeps the top ``keep_ratio[m]``
    fraction of |Δ_m| (if given) and/or drops entries with probability ``drop_rate`` and rescales the rest by
    ``1/(1−drop_rate)`` (if given). ``combine`` is a plain sum, or with ``elect_sign`` the TIES disjoint
    weighted mean: elected sign ``s = sign(Σ_m w_m T_m(Δ_m))``, then
    ``Σ_m w_m T_m(Δ_m)·[sign T_m(Δ_m) = s] / Σ_m w_m·[sign T_m(Δ_m) = s]`` (0 where no model agrees).
    """

    weights: list[float]
    keep_ratio: list[float] | None = None
    drop_rate: float | None = None
    elect_sign: bool = False
    scale: float = 1.0


@runtime_checkable
class MergeMethod(Protocol):
    """A swappable merge rule: set ``needs_stats`` if :meth:`plan` reads ``stats`` or returns keep ratios."""

    name: str
    needs_stats: bool

    def plan(self, num_models: int, stats: TensorStats | None) -> MergePlan: ...


def _check_weights(weights: Sequence[float] | None, num_models: int, who: str) -> list[float]:
    if weights is None:
        return [1.0 / num_models] * num_models
    weights = [float(w) for w in weights]
    if len(weights) != num_models:
        raise ValueError(f"{who}: weights has {len(weights)} entries, expected one per model ({num_models})")
    if not all(math.isfinite(w) and w >= 0.0 for w in weights) or sum(weights) <= 0.0:
        raise ValueError(f"{who}: weights must be finite, non-negative and not all zero, got {weights}")
    return weights


def _check_fraction(value: float, name: str, *, open_low: bool, open_high: bool) -> float:
    value = float(value)
    low_ok = value > 0.0 if open_low else value >= 0.0
    high_ok = value < 1.0 if open_high else value <= 1.0
    if not (low_ok and high_ok):
        interval = f"{'(' if open_low else '['}0, 1{')' if open_high else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value}")
    return value


def _check_scale(scale: float, who: str) -> float:
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"{who}: scale must be finite, got {scale}")
    return scale


@dataclass
class TaskArithmetic:
    """Task arithmetic: ``W = W_base + scale · Σ_m w_m Δ_m``; defaults (w = 1/K, scale 1) = plain average."""

    weights: Sequence[float] | None = None
    scale: float = 1.0
    name: str = field(default="average", init=False)
    needs_stats: bool = field(default=False, init=False)

    def __post_init__(self):
        self.scale = _check_scale(self.scale, self.name)

    def plan(self, num_models, stats=None):
        return MergePlan(weights=_check_weights(self.weights, num_models, self.name), scale=self.scale)


@dataclass
class Ties:
    """TIES-merging (Yadav et al. 2023): trim to the top ``density`` of |Δ_m|, elect sign, disjoint mean.

    ``weights`` (default uniform) turn the disjoint mean into a disjoint weighted mean; ``scale`` is λ.
    """

    density: float = 0.2
    weights: Sequence[float] | None = None
    scale: float = 1.0
    name: str = field(default="ties", init=False)
    needs_stats: bool = field(default=True, init=False)

    def __post_init__(self):
        self.density = _check_fraction(self.density, "ties: density", open_low=True, open_high=False)
        self.scale = _check_scale(self.scale, self.name)

    def plan(self, num_models, stats=None):
        return MergePlan(
            weights=_check_weights(self.weights, num_models, self.name),
            keep_ratio=[self.density] * num_models,
            elect_sign=True,
            scale=self.scale,
        )


@dataclass
class Dare:
    """DARE (Yu et al. 2024): drop each delta entry with prob. ``drop_rate``, rescale the rest by 1/(1−p).

    The Bernoulli masks come from a generator seeded by (seed, tensor name, model index, chunk index), so the
    result is reproducible and identical between the in-memory and the streaming merge for the same seed and
    ``chunk_elems`` (a different chunk size draws different, equally valid masks). ``elect_sign=True``
    gives DARE-TIES (sign election + disjoint mean after drop-and-rescale).
    """

    drop_rate: float = 0.9
    weights: Sequence[float] | None = None
    elect_sign: bool = False
    scale: float = 1.0
    name: str = field(default="dare", init=False)
    needs_stats: bool = field(default=False, init=False)

    def __post_init__(self):
        self.drop_rate = _check_fraction(self.drop_rate, "dare: drop_rate", open_low=False, open_high=True)
        self.scale = _check_scale(self.scale, self.name)

    def plan(self, num_models, stats=None):
        return MergePlan(
            weights=_check_weights(self.weights, num_models, self.name),
            drop_rate=self.drop_rate,
            elect_sign=self.elect_sign,
            scale=self.scale,
        )


def rsaf_keep_ratios(
    rates: Sequence[float],
    skews: Sequence[float],
    r0: float = 0.2,
    beta: float = 1.0,
    r_min: float = 0.05,
    r_max: float = 0.5,
) -> list[float]:
    """RSAF keep ratios (OUR RECONSTRUCTION, not the InfiFusion paper's unpublished formula).

    ``r_m = clip( r0 · (1 + β·tanh(rate_m / mean_m' rate_m')) / (1 + max(skew_m, 0)), r_min, r_max )``;
    when every rate is 0 (no model changed the tensor) the tanh term is 0.
    """
    mean_rate = sum(rates) / len(rates)
    out = []
    for rate, skew in zip(rates, skews):
        relative = rate / mean_rate if mean_rate > 0.0 else 0.0
        r = r0 * (1.0 + beta * math.tanh(relative)) / (1.0 + max(skew, 0.0))
        out.append(min(max(r, r_min), r_max))
    return out


@dataclass
class Rsaf:
    """Rate-Skewness Adaptive Fusion — OUR RECONSTRUCTION (InfiFusion's exact formula is not public).

    Per tensor and model m, with ``Δ_m = W_m − W_base``:

    - ``rate_m = ‖Δ_m‖₁ / (‖W_base‖₁ + eps)``, ``skew_m`` = population skewness of the entries of
      ``|Δ_m|``;
    - keep ratio ``r_m`` from :func:`rsaf_keep_ratios` (clipped to ``[r_min, r_max]``), top-r mask ``M_m``;
    - merge weights ``ω_m = rate_m / Σ rate`` (uniform when all rates are 0);
    - ``W = W_base + scale · Σ_m ω_m (M_m ⊙ Δ_m)``; with ``elect_sign`` the sum becomes the TIES disjoint
      weighted mean (see :class:`MergePlan`).

    Rationale: a model that moved a tensor more than the others (high relative rate) carries more of its
    change (larger r, larger ω); a heavy right tail of |Δ| (high skew) means the change is concentrated in
    few entries, so fewer entries are kept.
    """

    r0: float = 0.2
    beta: float = 1.0
    r_min: float = 0.05
    r_max: float = 0.5
    elect_sign: bool = False
    scale: float = 1.0
    eps: float = 1e-12
    name: str = field(default="rsaf", init=False)
    needs_stats: bool = field(default=True, init=False)

    def __post_init__(self):
        self.r_min = _check_fraction(self.r_min, "rsaf: r_min", open_low=True, open_high=False)
        self.r_max = _check_fraction(self.r_max, "rsaf: r_max", open_low=True, open_high=False)
        if self.r_min > self.r_max:
            raise ValueError(f"rsaf: r_min ({self.r_min}) must not exceed r_max ({self.r_max})")
        if not (math.isfinite(self.r0) and self.r0 > 0.0):
            raise ValueError(f"rsaf: r0 must be a positive finite number, got {self.r0}")
        if not (math.isfinite(self.beta) and self.beta >= 0.0):
            raise ValueError(f"rsaf: beta must be finite and non-negative, got {self.beta}")
        if not (math.isfinite(self.eps) and self.eps > 0.0):
            raise ValueError(f"rsaf: eps must be positive, got {self.eps}")
        self.scale = _check_scale(self.scale, self.name)

    def plan(self, num_models, stats):
        rates = stats.rates(self.eps)
        total = sum(rates)
        weights = [r / total for r in rates] if total > 0.0 else [1.0 / num_models] * num_models
        ratios = rsaf_keep_ratios(rates, stats.skewness(), self.r0, self.beta, self.r_min, self.r_max)
        return MergePlan(weights=weights, keep_ratio=ratios, elect_sign=self.elect_sign, scale=self.scale)


METHODS: dict[str, type] = {"average": TaskArithmetic, "ties": Ties, "dare": Dare, "rsaf": Rsaf}


def get_method(method: str | MergeMethod, **options) -> MergeMethod:
    """Instantiate ``METHODS[method](**options)``, or return a ready :class:`MergeMethod` unchanged."""
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"method: expected one of {sorted(METHODS)}, got {method!r}")
        return METHODS[method](**options)
    if options:
        raise TypeError("method options are only accepted together with a method name")
    if not isinstance(method, MergeMethod):
        raise TypeError(f"method: expected a name or an object with name, needs_stats and plan(), got {method!r}")
    return method


def keep_count(ratio: float, numel: int) -> int:
    """Number of entries a top-``ratio`` selection keeps: ``clamp(round(ratio·numel), 1, numel)``."""
    return min(max(round(ratio * numel), 1), numel)


_HI_BINS = 1 << 15  # |Δ| is non-negative fp32: sign bit 0, so bits >> 16 < 2^15
_LO_BINS = 1 << 16


class MagnitudeSelector:
    """Exact k-th largest |Δ| over a tensor seen chunk by chunk (two-level radix select on fp32 bits).

    Non-negative fp32 values order like their int32 bit patterns. Pass 1 (:meth:`add_high`) histograms the
    high 16 bits; :meth:`choose_bucket` picks the bucket holding the k-th largest value; pass 2
    (:meth:`add_low`) histograms the low 16 bits inside that bucket; :meth:`threshold` returns the value.
    Memory: two histograms, independent of the tensor size; no sorting copy.
    """

    def __init__(self):
        self.high = torch.zeros(_HI_BINS, dtype=torch.int64)
        self.low = torch.zeros(_LO_BINS, dtype=torch.int64)
        self.bucket = -1
        self.rank_in_bucket = 0

    @staticmethod
    def _bits(abs_delta: torch.Tensor) -> torch.Tensor:
        return abs_delta.reshape(-1).view(torch.int32)

    def add_high(self, abs_delta: torch.Tensor) -> None:
        self.high += torch.bincount(self._bits(abs_delta) >> 16, minlength=_HI_BINS)

    def has_non_finite(self) -> bool:
        """Whether any |Δ| seen by :meth:`add_high` was inf or NaN (exponent bits all ones)."""
        return bool(self.high[0x7F80:].any())

    @staticmethod
    def _kth_from_top(hist: torch.Tensor, k: int) -> tuple[int, int]:
        """Bin holding the k-th largest entry and the entry's rank (1-based) inside that bin."""
        at_or_above = hist.flip(0).cumsum(0).flip(0)  # at_or_above[b] = count of entries in bins >= b
        index = int((at_or_above >= k).nonzero().max())
        above = int(at_or_above[index + 1]) if index + 1 < hist.numel() else 0
        return index, k - above

    def choose_bucket(self, k: int) -> None:
        self.bucket, self.rank_in_bucket = self._kth_from_top(self.high, k)

    def add_low(self, abs_delta: torch.Tensor) -> None:
        values = abs_delta.reshape(-1)
        # bucket membership by float bounds (the bucket is a contiguous value range): ~2x faster than bit shifts
        low, high = _bits_to_float(self.bucket << 16), _bits_to_float((self.bucket + 1) << 16)
        in_bucket = values.view(torch.int32)[(values >= low).logical_and_(values < high)]
        self.low += torch.bincount(in_bucket & 0xFFFF, minlength=_LO_BINS)

    def threshold(self) -> float:
        low, _ = self._kth_from_top(self.low, self.rank_in_bucket)
        return _bits_to_float((self.bucket << 16) | low)


def _bits_to_float(bits: int) -> float:
    """The fp32 value of a non-negative bit pattern (+inf for the pattern just above the largest bucket)."""
    return float(torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32))


def chunk_generator(seed: int, name: str, model: int, chunk: int) -> torch.Generator:
    """CPU generator for one (tensor, model, chunk): a stable hash of the key, independent of process/order."""
    digest = hashlib.blake2b(f"{seed}\0{name}\0{model}\0{chunk}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def apply_plan(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    plan: MergePlan,
    thresholds: Sequence[float] | None,
    generators: Sequence[torch.Generator] | None,
) -> torch.Tensor:
    """Merged fp32 chunk ``base + scale·combine(w_m·T_m(Δ_m))`` (``base`` and ``deltas`` are fp32 chunks).

    ``thresholds[m]`` is model m's top-r magnitude threshold (when ``plan.keep_ratio`` is set);
    ``generators[m]`` draws model m's DARE keep mask for this chunk (when ``plan.drop_rate`` is set).
    """
    contributions, rescale = [], 1.0
    for m, delta in enumerate(deltas):
        c = delta
        if thresholds is not None:
            c = delta * (delta.abs() >= thresholds[m])  # multiply by the mask: ~2x faster than torch.where on CPU
        if plan.drop_rate is not None:
            c = c * (torch.rand(delta.shape, generator=generators[m]) >= plan.drop_rate)
            rescale = 1.0 / (1.0 - plan.drop_rate)  # folded into the weights below
        contributions.append(c)

    weighted_sum = contributions[0] * (plan.weights[0] * rescale)
    for w, c in zip(plan.weights[1:], contributions[1:]):
        weighted_sum.add_(c, alpha=w * rescale)
    if not plan.elect_sign:
        return base.add(weighted_sum, alpha=plan.scale)

    elected = torch.sign(weighted_sum)
    numerator = torch.zeros_like(base)
    denominator = torch.zeros_like(base)
    for w, c in zip(plan.weights, contributions):
        agrees = (c * elected) > 0  # non-zero and of the elected sign
        numerator.add_(c * agrees, alpha=w * rescale)
        denominator.add_(agrees, alpha=w)
    # where no model agrees the numerator is exactly 0, so dividing by a tiny floor gives 0 there
    merged = numerator.div_(denominator.clamp_min_(torch.finfo(base.dtype).tiny))
    return base.add(merged, alpha=plan.scale)
