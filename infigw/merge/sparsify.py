"""Sparsification of one model's delta seen chunk by chunk: exact top-k by magnitude and DARE's random drop.

Both give the answer mergekit 0.1.5 gives on the whole tensor (``sparsify.py``):

- **magnitude**: exactly ``k`` entries of largest ``|Δ|`` (``|Δ|`` compared in fp32, as mergekit's argsort
  on CPU). The k-th largest value ``t`` comes from a two-level radix select (:class:`MagnitudeSelector`); every
  entry ``> t`` is kept, and of the entries ``== t`` the first ones in flat (row-major) order, as many as still
  needed. That is a stable descending sort's choice, so the mask is one deterministic answer whatever the
  chunking.
- **random**: a keep mask ``bernoulli(density)`` drawn element by element in flat order from one generator, in
  the dtype mergekit draws it (bf16 for bf16 deltas, else fp32), so chunk after chunk consumes the random
  stream exactly as one whole-tensor draw does.
- **rescale** (``RescaleNorm.l1``): the kept entries are multiplied by ``‖Δ‖₁ / ‖kept‖₁``, both norms rounded
  to the dtype the rescale runs in and divided there, unless either is below 1e-7.
"""
from __future__ import annotations

import torch

__all__ = ["MagnitudeSelector", "TopKMask", "random_mask_dtype", "draw_keep_mask", "l1_rescale_factor"]

_HI_BINS = 1 << 15  # |Δ| is non-negative fp32: sign bit 0, so bits >> 16 < 2^15
_LO_BINS = 1 << 16
_RESCALE_EPS = 1e-7  # mergekit's rescaled_masked_tensor: no rescale when either norm is below this


class MagnitudeSelector:
    """Exact k-th largest of non-negative fp32 values seen chunk by chunk (two-level radix select).

    Non-negative fp32 values order like their int32 bit patterns. Pass 1 (:meth:`add_high`) histograms the
    high 16 bits; :meth:`choose_bucket` picks the bucket holding the k-th largest value; pass 2
    (:meth:`add_low`) histograms the low 16 bits inside that bucket; :meth:`threshold` returns the value and
    :meth:`count_above` how many entries are strictly larger. With ``track_sums`` pass 2 also sums the values
    (fp64) above the bucket and per low bin, for :meth:`sum_above`. Memory: the histograms only.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.high = torch.zeros(_HI_BINS, dtype=torch.int64, device=device)
        self.low = self.low_sums = None
        self.above_bucket_sum = 0.0
        self.bucket = -1
        self.rank_in_bucket = 0

    @staticmethod
    def _bits(values: torch.Tensor) -> torch.Tensor:
        return values.reshape(-1).view(torch.int32)

    def add_high(self, values: torch.Tensor) -> None:
        _accumulate(self.high, self._bits(values) >> 16)

    def has_non_finite(self) -> bool:
        """Whether any value seen by :meth:`add_high` was inf or NaN (exponent bits all ones)."""
        return bool(self.high[0x7F80:].any())

    @staticmethod
    def _kth_from_top(hist: torch.Tensor, k: int) -> tuple[int, int]:
        """Bin holding the k-th largest entry and the entry's rank (1-based) inside that bin."""
        cumulative = hist.cumsum(0)
        total = int(cumulative[-1])
        # the highest bin b with (entries in bins >= b) >= k, i.e. (entries below b) = cumulative[b-1] <= total - k
        index = int(torch.searchsorted(cumulative, torch.tensor([total - k], device=hist.device), right=True))
        return index, k - (total - int(cumulative[index]))

    def choose_bucket(self, k: int, track_sums: bool = False) -> None:
        self.bucket, self.rank_in_bucket = self._kth_from_top(self.high, k)
        self.low = torch.zeros(_LO_BINS, dtype=torch.int64, device=self.high.device)
        if track_sums:
            self.low_sums = torch.zeros(_LO_BINS, dtype=torch.float64, device=self.high.device)
        self._count_above_bucket = int(self.high[self.bucket + 1 :].sum())

    def _bucket_bounds(self) -> tuple[float, float]:
        return _bits_to_float(self.bucket << 16), _bits_to_float((self.bucket + 1) << 16)

    def add_low(self, values: torch.Tensor) -> None:
        values = values.reshape(-1)
        # bucket membership by float bounds (the bucket is a contiguous value range): ~2x faster than bit shifts
        low, high = self._bucket_bounds()
        inside = (values >= low).logical_and_(values < high)
        bins = values.view(torch.int32)[inside] & 0xFFFF
        _accumulate(self.low, bins)
        if self.low_sums is not None:
            _accumulate(self.low_sums, bins, values[inside].double())
            self.above_bucket_sum += float(values[values >= high].double().sum())

    def threshold(self) -> float:
        self._low_bin, _ = self._kth_from_top(self.low, self.rank_in_bucket)
        return _bits_to_float((self.bucket << 16) | self._low_bin)

    def count_above(self) -> int:
        """Entries strictly above :meth:`threshold` (call it first)."""
        return self._count_above_bucket + int(self.low[self._low_bin + 1 :].sum())

    def sum_above(self) -> float:
        """fp64 sum of the entries strictly above :meth:`threshold` (needs ``track_sums``)."""
        return self.above_bucket_sum + float(self.low_sums[self._low_bin + 1 :].sum())


def _accumulate(hist: torch.Tensor, bins: torch.Tensor, weights: torch.Tensor | None = None) -> None:
    """``hist[bins] += weights (or 1)``: a scatter for chunks much smaller than the histogram (a bincount would
    allocate and add the whole histogram per chunk), a bincount otherwise."""
    bins = bins.long()
    if bins.numel() * 8 < hist.numel():
        hist.index_add_(0, bins, torch.ones_like(bins) if weights is None else weights)
    else:
        hist += torch.bincount(bins, weights=weights, minlength=hist.numel())


def _bits_to_float(bits: int) -> float:
    """The fp32 value of a non-negative bit pattern (+inf for the pattern just above the largest bucket)."""
    return float(torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32))


class TopKMask:
    """The exact-k magnitude mask of one delta, produced chunk by chunk in row order.

    ``threshold`` = the k-th largest |Δ| (fp32), ``ties_to_keep`` = how many entries equal to it are kept (the
    first ones in flat order).
    """

    def __init__(self, threshold: float, ties_to_keep: int):
        self.threshold = threshold
        self.ties_left = ties_to_keep

    def next(self, magnitude: torch.Tensor) -> torch.Tensor:
        """Boolean keep mask of the next chunk, given its fp32 ``|Δ|``."""
        keep = magnitude > self.threshold
        if self.ties_left > 0:
            tie = (magnitude == self.threshold).reshape(-1)
            rank = tie.cumsum(0)  # 1-based position among this chunk's ties
            keep.reshape(-1).logical_or_(tie & (rank <= self.ties_left))
            self.ties_left -= min(self.ties_left, int(rank[-1]) if rank.numel() else 0)
        return keep


def random_mask_dtype(delta_dtype: torch.dtype) -> torch.dtype:
    """The dtype mergekit draws and rescales DARE masks in on CPU: bf16 for bf16 deltas, else fp32."""
    return torch.bfloat16 if delta_dtype == torch.bfloat16 else torch.float32


def draw_keep_mask(shape, density: float, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """``bernoulli(density)`` keep mask (0/1 in ``dtype``, on CPU) drawn from ``generator`` in flat order."""
    return torch.bernoulli(torch.full(tuple(shape), density, dtype=dtype), generator=generator)


def l1_rescale_factor(total_l1: float, kept_l1: float, dtype: torch.dtype) -> torch.Tensor | None:
    """``‖Δ‖₁ / ‖kept‖₁`` computed as mergekit does in ``dtype`` (a 0-d tensor), or None when either norm is
    below 1e-7 (then the kept entries are not rescaled)."""
    before = torch.tensor(total_l1, dtype=torch.float64).to(dtype)
    after = torch.tensor(kept_l1, dtype=torch.float64).to(dtype)
    if bool(before < _RESCALE_EPS) or bool(after < _RESCALE_EPS):
        return None
    return before / after
