"""One loss call's resolved inputs, built once: valid positions, teachers and theirs, gold tokens, the position
pairs of the token-level terms and the teacher weighting. Every public loss starts here, so each argument is
validated in one place and the pairs are computed once per call (docs/math.md §1, §5, §7)."""
from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional, Union

import torch

from .alignment import offset_match
from .checks import (check_choice, check_ids_in_range, check_k, check_logits, check_positive, check_same_device,
                     check_temperature, valid_positions)
from .contract import GRANULARITIES, PAIRINGS
from .teacher import Teacher, TopKRecord, as_teacher_list, teacher_name, vocab_size
from .weighting import TeacherWeighting, resolve_rule


def per_teacher(given, name: str, num: int) -> list:
    """None, one tensor (one teacher) or a list of S entries -> a list of S entries."""
    if not (given is None or isinstance(given, (torch.Tensor, list, tuple))):
        raise TypeError(f"{name} must be None, a tensor or a list with one entry per teacher, got {type(given).__name__}")
    if given is None or isinstance(given, torch.Tensor):
        if isinstance(given, torch.Tensor) and num > 1:
            raise ValueError(f"{name} must be a list with one entry per teacher ({num}) when there are several teachers")
        return [given] * num
    if len(given) != num:
        raise ValueError(f"{name} must have one entry per teacher ({num}), got {len(given)}")
    return list(given)


def index_partners(student_valid: torch.Tensor, teacher_valid: torch.Tensor) -> torch.Tensor:
    """(B, T) int64: the flat (B*T') teacher row paired with each student position, -1 for none.

    The i-th valid student position of a sequence pairs with the i-th valid teacher position (up to the shorter
    count), the convention of both public ULD implementations. Dense, without a host sync.
    """
    batch, teacher_length = teacher_valid.shape
    student_rank = student_valid.long().cumsum(-1) - 1
    teacher_rank = teacher_valid.long().cumsum(-1) - 1
    pairs = torch.minimum(student_valid.sum(-1), teacher_valid.sum(-1)).unsqueeze(-1)
    # row_of_rank[b, r] = flat row of the r-th valid teacher position; invalid positions land in a spare slot
    rows = torch.arange(batch * teacher_length, device=teacher_valid.device).view(batch, teacher_length)
    slot = torch.where(teacher_valid, teacher_rank, teacher_length)
    row_of_rank = rows.new_full((batch, teacher_length + 1), -1).scatter(1, slot, rows)
    partner = row_of_rank.gather(1, student_rank.clamp(0, teacher_length))
    return torch.where(student_valid & (student_rank < pairs), partner, -1)


class StudentSpec(NamedTuple):
    """The shape (B, T, V) and device of a student whose logits are never formed (fused-linear, sharded)."""
    shape: torch.Size
    device: torch.device


@dataclass
class CallInputs:
    """What one call of a loss works on (built by :func:`resolve`)."""

    student: Optional[torch.Tensor]  # (B, T, V) logits, or None when they are never formed
    vocab: int  # V of the student
    valid: torch.Tensor  # (B, T) bool
    labels: Optional[torch.Tensor]  # (B, T) int64, or None
    teachers: List[Teacher]
    teacher_valids: List[torch.Tensor]  # (B, T'_s) bool each
    weighting: TeacherWeighting
    granularity: str
    _partners: Optional[torch.Tensor] = field(default=None, repr=False)  # set now by "offsets" pairing

    @property
    def partners(self) -> torch.Tensor:
        """(S, B, T) int64 flat teacher row paired with each student position (-1: none), computed once."""
        if self._partners is None:
            self._partners = torch.stack([index_partners(self.valid, valid) for valid in self.teacher_valids])
        return self._partners


def offset_partners(student_offsets, student_valid, teacher_offsets, teacher_valid) -> torch.Tensor:
    """(B, T) flat teacher row whose target token starts at the character where the student's does (-1: none),
    see :func:`infigw.alignment.offset_match` (ours: the pairing of character-aligned positions)."""
    match = offset_match(student_offsets, student_valid, teacher_offsets, teacher_valid)
    sequence = torch.arange(match.shape[0], device=match.device).unsqueeze(-1)
    return torch.where(match >= 0, sequence * teacher_offsets.shape[1] + match, -1)


def _teacher_valids(teachers, teacher_labels, teacher_mask, student_valid, student_unmasked, ignore_index, student):
    """Each teacher's (B, T') valid positions. A teacher without labels and mask shares the student's positions
    when the lengths agree; of another length it is all valid only when the student is too (nothing ambiguous)."""
    num = len(teachers)
    batch, length = student_valid.shape
    valids = []
    for i, (teacher, labels, mask) in enumerate(zip(teachers, per_teacher(teacher_labels, "teacher_labels", num),
                                                   per_teacher(teacher_mask, "teacher_mask", num))):
        shape = tuple(teacher.shape[:2])
        if labels is not None or mask is not None:
            valids.append(valid_positions(labels, mask, shape, ignore_index, "teacher", student))
        elif shape[1] == length:
            valids.append(student_valid)
        elif student_unmasked:
            valids.append(torch.ones(shape, dtype=torch.bool, device=student.device))
        else:
            raise ValueError(f"{teacher_name(i, num)} has {shape[1]} positions but the student has {length}: pass "
                             "teacher_labels or teacher_mask to say which teacher positions are valid")
    return valids


def _check_teacher(teacher, index, num, batch, k, student):
    name = teacher_name(index, num)
    if isinstance(teacher, TopKRecord):
        teacher.validate(batch, k, name, student)
        return
    check_logits(teacher, name)
    check_same_device(student, teacher, name, "student_logits")
    if teacher.shape[0] != batch:
        raise ValueError(f"{name} has batch size {teacher.shape[0]} but the student logits have {batch}")
    check_k(k, teacher.shape[-1], "k", f"{name} vocabulary")


def _golds(rule, teachers, teacher_labels, teacher_mask, labels, teacher_valids, spec):
    """Each teacher's (B, T') gold next-token ids for a label-aware measure (else None each): its own
    ``teacher_labels``, or, for a teacher that shares the student's positions, the student's ``labels``."""
    num = len(teachers)
    if rule.measure is None or not rule.measure.needs_labels:
        return [None] * num
    golds = []
    for i, (teacher, own, mask, valid) in enumerate(zip(teachers, per_teacher(teacher_labels, "teacher_labels", num),
                                                        per_teacher(teacher_mask, "teacher_mask", num),
                                                        teacher_valids)):
        gold = own if own is not None else (labels if mask is None else None)
        name = "teacher_labels" if num == 1 else f"teacher_labels[{i}]"
        if gold is None:
            raise ValueError(f"teacher_weights={spec!r} needs each teacher's gold next tokens: pass {name} (the "
                             "teacher's own token ids, aligned with its logits) or, for a teacher that shares the "
                             "student's positions and tokenizer, the student's labels")
        vocab = vocab_size(teacher)
        check_ids_in_range(gold.long(), valid, vocab, f"{name} (gold tokens for teacher_weights={spec!r}) must be "
                           f"in [0, {vocab}) at the teacher's valid positions")
        golds.append(gold.long())
    return golds


def resolve(student_logits: Union[torch.Tensor, StudentSpec], teacher_logits, labels=None, *, mask=None, teacher_labels=None, teacher_mask=None,
            ignore_index: int = -100, k: int = 1, temperature: float = 1.0, teacher_weights=None,
            weight_temperature: float = 1.0, weight_granularity: str = "sequence",
            weight_k: Optional[int] = None, pairing: str = "index", student_offsets=None,
            teacher_offsets=None, teacher_chars=None) -> CallInputs:
    """Validate and resolve the arguments every loss shares (see :mod:`infigw.functional` for their meaning).

    Args:
        student_logits: (B, T, V) logits, or a :class:`StudentSpec` for a student whose logits are never formed.
        k: entries each teacher must offer (GLD's k, ULD's top_k, or 1).
        weight_k: top-k of the entropy weights (default ``k``).
        pairing: how token-level terms pair positions: "index" (the i-th valid with the i-th valid) or
            "offsets" (the positions whose target tokens start at the same character; needs ``student_offsets``
            (B, T, 2) and ``teacher_offsets``, one (B, T', 2) tensor or a list with one per teacher).
        teacher_chars: None, or per teacher a (B, T') count of the characters each position's target covers:
            the teacher weights' uncertainties are then per character (:mod:`infigw.weighting`).
    """
    if not isinstance(student_logits, StudentSpec):
        check_logits(student_logits, "student_logits")
    teachers = as_teacher_list(teacher_logits)
    check_temperature(temperature)
    rule = resolve_rule(teacher_weights, len(teachers))
    check_positive(weight_temperature, "weight_temperature")
    check_choice(weight_granularity, "weight_granularity", GRANULARITIES)
    batch = student_logits.shape[0]
    check_k(k, student_logits.shape[-1], "k", "student vocabulary")
    for i, teacher in enumerate(teachers):
        _check_teacher(teacher, i, len(teachers), batch, k, student_logits)
    valid = valid_positions(labels, mask, student_logits.shape[:2], ignore_index, "", student_logits)
    teacher_valids = _teacher_valids(teachers, teacher_labels, teacher_mask, valid, labels is None and mask is None,
                                     ignore_index, student_logits)
    for i, (teacher, teacher_valid) in enumerate(zip(teachers, teacher_valids)):
        if isinstance(teacher, TopKRecord):
            name = teacher_name(i, len(teachers))
            teacher.check_data(teacher_valid, name)
            if rule.measure is not None and rule.measure.needs_labels:  # gold probabilities must be exact
                teacher.check_usable(name, exact_probs=True, temperature=temperature)
    golds = _golds(rule, teachers, teacher_labels, teacher_mask, labels, teacher_valids, teacher_weights)
    chars = per_teacher(teacher_chars, "teacher_chars", len(teachers))
    for i, (count, teacher_valid) in enumerate(zip(chars, teacher_valids)):
        if count is not None and (not isinstance(count, torch.Tensor) or count.shape != teacher_valid.shape
                                  or count.dtype.is_complex or count.dtype == torch.bool):
            name = "teacher_chars" if len(teachers) == 1 else f"teacher_chars[{i}]"
            raise ValueError(f"{name} must be a numeric tensor of the teacher's positions' shape "
                             f"{tuple(teacher_valid.shape)}")
    entropy_k = k if weight_k is None else weight_k
    weighting = TeacherWeighting(rule, teachers, teacher_valids, golds, k=entropy_k, temperature=temperature,
                                 weight_temperature=weight_temperature, chars=chars)
    check_choice(pairing, "pairing", PAIRINGS)
    if pairing == "offsets":
        if student_offsets is None or teacher_offsets is None:
            raise ValueError("pairing='offsets' needs student_offsets (B, T, 2) and teacher_offsets (one (B, T', 2) "
                             "tensor per teacher): the character spans of the target tokens")
        teacher_offsets = per_teacher(teacher_offsets, "teacher_offsets", len(teachers))
        pairs = torch.stack([offset_partners(student_offsets, valid, offsets, teacher_valid)  # checks the offsets
                             for offsets, teacher_valid in zip(teacher_offsets, teacher_valids)])
    elif student_offsets is not None or teacher_offsets is not None:
        raise ValueError("student_offsets / teacher_offsets are used by pairing='offsets' only")
    dense = None if isinstance(student_logits, StudentSpec) else student_logits
    return CallInputs(dense, student_logits.shape[-1], valid, None if labels is None else labels.long(), teachers,
                      teacher_valids, weighting, weight_granularity, pairs if pairing == "offsets" else None)

