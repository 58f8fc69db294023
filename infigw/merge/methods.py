"""Merge methods: what to do with the deltas ``Δ_m = W_m − W_base`` of one tensor, as a :class:`MergePlan`.

The mergekit methods (``task_arithmetic``, ``ties``, ``dare_ties``, ``dare_linear``, ``linear``) follow
mergekit 0.1.5's rules (``merge_methods/generalized_task_arithmetic.py``, ``sparsify.py``, ``linear.py``), so
one YAML config gives the same numbers in both tools; ``rsaf`` is our reconstruction of InfiFusion's
Rate-Skewness Adaptive Fusion. Every method only *plans*; :mod:`infigw.merge.engine` carries the plan out
chunk by chunk (bounded memory) with one answer whatever the chunking.

Generalized task arithmetic (all methods but ``linear``), per tensor, in the working dtype:

1. sparsify each ``Δ_m`` to its kept fraction ``density[m]`` (``1`` keeps all): ``"magnitude"`` keeps exactly
   ``k = max(1, ⌊density·n⌋)`` entries of largest ``|Δ_m|`` (ties at the threshold go to the lowest flat
   index); ``"random"`` keeps each entry with probability ``density`` (DARE); with ``rescale`` the kept entries
   are scaled so that ``‖·‖₁`` equals the unsparsified ``‖Δ_m‖₁``;
2. weight: ``D_m = w_m · Δ'_m`` (weights of any sign);
3. combine: without consensus ``mixed = Σ_m D_m``, ``divisor = Σ_m w_m``; with consensus the elected sign is
   ``s = +1 where Σ_m D_m ≥ 0`` (``"sum"``, TIES) or ``where Σ_m sign(D_m) ≥ 0`` (``"count"``), else −1, and
   ``mixed = Σ_m D_m·[sign D_m = s]``, ``divisor = Σ_m w_m·[sign D_m = s]``;
4. ``normalize`` divides ``mixed`` by ``divisor`` (a zero divisor counts as 1); ``W = W_base + λ·mixed``.

``linear`` is a weighted average of the weights themselves (no base): ``W = Σ_m w_m W_m / Σ_m w_m``.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import ClassVar, Protocol, Sequence, runtime_checkable

__all__ = [
    "TensorStats",
    "MergePlan",
    "MergeMethod",
    "TaskArithmetic",
    "Ties",
    "DareTies",
    "DareLinear",
    "Linear",
    "Rsaf",
    "METHODS",
    "LEGACY_METHODS",
    "get_method",
    "rsaf_keep_ratios",
    "keep_count",
]

SPARSIFICATIONS = (None, "magnitude", "random")
CONSENSUS_METHODS = (None, "sum", "count")


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
    """What to do elementwise with the deltas of one tensor (see the module docstring for the rule).

    ``weights`` and ``density`` hold one entry per model; ``density`` is ignored without ``sparsification``.
    ``linear=True`` averages the weights themselves instead (only ``weights`` and ``normalize`` apply).
    """

    weights: Sequence[float]
    sparsification: str | None = None
    density: Sequence[float] | None = None
    rescale: bool = False
    consensus: str | None = None
    normalize: bool = False
    scale: float = 1.0
    linear: bool = False

    def check(self, num_models: int, who: str) -> "MergePlan":
        """Validate against ``num_models`` (raises ``ValueError``/``TypeError`` naming the field); returns self."""
        self.weights = _check_weights(self.weights, num_models, who, required=True)
        if self.sparsification not in SPARSIFICATIONS:
            raise ValueError(f"{who}: sparsification must be one of {SPARSIFICATIONS}, got {self.sparsification!r}")
        if self.consensus not in CONSENSUS_METHODS:
            raise ValueError(f"{who}: consensus must be one of {CONSENSUS_METHODS}, got {self.consensus!r}")
        if self.sparsification is not None:
            self.density = _check_densities(self.density, num_models, who)
        self.scale = _finite(self.scale, f"{who}: scale")
        if self.linear and self.normalize and sum(self.weights) == 0.0:
            raise ValueError(f"{who}: weights sum to 0, so normalize cannot divide by them: {self.weights}")
        return self


@runtime_checkable
class MergeMethod(Protocol):
    """A swappable merge rule: set ``needs_stats`` if :meth:`plan` reads ``stats``.

    Optional: ``config(num_models) -> (merge_method, per-model parameters, method parameters)`` for the
    provenance file (``mergekit_config.yml``) written next to a merged checkpoint.
    """

    name: str
    needs_stats: bool

    def plan(self, num_models: int, stats: TensorStats | None) -> MergePlan: ...


# ------------------------------------------------------------------------------------------- validation


def _finite(value, what: str) -> float:
    """``float(value)`` for a real number (bools and strings are rejected), else an error naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a finite number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value}")
    return value


def _flag(value, what: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be true or false, got {value!r} ({type(value).__name__})")
    return value


def _per_model(values, num_models: int, what: str) -> list:
    """A scalar broadcast to every model, or a sequence with one entry per model."""
    if isinstance(values, (str, bytes)) or not (isinstance(values, numbers.Real) or isinstance(values, Sequence)):
        raise TypeError(f"{what}: expected a number or a sequence of numbers, got {values!r}")
    if isinstance(values, numbers.Real):
        return [values] * num_models
    if len(values) != num_models:
        raise ValueError(f"{what} has {len(values)} entries, expected one per model ({num_models})")
    return list(values)


def _check_weights(weights, num_models: int, who: str, *, required: bool = False) -> list[float]:
    """Per-model weights: finite, any sign (negative task vectors subtract), not all zero."""
    if weights is None:
        if required:
            raise ValueError(f"{who}: weights are required (one per model)")
        return [1.0 / num_models] * num_models
    values = _per_model(weights, num_models, f"{who}: weights")
    weights = [_finite(w, f"{who}: weights[{i}]") for i, w in enumerate(values)]
    if all(w == 0.0 for w in weights):
        raise ValueError(f"{who}: weights are all 0, so the merge would return the base unchanged")
    return weights


def _check_densities(density, num_models: int, who: str) -> list[float]:
    out = []
    for i, d in enumerate(_per_model(density, num_models, f"{who}: density")):
        d = _finite(d, f"{who}: density[{i}]")
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"{who}: density[{i}] (kept fraction) must lie in [0, 1], got {d}")
        out.append(d)
    return out


def _check_fraction(value, name: str, *, open_low: bool, open_high: bool) -> float:
    value = _finite(value, name)
    low_ok = value > 0.0 if open_low else value >= 0.0
    high_ok = value < 1.0 if open_high else value <= 1.0
    if not (low_ok and high_ok):
        interval = f"{'(' if open_low else '['}0, 1{')' if open_high else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value}")
    return value


def keep_count(ratio: float, numel: int) -> int:
    """Entries a magnitude selection of kept fraction ``ratio`` keeps: ``max(1, ⌊ratio·numel⌋)`` (mergekit's
    rule; ``ratio ≥ 1`` keeps all ``numel``, ``ratio ≤ 0`` none)."""
    if ratio >= 1.0:
        return numel
    if ratio <= 0.0 or numel == 0:
        return 0
    return max(1, int(ratio * numel))


# ------------------------------------------------------------------------------------------- mergekit methods


@dataclass(frozen=True)
class _Rule:
    """What mergekit fixes for one method of the family, and its defaults for ``normalize`` and ``rescale``."""

    sparsification: str | None = None
    consensus: str | None = None
    normalize: bool = False
    rescale: bool = False


@dataclass
class _TaskArithmeticFamily:
    """mergekit's generalized task arithmetic; subclasses set ``name`` and their :class:`_Rule`.

    ``weights``: one per model (or one for all), any sign; None = 1/K each **(ours: mergekit configs must give
    them)**. ``density``: kept fraction per model (or one for all). ``normalize``/``rescale``/``consensus_method``
    default to the method's mergekit defaults; ``scale`` is mergekit's ``lambda``.
    """

    weights: Sequence[float] | float | None = None
    density: Sequence[float] | float = 1.0
    normalize: bool | None = None
    rescale: bool | None = None
    consensus_method: str | None = "default"
    scale: float = 1.0

    name: ClassVar[str] = ""
    needs_stats: ClassVar[bool] = False
    rule: ClassVar[_Rule] = _Rule()

    def __post_init__(self):
        who, rule = self.name, self.rule
        self.scale = _finite(self.scale, f"{who}: scale (lambda)")
        self.normalize = rule.normalize if self.normalize is None else _flag(self.normalize, f"{who}: normalize")
        self.rescale = rule.rescale if self.rescale is None else _flag(self.rescale, f"{who}: rescale")
        if self.consensus_method == "default":
            self.consensus_method = rule.consensus
        if self.consensus_method not in CONSENSUS_METHODS:
            raise ValueError(f"{who}: consensus_method must be 'sum', 'count' or None, got {self.consensus_method!r}")
        if rule.sparsification is None and self.density != 1.0:
            raise ValueError(f"{who}: density does not apply (no sparsification); got {self.density!r}")

    def plan(self, num_models, stats=None):
        return MergePlan(
            weights=_check_weights(self.weights, num_models, self.name),
            sparsification=self.rule.sparsification,
            density=self.density,
            rescale=self.rescale,
            consensus=self.consensus_method,
            normalize=self.normalize,
            scale=self.scale,
        ).check(num_models, self.name)

    def config(self, num_models):
        plan = self.plan(num_models)
        per_model = [{"weight": w} for w in plan.weights]
        if plan.sparsification is not None:
            for entry, d in zip(per_model, plan.density):
                entry["density"] = d
        shared = {"normalize": plan.normalize, "lambda": plan.scale}
        if plan.sparsification is not None:
            shared["rescale"] = plan.rescale
        if plan.consensus != self.rule.consensus:
            shared["consensus_method"] = plan.consensus
        return self.name, per_model, shared


@dataclass
class TaskArithmetic(_TaskArithmeticFamily):
    """Task arithmetic: ``W = W_base + λ·Σ_m w_m Δ_m`` (mergekit ``task_arithmetic``; ``normalize`` False)."""

    name: ClassVar[str] = "task_arithmetic"


@dataclass
class Ties(_TaskArithmeticFamily):
    """TIES (Yadav et al. 2023): magnitude-trim each Δ_m to ``density``, elect the sign by the weighted sum,
    disjoint weighted mean (mergekit ``ties``: ``normalize`` True)."""

    density: Sequence[float] | float = 0.2
    name: ClassVar[str] = "ties"
    rule: ClassVar[_Rule] = _Rule("magnitude", "sum", normalize=True)


@dataclass
class DareTies(_TaskArithmeticFamily):
    """DARE-TIES (Yu et al. 2024): random drop to ``density``, L1 rescale, sign election, weighted **sum** of
    the agreeing deltas (mergekit ``dare_ties``: ``normalize`` False, ``rescale`` True)."""

    name: ClassVar[str] = "dare_ties"
    rule: ClassVar[_Rule] = _Rule("random", "sum", rescale=True)


@dataclass
class DareLinear(_TaskArithmeticFamily):
    """DARE: random drop to ``density``, L1 rescale, weighted sum (mergekit ``dare_linear``)."""

    name: ClassVar[str] = "dare_linear"
    rule: ClassVar[_Rule] = _Rule("random", rescale=True)


@dataclass
class Linear:
    """Weighted average of the weights themselves, ``Σ_m w_m W_m / Σ_m w_m`` (mergekit ``linear``).

    The base supplies only the tensor layout (and the config/tokenizer files); include it among the models
    to give it a weight. ``normalize=False`` gives the plain weighted sum.
    """

    weights: Sequence[float] | float | None = None
    normalize: bool = True
    name: ClassVar[str] = "linear"
    needs_stats: ClassVar[bool] = False

    def __post_init__(self):
        self.normalize = _flag(self.normalize, "linear: normalize")

    def plan(self, num_models, stats=None):
        weights = _check_weights(self.weights, num_models, self.name)
        return MergePlan(weights=weights, normalize=self.normalize, linear=True).check(num_models, self.name)

    def config(self, num_models):
        plan = self.plan(num_models)
        return self.name, [{"weight": w} for w in plan.weights], {"normalize": plan.normalize}


# ------------------------------------------------------------------------------------------- RSAF (ours)


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

    - ``rate_m = ‖Δ_m‖₁ / (‖W_base‖₁ + eps)``, ``skew_m`` = population skewness of the entries of ``|Δ_m|``;
    - keep ratio ``r_m`` from :func:`rsaf_keep_ratios`; magnitude selection of ``keep_count(r_m, n)`` entries;
    - merge weights ``ω_m = rate_m / Σ rate`` (uniform when all rates are 0);
    - ``W = W_base + scale · Σ_m ω_m (M_m ⊙ Δ_m)``; with ``elect_sign`` the sum becomes the TIES disjoint
      weighted mean (sign election by the weighted sum, ``normalize``).

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
    name: ClassVar[str] = "rsaf"
    needs_stats: ClassVar[bool] = True

    def __post_init__(self):
        self.r_min = _check_fraction(self.r_min, "rsaf: r_min", open_low=True, open_high=False)
        self.r_max = _check_fraction(self.r_max, "rsaf: r_max", open_low=True, open_high=False)
        if self.r_min > self.r_max:
            raise ValueError(f"rsaf: r_min ({self.r_min}) must not exceed r_max ({self.r_max})")
        if _finite(self.r0, "rsaf: r0") <= 0.0:
            raise ValueError(f"rsaf: r0 must be a positive finite number, got {self.r0}")
        if _finite(self.beta, "rsaf: beta") < 0.0:
            raise ValueError(f"rsaf: beta must be finite and non-negative, got {self.beta}")
        if _finite(self.eps, "rsaf: eps") <= 0.0:
            raise ValueError(f"rsaf: eps must be positive, got {self.eps}")
        self.elect_sign = _flag(self.elect_sign, "rsaf: elect_sign")
        self.scale = _finite(self.scale, "rsaf: scale")

    def plan(self, num_models, stats):
        rates = stats.rates(self.eps)
        total = sum(rates)
        weights = [r / total for r in rates] if total > 0.0 else [1.0 / num_models] * num_models
        ratios = rsaf_keep_ratios(rates, stats.skewness(), self.r0, self.beta, self.r_min, self.r_max)
        return MergePlan(
            weights=weights, sparsification="magnitude", density=ratios,
            consensus="sum" if self.elect_sign else None, normalize=self.elect_sign, scale=self.scale,
        ).check(num_models, self.name)

    def config(self, num_models):
        shared = {k: getattr(self, k) for k in ("r0", "beta", "r_min", "r_max", "elect_sign", "scale", "eps")}
        return self.name, [{} for _ in range(num_models)], shared


# ------------------------------------------------------------------------------------------- names


def _dare(drop_rate: float = 0.9, weights=None, elect_sign: bool = False, scale: float = 1.0):
    """Deprecated ``dare``: ``dare_linear`` (``dare_ties`` with ``elect_sign``) with density = 1 − drop_rate."""
    drop_rate = _check_fraction(drop_rate, "dare: drop_rate", open_low=False, open_high=True)
    target = "dare_ties" if _flag(elect_sign, "dare: elect_sign") else "dare_linear"
    warnings.warn(
        f"merge method 'dare' is deprecated: use '{target}' with density = 1 - drop_rate = {1.0 - drop_rate:g} "
        "(mergekit's names and rules: L1-norm rescale, one seeded random stream, DARE-TIES sums the agreeing "
        "deltas)", FutureWarning, stacklevel=3,
    )
    cls = DareTies if elect_sign else DareLinear
    return cls(weights=weights, density=1.0 - drop_rate, scale=scale)


METHODS: dict[str, type] = {
    "task_arithmetic": TaskArithmetic,
    "ties": Ties,
    "dare_ties": DareTies,
    "dare_linear": DareLinear,
    "linear": Linear,
    "rsaf": Rsaf,
}
# names of infigw before the mergekit names (kept working; ``dare`` warns)
LEGACY_METHODS = {"average": TaskArithmetic, "dare": _dare}


def get_method(method: str | MergeMethod, **options) -> MergeMethod:
    """Instantiate a method from :data:`METHODS` / :data:`LEGACY_METHODS` by name with ``options``, or return
    a ready :class:`MergeMethod` unchanged."""
    if isinstance(method, str):
        factory = METHODS.get(method) or LEGACY_METHODS.get(method)
        if factory is None:
            raise ValueError(f"method: expected one of {sorted(METHODS) + sorted(LEGACY_METHODS)}, got {method!r}")
        try:
            return factory(**options)
        except TypeError as err:
            if "unexpected keyword argument" in str(err):
                raise TypeError(f"method {method!r}: {str(err).split('() ', 1)[-1]}") from None
            raise
    if options:
        raise TypeError("method options are only accepted together with a method name")
    if not isinstance(method, MergeMethod):
        raise TypeError(f"method: expected a name or an object with name, needs_stats and plan(), got {method!r}")
    return method
