"""Pairing student and teacher positions through the characters their target tokens cover.

Every function takes the offsets of the *target* tokens, shifted like the labels: position t of a sequence
carries the character span [start, end) of the token that position t predicts (for records that is
:attr:`~infigw.records.Example.target_offsets`, what :func:`~infigw.records.collate` returns). Spans come from
:func:`~infigw.records.token_offsets` on both sides, which trims leading whitespace, so a byte-level BPE token
" Paris" and a WordPiece token "Paris" both start at the "P".

A position takes part only if it is valid and its span is known and non-empty (start >= 0, end > start):
special tokens that cover no text (BOS/EOS added by a tokenizer report (0, 0)) are never paired. Pure torch,
on any device; :func:`offset_match` and :func:`response_mask` do not synchronise with the host.
"""
from typing import Optional, Tuple, Union

import torch

_LAST = torch.iinfo(torch.int64).max


def _check_offsets(offsets, valid, name: str, valid_name: str):
    if not isinstance(offsets, torch.Tensor) or offsets.dim() != 3 or offsets.shape[-1] != 2:
        shape = tuple(offsets.shape) if isinstance(offsets, torch.Tensor) else type(offsets).__name__
        raise ValueError(f"{name} must be a tensor (B, T, 2) of character spans, got {shape}")
    if offsets.dtype.is_floating_point or offsets.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {offsets.dtype}")
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or valid.shape != offsets.shape[:2]:
        shape = tuple(valid.shape) if isinstance(valid, torch.Tensor) else type(valid).__name__
        raise ValueError(f"{valid_name} must be a bool tensor of shape {tuple(offsets.shape[:2])}, got {shape}")
    if valid.device != offsets.device:
        raise ValueError(f"{valid_name} is on {valid.device}, {name} on {offsets.device}: they must share a device")


def _spans(offsets: torch.Tensor, valid: torch.Tensor):
    """(start, end, usable): usable = valid with a known, non-empty span."""
    start, end = offsets[..., 0].long(), offsets[..., 1].long()
    return start, end, valid & (start >= 0) & (end > start)


def offset_match(student_offsets: torch.Tensor, student_valid: torch.Tensor, teacher_offsets: torch.Tensor,
                 teacher_valid: torch.Tensor) -> torch.Tensor:
    """For each student position, the teacher position of the same sequence whose target token starts at the
    same character, or -1.

    Args:
        student_offsets: (B, T, 2) integer target-token spans; student_valid: (B, T) bool.
        teacher_offsets: (B, T', 2); teacher_valid: (B, T') bool.
    Returns:
        (B, T) int64 teacher positions in [0, T') or -1. Each student and each teacher position is used at most
        once: where several positions of a side start at the same character, the first one takes the pair.
    """
    _check_offsets(student_offsets, student_valid, "student_offsets", "student_valid")
    _check_offsets(teacher_offsets, teacher_valid, "teacher_offsets", "teacher_valid")
    if student_offsets.shape[0] != teacher_offsets.shape[0]:
        raise ValueError(f"student_offsets has {student_offsets.shape[0]} sequences, teacher_offsets "
                         f"{teacher_offsets.shape[0]}: both sides must hold the same batch")
    if student_offsets.device != teacher_offsets.device:
        raise ValueError(f"student_offsets is on {student_offsets.device}, teacher_offsets on "
                         f"{teacher_offsets.device}: they must share a device")
    s_start, _, s_usable = _spans(student_offsets, student_valid)
    t_start, _, t_usable = _spans(teacher_offsets, teacher_valid)
    batch, length = s_start.shape
    if teacher_offsets.shape[1] == 0 or length == 0:
        return torch.full((batch, length), -1, dtype=torch.int64, device=s_start.device)
    # Teacher starts in ascending order; the stable sort keeps equal starts in position order, so the
    # leftmost match of a start is its first teacher position.
    t_sorted, t_order = torch.where(t_usable, t_start, _LAST).sort(dim=-1, stable=True)
    s_key = torch.where(s_usable, s_start, _LAST)
    slot = torch.searchsorted(t_sorted, s_key).clamp_max(t_sorted.shape[1] - 1)
    found = s_usable & (t_sorted.gather(-1, slot) == s_key)
    # Only the first student position of a start may pair.
    s_sorted, s_order = s_key.sort(dim=-1, stable=True)
    leads = torch.ones_like(s_usable)
    leads[:, 1:] = s_sorted[:, 1:] != s_sorted[:, :-1]
    first = torch.zeros_like(s_usable).scatter(-1, s_order, leads)
    return torch.where(found & first, t_order.gather(-1, slot), -1)


def offset_pairs(student_offsets: torch.Tensor, student_valid: torch.Tensor, teacher_offsets: torch.Tensor,
                 teacher_valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Aligned (student_rows, teacher_rows) by target-token start character (see :func:`offset_match`).

    Returns two int64 vectors of equal length P: flat row indices into the (B*T) student and (B*T') teacher
    positions, ordered by sequence then student position. Positions without a partner are left out. Selecting
    the pairs synchronises with the host once (the losses use :func:`offset_match`, which does not).
    """
    match = offset_match(student_offsets, student_valid, teacher_offsets, teacher_valid)
    paired = match.reshape(-1) >= 0
    student_rows = paired.nonzero().squeeze(-1)
    sequence = student_rows // max(match.shape[1], 1)
    teacher_rows = sequence * teacher_offsets.shape[1] + match.reshape(-1)[student_rows]
    return student_rows, teacher_rows


def _per_sequence(value, batch: int, device, name: str) -> torch.Tensor:
    """An int, a sequence of B ints or a (B,) tensor (-1 / None: not marked) -> (B, 1) int64."""
    if value is None:
        return torch.full((batch, 1), -1, dtype=torch.int64, device=device)
    if isinstance(value, int) and not isinstance(value, bool):
        return torch.full((batch, 1), value, dtype=torch.int64, device=device)
    if not isinstance(value, torch.Tensor):
        value = torch.tensor([-1 if v is None else v for v in value], dtype=torch.int64)
    if value.dtype.is_floating_point or value.dtype == torch.bool or value.shape != (batch,):
        raise ValueError(f"{name} must be an int, None or {batch} integers (one per sequence), got "
                         f"{value.dtype} of shape {tuple(value.shape)}")
    return value.to(device=device, dtype=torch.int64).unsqueeze(-1)


def response_mask(offsets: torch.Tensor, response_start: Union[int, torch.Tensor, None],
                  response_end: Union[int, torch.Tensor, None] = None,
                  valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, T) bool: the positions whose target token overlaps the response's character span.

    Args:
        offsets: (B, T, 2) target-token spans (student's or teacher's: the rule is the same on both sides).
        response_start: where the response starts in each sequence's text: an int, B ints or a (B,) tensor;
            -1 / None marks no response split: every valid position counts.
        response_end: where it ends (exclusive); -1 / None: at the end of the text.
        valid: optional (B, T) bool, and-ed in (default: every position).

    A position is in the response when its span [s, e) is non-empty and overlaps [response_start,
    response_end): a token " Paris" that starts on the space before a response "Paris" counts. Tokens that cover
    no text (e.g. an EOS the tokenizer appended with span (0, 0)) are never in a marked response.
    """
    if valid is None:
        valid = torch.ones(offsets.shape[:2] if isinstance(offsets, torch.Tensor) and offsets.dim() == 3 else (0,),
                           dtype=torch.bool, device=getattr(offsets, "device", None))
    _check_offsets(offsets, valid, "offsets", "valid")
    batch = offsets.shape[0]
    start, end, usable = _spans(offsets, valid)
    first = _per_sequence(response_start, batch, offsets.device, "response_start")
    last = _per_sequence(response_end, batch, offsets.device, "response_end")
    last = torch.where(last < 0, _LAST, last)
    inside = usable & (start < last) & (end > first)
    return torch.where(first >= 0, inside, valid)
