"""Token-level term: ULD (Boizard et al. 2024), the sorted-probability L1 between aligned positions."""
import torch

from ..contract import compute_dtype


def aligned_rows(student_valid: torch.Tensor, teacher_valid: torch.Tensor):
    """Pair the i-th valid student position with the i-th valid teacher position of the same sequence.

    Args:
        student_valid: (B, T) bool; teacher_valid: (B, T') bool.
    Returns:
        (student_flat_rows, teacher_flat_rows, sequence) int64 vectors of equal length P (rows index the
        flattened (B*T) and (B*T') positions), ordered by sequence then pair index.
    """
    student_rank = student_valid.long().cumsum(-1) - 1
    teacher_rank = teacher_valid.long().cumsum(-1) - 1
    pairs = torch.minimum(student_valid.sum(-1), teacher_valid.sum(-1)).unsqueeze(-1)
    student_keep = (student_valid & (student_rank < pairs)).reshape(-1)
    teacher_keep = (teacher_valid & (teacher_rank < pairs)).reshape(-1)
    student_rows = student_keep.nonzero().squeeze(-1)
    teacher_rows = teacher_keep.nonzero().squeeze(-1)
    return student_rows, teacher_rows, student_rows // student_valid.shape[1]


def standardize(logits: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """z-score over the last dimension (population std), in fp32 (fp64 for fp64 input)."""
    logits = logits.to(compute_dtype(logits.dtype))
    mean = logits.mean(-1, keepdim=True)
    std = logits.std(-1, keepdim=True, unbiased=False)
    return (logits - mean) / (std + eps)


def sorted_prob_l1(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sum_i |sort_desc(p)_i - sort_desc(q)_i| per row, the shorter vocabulary zero-padded. (P, Vp), (P, Vq) -> (P,)."""
    width = max(p.shape[-1], q.shape[-1])
    p_sorted = torch.nn.functional.pad(p.sort(-1, descending=True).values, (0, width - p.shape[-1]))
    q_sorted = torch.nn.functional.pad(q.sort(-1, descending=True).values, (0, width - q.shape[-1]))
    return (p_sorted - q_sorted).abs().sum(-1)
