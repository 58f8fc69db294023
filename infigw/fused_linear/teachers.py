"""The teachers of a fused-linear loss: dense logits and records as the logits path takes them, and
:class:`TeacherHead`, a teacher given by its hidden states and head, whose logits are never formed either: it is
summarised once per call, chunk by chunk, into a record of its top logits and logsumexp, and for the
full-vocabulary ULD its paired rows are projected per block of student positions."""
from dataclasses import dataclass
from typing import List, NamedTuple, Optional

import torch

from .. import dispatch, uld
from ..checks import check_k
from ..inputs import CallInputs
from ..teacher import TopKRecord, teacher_name
from .head import Head, chunk_rows, chunks, logit_settings, row_statistics, validated_head


@dataclass(frozen=True)
class TeacherHead:
    """A teacher given by its last hidden states and LM head; its logits are never formed either (no gradient).

    Attributes:
        hidden: (B, T', H_t) the teacher's final hidden states (after its final norm).
        weight: (V_t, H_t) its LM head (a DTensor is gathered once per call); bias: (V_t,) or None.
        logit_scale, logit_softcapping: its logit post-processing (see :func:`logit_settings`).
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None
    logit_scale: float = 1.0
    logit_softcapping: Optional[float] = None

    @classmethod
    def from_model(cls, model, hidden: torch.Tensor) -> "TeacherHead":
        """The head and logit settings of a transformers model, with its final hidden states ``hidden``."""
        head = model.get_output_embeddings()
        return cls(hidden, head.weight, getattr(head, "bias", None), **logit_settings(model))


class FullULD(NamedTuple):
    """The full-vocabulary ULD of each student row against its partner row in every teacher, through the
    dispatched op ``uld_full`` (the logits path's kernels)."""

    teachers: list  # per teacher: a Head (its paired rows projected per block) or (rows, probs) of uld.teacher_rows
    partners: torch.Tensor  # (S, N) flat teacher row paired with each student row, -1 for none
    temperature: float
    backend: str

    def terms(self, logits: torch.Tensor, rows: slice) -> torch.Tensor:
        """(S, c) ULD of the chunk's student logits (c, V) (0 where a row has no partner); differentiable."""
        _, uld_full = dispatch.resolve("uld_full", self.backend, logits.device)
        out = []
        for teacher, partner in zip(self.teachers, self.partners[:, rows]):
            if isinstance(teacher, Head):  # its paired rows, in the order of the student's
                with torch.no_grad():
                    teacher_rows, probs = teacher.logits(partner.clamp_min(0)), False
                partner = torch.where(partner >= 0, torch.arange(partner.shape[0], device=partner.device), -1)
            else:
                teacher_rows, probs = teacher
            out.append(uld_full(logits, teacher_rows, partner, self.temperature, probs))
        return torch.stack(out)

    def gradient(self, logits: torch.Tensor, rows: slice, coefficients: torch.Tensor):
        """The terms (S, c) of the rows ``rows`` and the gradient (c, V) of ``sum(coefficients * terms)``
        (coefficients (S, c)) w.r.t. their logits."""
        with torch.enable_grad():
            leaf = logits.detach().requires_grad_()
            terms = self.terms(leaf, rows)
            return terms.detach(), torch.autograd.grad((coefficients * terms).sum(), leaf)[0]


class Teachers:
    """The call's teachers: dense logits and records as given; a :class:`TeacherHead` becomes a record of its top
    ``keep`` logits and its logsumexp at the loss temperature (what GLD, the top-k ULD and the entropy weights
    read), and stays a head for the full-vocabulary ULD."""

    def __init__(self, given, student: Head, required: int, keep: int, temperature: float, backend: str,
                 chunk_size: Optional[int], gold_slot: bool):
        items = list(given) if isinstance(given, (list, tuple)) and given else [given]
        self.heads: List[Optional[Head]] = []
        self.resolvable = []
        for i, item in enumerate(items):
            if not isinstance(item, (torch.Tensor, TopKRecord, TeacherHead)):
                raise TypeError(f"{teacher_name(i, len(items))} must be a tensor (B, T', V_t), an infigw.TopKRecord "
                                f"or a TeacherHead, or the argument a non-empty list of those, got "
                                f"{type(item).__name__}")
            head = None
            if isinstance(item, TeacherHead):
                name = teacher_name(i, len(items))
                head = validated_head(item.hidden, item.weight, item.bias, item.logit_scale,
                                      item.logit_softcapping, (f"{name}.hidden", f"{name}.weight", f"{name}.bias"),
                                      student.hidden, False)
                check_k(required, head.shape[-1], "k", f"{name} vocabulary")
                # the losses and the entropy weights read the top ``keep`` at most; one more slot holds the gold
                item = head_record(head, min(keep + gold_slot, head.shape[-1]), temperature, backend, chunk_size)
            self.heads.append(head)
            self.resolvable.append(item)
        self.keep_of = [None if head is None else min(keep, head.shape[-1]) for head in self.heads]

    def full_uld(self, inputs: CallInputs, temperature: float, record_tail: str, backend: str) -> FullULD:
        """The full-vocabulary ULD against every teacher: a head teacher as its head, the others as the logits
        path reads them (:func:`infigw.uld.teacher_rows`)."""
        teachers = [uld.teacher_rows(inputs.teachers[i], temperature, record_tail) if head is None else head
                    for i, head in enumerate(self.heads)]
        return FullULD(teachers, inputs.partners.flatten(1), temperature, backend)

    def add_golds(self, inputs: CallInputs) -> None:
        """Put each head teacher's gold token (label-aware weights) in its record's last slot when it is not among
        the top ``keep``: its probability is then exact, as with dense logits."""
        for i, (head, gold, keep) in enumerate(zip(self.heads, inputs.weighting.golds, self.keep_of)):
            record = inputs.teachers[i]
            if head is None or gold is None or record.values.shape[-1] == keep:
                continue
            gold = gold.clamp(0, head.shape[-1] - 1)  # the ids at invalid positions are not checked
            rows, dtype = gold.reshape(-1), head.dtype
            with torch.no_grad():
                raw = (head.hidden.to(dtype) * head.weight[rows].to(dtype)).sum(-1)
                gold_logit = head.transform.apply_(raw if head.bias is None else raw + head.bias[rows])
            replace = ~(record.indices[..., :keep] == gold.unsqueeze(-1)).any(-1) & inputs.teacher_valids[i]
            values, indices = record.values.clone(), record.indices.clone()
            values[..., -1] = torch.where(replace, gold_logit.view(gold.shape).to(values.dtype), values[..., -1])
            indices[..., -1] = torch.where(replace, gold, indices[..., -1])
            inputs.teachers[i] = TopKRecord(values, indices, record.vocab_size, record.logsumexp, record.temperature)
            inputs.weighting.teachers[i] = inputs.teachers[i]


def head_record(head: Head, keep: int, temperature: float, backend: str, chunk_size: Optional[int]) -> TopKRecord:
    """A head teacher's top-``keep`` logits and logsumexp(logits / temperature) at every position, chunk by chunk."""
    batch, length, vocab = head.shape
    total = head.hidden.shape[0]
    every = torch.ones(total, dtype=torch.bool, device=head.hidden.device)
    rows_per_chunk = chunk_rows(chunk_size, total, vocab, head.weight.element_size())[0]
    buffer = torch.empty((min(rows_per_chunk, total), vocab), dtype=head.dtype, device=head.hidden.device)
    kept, ids, lse = [], [], []
    with torch.no_grad():
        for rows in chunks(total, rows_per_chunk):
            logits = head.logits(rows, buffer[:rows.stop - rows.start])
            chunk_kept, chunk_ids, chunk_lse, _ = row_statistics(logits, every[rows], keep, temperature, False,
                                                                 backend)
            kept.append(chunk_kept), ids.append(chunk_ids), lse.append(chunk_lse)
    return TopKRecord(torch.cat(kept).view(batch, length, keep), torch.cat(ids).view(batch, length, keep), vocab,
                      torch.cat(lse).view(batch, length), float(temperature))


