"""Stage 1: top-k selection (tie rule, NaN, rank order) and value transforms, against direct constructions."""
import pytest
import torch

from infigw.reference import rank_order, row_logsumexp, select_topk, transform_values
from infigw.reference.select import log_values

from .helpers import DTYPES, assert_close, tied_logits


def stable_sort_topk(logits, k):
    """The obviously correct construction: a stable descending sort keeps ties in ascending id order."""
    order = torch.sort(logits.float(), dim=-1, descending=True, stable=True).indices[..., :k]
    return logits.gather(-1, order), order


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 3, 7, 40])
def test_topk_matches_stable_sort_under_ties(dtype, k):
    g = torch.Generator().manual_seed(k)
    logits = tied_logits(6, 5, 40, levels=4, generator=g, dtype=dtype)
    values, ids = select_topk(logits, k)
    ref_values, ref_ids = stable_sort_topk(logits, k)
    assert torch.equal(ids, ref_ids), "ids must follow (value desc, id asc)"
    assert torch.equal(values, ref_values)
    assert values.dtype == dtype and ids.dtype == torch.int64


def test_topk_random_rows_odd_shape():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 37, 1271, generator=g)
    values, ids = select_topk(logits, 7)
    ref_values, ref_ids = stable_sort_topk(logits, 7)
    assert torch.equal(ids, ref_ids)
    assert_close(values, ref_values, atol=0, rtol=0, name="values")


def test_nan_ranks_first_and_inf_is_ordered():
    logits = torch.tensor([[0.0, float("nan"), 2.0, float("inf"), float("-inf"), 2.0]])
    values, ids = select_topk(logits, 4)
    assert ids.tolist() == [[1, 3, 2, 5]]
    assert torch.isnan(values[0, 0]) and values[0, 1] == float("inf")
    # fewer finite entries than k: -inf entries are kept, smallest id first
    logits = torch.tensor([[float("-inf"), 1.0, float("-inf"), float("-inf")]])
    assert select_topk(logits, 3)[1].tolist() == [[1, 0, 2]]


def test_rank_order_sorts_value_then_id():
    values = torch.tensor([[1.0, 3.0, 3.0, 2.0]])
    ids = torch.tensor([[9, 7, 2, 4]])
    assert rank_order(values, ids).tolist() == [[2, 7, 4, 9]]


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_transforms_against_direct_formulas(temperature):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 30, generator=g) * 3
    kept, ids = select_topk(logits, 5)
    assert_close(transform_values(kept, "logits"), kept, name="logits")
    full_softmax = torch.softmax(logits / temperature, dim=-1).gather(-1, ids)
    probs = transform_values(kept, "probs", temperature, row_logsumexp(logits, temperature))
    assert_close(probs, full_softmax, atol=1e-6, name="probs")
    assert_close(transform_values(kept, "topk_probs", temperature), torch.softmax(kept / temperature, -1),
                 atol=1e-6, name="topk_probs")


def test_log_values_are_the_logs_of_the_probability_values():
    """log a_p stays finite where a_p underflows: the cosine norm scales by it (docs/math.md §3)."""
    logits = torch.tensor([[0.0, -120.0, -200.0, 5.0]])
    kept, _ = select_topk(logits, 4)
    lse = row_logsumexp(logits, 0.5)
    logs = log_values(kept, "probs", 0.5, lse)
    assert torch.isfinite(logs).all() and transform_values(kept, "probs", 0.5, lse)[0, -1] == 0
    assert_close(logs, kept / 0.5 - lse.unsqueeze(-1), atol=0, rtol=0, name="probs logs")
    assert_close(log_values(kept, "topk_probs", 0.5).exp(), transform_values(kept, "topk_probs", 0.5), atol=0,
                 rtol=0, name="topk_probs")
    assert log_values(kept, "logits") is None


def test_transform_rejects_unknown_mode_and_missing_lse():
    kept = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="values must be one of"):
        transform_values(kept, "softmax")
    with pytest.raises(ValueError, match="row_lse"):
        transform_values(kept, "probs")


def test_half_inputs_compute_in_fp32():
    logits = torch.randn(3, 50).to(torch.bfloat16)
    kept, _ = select_topk(logits, 4)
    assert transform_values(kept, "probs", 1.0, row_logsumexp(logits, 1.0)).dtype == torch.float32
