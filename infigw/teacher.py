"""Teacher inputs: dense logits, or the sparse top-k record in which teacher outputs are stored offline.

Everything about :class:`TopKRecord` lives here: its checks, its kept node values, its probabilities at a loss
temperature and the mass outside its kept entries (docs/math.md §1).

Record semantics (what can be computed exactly from k_t stored entries):

- ``kind="logits"``: ``values`` are raw logits; ``logsumexp`` (optional) is ``logsumexp(logits / temperature)``
  over the full vocabulary. ``kind="logprobs"``: ``values`` are ``log_softmax(logits / temperature)`` (what vLLM
  and DistillKit store); they equal ``logits / temperature`` up to a per-position constant, and their normaliser
  at the record's temperature is 0.
- Shift-invariant uses are exact for both kinds at any loss temperature: ``values="topk_probs"``, ULD with
  ``top_k`` (with or without z-scores), the entropy weights.
- Exact probabilities (``values="probs"``, full-vocabulary ULD, ``"nll"`` weights) need the full normaliser at
  the loss temperature: a record that has one at another temperature is refused; a ``kind="logits"`` record
  without ``logsumexp`` has its probabilities renormalised over the kept entries (ours, documented).
- ``values="logits"`` (GLD) needs raw logits: a per-position shift changes the degrees, so ``kind="logprobs"``
  records are refused there.
"""
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from .checks import (FLOAT_DTYPES, check_ids_in_range, check_k, check_logits, check_same_device,
                     check_temperature, data_checks_enabled)
from .contract import compute_dtype
from .reference import row_logsumexp, select_topk
from .reference.select import log_values, values_from_logs

KINDS = ("logits", "logprobs")
MAX_VOCAB = 2**31 - 1  # ids fit int32 (records store them so); dense degrees are (graphs, vocab) floats


@dataclass(frozen=True)
class TopKRecord:
    """A teacher's stored top-k outputs.

    Attributes:
        values: (B, T', k_t) floating: the teacher's top-k logits (``kind="logits"``) or log-probabilities at
            ``temperature`` (``kind="logprobs"``), in any order.
        indices: (B, T', k_t) integer: their vocabulary ids, distinct per position, each in [0, vocab_size).
        vocab_size: size V_t of the teacher's vocabulary.
        logsumexp: optional (B, T') floating (``kind="logits"`` only): logsumexp over the *full* vocabulary of
            logits / ``temperature``. With it, probability-valued nodes are exact probabilities; without it,
            probabilities are renormalised over the k_t stored entries.
        temperature: the temperature of ``logsumexp`` (kind logits) or of the log-probabilities (kind logprobs).
        kind: ``"logits"`` or ``"logprobs"``.
    """

    values: torch.Tensor
    indices: torch.Tensor
    vocab_size: int
    logsumexp: Optional[torch.Tensor] = None
    temperature: float = 1.0
    kind: str = "logits"

    def __post_init__(self):  # metadata only: no data is read here
        values, indices = self.values, self.indices
        if not isinstance(values, torch.Tensor) or not isinstance(indices, torch.Tensor):
            raise TypeError("TopKRecord.values and TopKRecord.indices must be tensors")
        if values.dtype not in FLOAT_DTYPES:
            raise TypeError(f"TopKRecord.values must be a floating tensor, got {values.dtype}")
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise TypeError(f"TopKRecord.indices must be an integer tensor, got {indices.dtype}")
        if values.dim() != 3 or values.shape != indices.shape or values.numel() == 0:
            raise ValueError("TopKRecord.values and TopKRecord.indices must share one non-empty shape (B, T', k_t), "
                             f"got {tuple(values.shape)} and {tuple(indices.shape)}")
        if values.device != indices.device:
            raise ValueError(f"TopKRecord.indices is on {indices.device} but its values on {values.device}")
        vocab = self.vocab_size
        if isinstance(vocab, bool) or not isinstance(vocab, int) or not values.shape[-1] <= vocab <= MAX_VOCAB:
            raise ValueError(f"TopKRecord.vocab_size must be an int in [k_t = {values.shape[-1]}, {MAX_VOCAB}], "
                             f"got {vocab!r}")
        if self.kind not in KINDS:
            raise ValueError(f"TopKRecord.kind must be one of {KINDS}, got {self.kind!r}")
        check_temperature(self.temperature, "TopKRecord.temperature")
        lse = self.logsumexp
        if lse is not None:
            if self.kind == "logprobs":
                raise ValueError("TopKRecord.logsumexp must be None for kind='logprobs' (log-probabilities are "
                                 "already normalised)")
            if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != tuple(values.shape[:2]):
                raise ValueError(f"TopKRecord.logsumexp must be a tensor of shape {tuple(values.shape[:2])}")
            if lse.dtype not in FLOAT_DTYPES:
                raise TypeError(f"TopKRecord.logsumexp must be a floating tensor, got {lse.dtype}")
            if lse.device != values.device:
                raise ValueError(f"TopKRecord.logsumexp is on {lse.device} but its values on {values.device}")

    @property
    def shape(self):
        return self.values.shape

    @property
    def device(self):
        return self.values.device

    @classmethod
    def from_logits(cls, logits: torch.Tensor, k: int, temperature: float = 1.0, with_logsumexp: bool = True):
        """Record the top-k of dense teacher logits (B, T', V_t) with the contract's tie rule, e.g. to store them
        offline; ``with_logsumexp`` also stores logsumexp(logits / temperature)."""
        check_logits(logits, "logits")
        check_k(k, logits.shape[-1], "k", "teacher vocabulary")
        check_temperature(temperature)
        with torch.no_grad():
            values, indices = select_topk(logits, k)
            lse = row_logsumexp(logits, temperature) if with_logsumexp else None
        return cls(values, indices, logits.shape[-1], lse, float(temperature))

    # ------------------------------------------------------------------------------------------- checks
    def validate(self, batch: int, k: int, name: str, reference: torch.Tensor) -> None:
        """The record fits a call: its batch, k_t >= k, the student's device (metadata only)."""
        if self.values.shape[0] != batch:
            raise ValueError(f"{name} has batch size {self.values.shape[0]} but the student has {batch}")
        if self.values.shape[-1] < k:
            raise ValueError(f"{name} keeps k_t = {self.values.shape[-1]} entries per position, fewer than k = {k}")
        check_same_device(reference, self.values, f"{name}.values", "the student logits")

    def check_data(self, valid: torch.Tensor, name: str) -> None:
        """At the valid (B, T') positions: ids in range and distinct, probabilities at most 1 under the record's
        normaliser (up to the rounding of its values' dtype). Data checks: one host sync each, skipped with
        ``INFIGW_DATA_CHECKS=0``; padding positions may hold anything."""
        if not data_checks_enabled(self.values):
            return
        check_ids_in_range(self.indices, valid.unsqueeze(-1), self.vocab_size,
                           f"{name}.indices must lie in [0, {self.vocab_size}) (vocab_size) at valid positions")
        ordered = self.indices.sort(-1).values
        if bool(((ordered[..., 1:] == ordered[..., :-1]) & valid.unsqueeze(-1)).any()):
            raise ValueError(f"{name}.indices must be distinct at each position (a vocabulary id is kept twice)")
        log_p = self._exact_log_probs(self.temperature)
        if log_p is not None:
            logits = self.kept_logits()
            slack = torch.finfo(self.values.dtype).eps * logits.abs().amax(-1) / self.temperature + 1e-3
            excess = ~(log_p.logsumexp(-1) <= slack)  # NaN counts as excess
            if bool((excess & valid).any()):
                raise ValueError(f"{name}: the kept probabilities sum to more than 1 (or are NaN) under its "
                                 f"{'logsumexp' if self.kind == 'logits' else 'log-probabilities'}: that is not "
                                 "the normaliser of these values (another temperature or vocabulary?)")

    def check_usable(self, name: str, *, values: Optional[str] = None, exact_probs: bool = False,
                     temperature: float = 1.0) -> None:
        """Refuse uses that the record cannot serve exactly (see the module docstring)."""
        if values == "logits" and self.kind == "logprobs":
            raise ValueError(f"{name} holds log-probabilities, which cannot serve values='logits' (a per-position "
                             "shift changes the degrees): use values='probs' or 'topk_probs', or record raw logits")
        if exact_probs and self.has_normaliser() and self.temperature != temperature:
            raise ValueError(f"{name} was normalised at temperature {self.temperature} but the loss uses "
                             f"temperature {temperature}: exact probabilities need the normaliser at the loss "
                             "temperature (record it there, or use a shift-invariant option: values='topk_probs' "
                             "or ULD top_k)")

    # ---------------------------------------------------------------------------------------------- math
    def kept_logits(self) -> torch.Tensor:
        """(B, T', k_t) logits up to a per-position constant, in fp32 (fp64 for fp64 values)."""
        values = self.values.to(compute_dtype(self.values.dtype))
        return values * self.temperature if self.kind == "logprobs" else values

    def has_normaliser(self) -> bool:
        return self.kind == "logprobs" or self.logsumexp is not None

    def _exact_log_probs(self, temperature: float) -> Optional[torch.Tensor]:
        """(B, T', k_t) exact log-probabilities at ``temperature``, or None when the record has no normaliser."""
        if not self.has_normaliser():
            return None
        scaled = self.kept_logits() / temperature
        if self.kind == "logprobs":
            return scaled
        return scaled - self.logsumexp.to(scaled.dtype).unsqueeze(-1)

    def log_probs(self, temperature: float) -> torch.Tensor:
        """(B, T', k_t) log-probabilities of the kept entries at ``temperature``: exact with a normaliser, else
        renormalised over the kept entries. A normaliser taken at another temperature is refused (the entry
        points call :meth:`check_usable` first, naming the argument)."""
        if self.has_normaliser() and temperature != self.temperature:
            raise ValueError(f"this TopKRecord was normalised at temperature {self.temperature}, not {temperature}")
        exact = self._exact_log_probs(temperature)
        return exact if exact is not None else torch.log_softmax(self.kept_logits() / temperature, dim=-1)

    def residual_mass(self, temperature: float) -> torch.Tensor:
        """(B, T') probability outside the kept entries (0 for renormalised records), clamped to [0, 1]."""
        return (1 - self.log_probs(temperature).exp().sum(-1)).clamp(0, 1)

    def kept(self, k: int, values: str, temperature: float):
        """Top-k of the record (ties to the smaller vocabulary id) -> node values (N, k), ids (N, k) and, for the
        probability values, their logs (N, k) (else None: the cosine norm scales by them, docs/math.md §3)."""
        by_id = self.indices.long().argsort(-1)
        ids = self.indices.long().gather(-1, by_id)
        kept, position = select_topk(self.kept_logits().gather(-1, by_id), k)
        kept_ids = ids.gather(-1, position).reshape(-1, k)
        if values == "probs":
            logs = self.log_probs(temperature).gather(-1, by_id).gather(-1, position).reshape(-1, k)
        else:
            logs = log_values(kept.reshape(-1, k), values, temperature)
        return values_from_logs(kept.reshape(-1, k), logs), kept_ids, logs


Teacher = Union[torch.Tensor, TopKRecord]
Teachers = Union[Teacher, Sequence[Teacher]]


def as_teacher_list(teacher: Teachers, name: str = "teacher_logits"):
    """One teacher or a sequence of teachers -> list of teachers (at least one)."""
    if isinstance(teacher, (torch.Tensor, TopKRecord)):
        return [teacher]
    if isinstance(teacher, (list, tuple)) and teacher:
        for i, item in enumerate(teacher):
            if not isinstance(item, (torch.Tensor, TopKRecord)):
                raise TypeError(f"{name}[{i}] must be a tensor or infigw.TopKRecord, got {type(item).__name__}")
        return list(teacher)
    raise TypeError(
        f"{name} must be a tensor (B, T', V_t), an infigw.TopKRecord or a non-empty list of those, "
        f"got {type(teacher).__name__}"
    )


def check_records_serve(teachers, *, values: Optional[str] = None, exact_probs: bool, temperature: float) -> None:
    """Refuse record teachers that cannot serve a call exactly (:meth:`TopKRecord.check_usable`)."""
    for i, teacher in enumerate(teachers):
        if isinstance(teacher, TopKRecord):
            teacher.check_usable(teacher_name(i, len(teachers)), values=values, exact_probs=exact_probs,
                                 temperature=temperature)


def teacher_name(index: int, count: int) -> str:
    """How errors name teacher ``index`` of ``count``."""
    return "teacher_logits" if count == 1 else f"teacher_logits[{index}]"


def vocab_size(teacher: Teacher) -> int:
    return teacher.vocab_size if isinstance(teacher, TopKRecord) else teacher.shape[-1]


def kept_width(teacher: Teacher) -> int:
    """Entries per position a teacher offers a top-k: k_t for a record, the vocabulary for dense logits."""
    return teacher.values.shape[-1] if isinstance(teacher, TopKRecord) else teacher.shape[-1]


def teacher_logits_for_topk(teacher: Teacher) -> torch.Tensor:
    """(B, T', k_t or V_t) logits up to a per-position constant: what shift-invariant uses (entropy weights,
    top-k ULD) may select from."""
    return teacher.kept_logits() if isinstance(teacher, TopKRecord) else teacher
