"""Bad input gets a clear error naming the argument and what was expected."""
import pytest
import torch

import infigw
import infigw.functional as F


def student(*shape):
    return torch.randn(*(shape or (2, 5, 20)))


CASES = [
    ("student rank", lambda: F.gld_loss(torch.randn(5, 20), student()), ValueError, "student_logits must have 3 dimensions"),
    ("student dtype", lambda: F.gld_loss(torch.ones(2, 5, 20, dtype=torch.long), student()), TypeError, "student_logits must be float32"),
    ("student type", lambda: F.gld_loss([[1.0]], student()), TypeError, "student_logits must be a torch.Tensor"),
    ("empty", lambda: F.gld_loss(torch.randn(2, 0, 20), student()), ValueError, "must not be empty"),
    ("batch mismatch", lambda: F.gld_loss(student(), student(3, 5, 20)), ValueError, "batch size 3 but the student logits have 2"),
    ("k too large", lambda: F.gld_loss(student(), student(), k=21), ValueError, r"k must be in \[1, 20\]"),
    ("k too large for teacher", lambda: F.gld_loss(student(2, 5, 40), student(2, 5, 8), k=10), ValueError, "teacher_logits vocabulary"),
    ("k zero", lambda: F.gld_loss(student(), student(), k=0), ValueError, "k must be in"),
    ("k float", lambda: F.gld_loss(student(), student(), k=2.5), TypeError, "k must be an int"),
    ("values", lambda: F.gld_loss(student(), student(), values="softmax"), ValueError, "values must be one of"),
    ("nodes", lambda: F.gld_loss(student(), student(), nodes="token"), ValueError, "nodes must be one of"),
    ("graph_norm", lambda: F.gld_loss(student(), student(), graph_norm="max"), ValueError, "graph_norm must be one of"),
    ("scope", lambda: F.gld_loss(student(), student(), scope="token"), ValueError, "scope must be one of"),
    ("distance", lambda: F.gld_loss(student(), student(), distance="gw"), ValueError, "distance must be one of"),
    ("reduction", lambda: F.gld_loss(student(), student(), reduction="batchmean"), ValueError, "reduction must be one of"),
    ("temperature", lambda: F.gld_loss(student(), student(), temperature=0.0), ValueError, "temperature must be a finite number > 0"),
    ("num_nodes", lambda: F.gld_loss(student(), student(), num_nodes=0), ValueError, "num_nodes must be None or an int >= 1"),
    ("labels shape", lambda: F.gld_loss(student(), student(), torch.zeros(2, 4, dtype=torch.long)), ValueError, r"labels must have shape \(2, 5\)"),
    ("labels dtype", lambda: F.gld_loss(student(), student(), torch.zeros(2, 5)), TypeError, "labels must be an integer tensor"),
    ("labels and mask", lambda: F.gld_loss(student(), student(), torch.zeros(2, 5, dtype=torch.long), mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, "either"),
    ("teacher mask shape", lambda: F.gld_loss(student(), student(2, 7, 20), teacher_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, r"teacher_mask must have shape \(2, 7\)"),
    ("teacher type", lambda: F.gld_loss(student(), "teacher"), TypeError, "teacher_logits must be a tensor"),
    ("teacher list entry", lambda: F.gld_loss(student(), [student(), 3]), TypeError, r"teacher_logits\[1\]"),
    ("teacher masks count", lambda: F.gld_loss(student(), [student(), student()], teacher_mask=[None]), ValueError, "one entry per teacher"),
    ("teacher weights count", lambda: F.gld_loss(student(), [student(), student()], teacher_weights=[1.0]), ValueError, "one number per teacher"),
    ("teacher weights name", lambda: F.gld_loss(student(), student(), teacher_weights="entropy"), ValueError, "teacher_weights must be None"),
    ("record out of vocab", lambda: F.gld_loss(student(), infigw.TopKRecord(torch.randn(2, 5, 12), torch.full((2, 5, 12), 20), 20)), ValueError, r"indices must lie in \[0, 20\)"),
    ("record negative id", lambda: F.gld_loss(student(), infigw.TopKRecord(torch.randn(2, 5, 12), torch.full((2, 5, 12), -1), 20)), ValueError, "indices must lie in"),
    ("record too few", lambda: F.gld_loss(student(), infigw.TopKRecord(torch.randn(2, 5, 4), torch.zeros(2, 5, 4, dtype=torch.long), 20), k=10), ValueError, "fewer than k = 10"),
    ("record shapes", lambda: F.gld_loss(student(), infigw.TopKRecord(torch.randn(2, 5, 12), torch.zeros(2, 5, 11, dtype=torch.long), 20)), ValueError, "must share one non-empty shape"),
    ("record index dtype", lambda: F.gld_loss(student(), infigw.TopKRecord(torch.randn(2, 5, 12), torch.zeros(2, 5, 12), 20)), TypeError, "indices must be an integer tensor"),
    ("record lse shape", lambda: F.gld_loss(student(), infigw.TopKRecord(torch.randn(2, 5, 12), torch.zeros(2, 5, 12, dtype=torch.long), 20, torch.zeros(2, 4))), ValueError, "logsumexp must be a tensor of shape"),
    ("uld top_k", lambda: F.uld_loss(student(), student(), top_k=21), ValueError, "top_k must be in"),
    ("uld standardize without top_k", lambda: F.uld_loss(student(), student(), standardize=True), ValueError, "standardize=True needs top_k"),
    ("infigfusion labels", lambda: F.infigfusion_loss(student(), student(), None), ValueError, "labels"),
    ("infigfusion lam", lambda: F.infigfusion_loss(student(), student(), torch.zeros(2, 5, dtype=torch.long), lam=1.5), ValueError, r"lam must be in \[0, 1\]"),
    ("gw1d shapes", lambda: F.sorted_gw1d(torch.randn(3, 4), torch.randn(3, 5)), ValueError, "x and y must have the same shape"),
    ("gw1d empty", lambda: F.sorted_gw1d(torch.randn(3, 0), torch.randn(3, 0)), ValueError, "n >= 1"),
    ("gw1d lengths", lambda: F.sorted_gw1d(torch.randn(3, 4), torch.randn(3, 4), torch.tensor([1.0, 2.0, 3.0])), TypeError, "lengths must be an integer tensor"),
    ("weight_k", lambda: F.uld_loss(student(), student(), weight_k=0), ValueError, "weight_k must be an int >= 1"),
    ("ignore_index", lambda: F.gld_loss(student(), student(), torch.zeros(2, 5, dtype=torch.long), ignore_index=None), TypeError, "ignore_index must be an int"),
    ("teacher_labels type", lambda: F.gld_loss(student(), student(), teacher_labels=5), TypeError, "teacher_labels must be None, a tensor or a list"),
    ("gamma", lambda: F.infigfusion_loss(student(), student(), torch.zeros(2, 5, dtype=torch.long), gamma=float("inf")), ValueError, "gamma must be a finite number"),
    ("labels out of vocab", lambda: F.infigfusion_loss(student(), student(), torch.full((2, 5), 20)), ValueError, r"labels must be in \[0, 20\)"),
    ("record lse dtype", lambda: F.gld_loss(student(), infigw.TopKRecord(torch.randn(2, 5, 12), torch.zeros(2, 5, 12, dtype=torch.long), 20, torch.zeros(2, 5, dtype=torch.long))), TypeError, "logsumexp must be a floating tensor"),
    ("record of lists", lambda: infigw.TopKRecord([[1.0]], [[1]], 5), TypeError, "TopKRecord.values and TopKRecord.indices must be tensors"),
    ("from_logits k", lambda: infigw.TopKRecord.from_logits(student(), 21), ValueError, r"k must be in \[1, 20\]"),
    ("sorted_degrees rank", lambda: F.sorted_degrees(torch.randn(5), torch.ones(5, dtype=torch.bool)), ValueError, "degrees must have 2 dimensions"),
    ("sorted_degrees touched", lambda: F.sorted_degrees(torch.randn(2, 5), torch.ones(2, 5)), ValueError, "touched must be a bool tensor"),
    ("graph layout", lambda: F.coactivation_graph(student(), layout="csr"), ValueError, "layout must be one of"),
    ("backend name", lambda: F.gld_loss(student(), student(), backend="numpy"), ValueError, "backend must be 'auto' or one of"),
    ("backend on wrong device", lambda: F.gld_loss(student(), student(), backend="cuda"), infigw.BackendUnavailableError, "backend 'cuda' cannot run"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_a_clear_error(case):
    _, call, error, message = case
    with pytest.raises(error, match=message):
        call()


def test_record_index_check_can_be_disabled(monkeypatch):
    """INFIGW_DATA_CHECKS=0 skips the one data-dependent (host-syncing) check."""
    monkeypatch.setenv("INFIGW_DATA_CHECKS", "0")
    record = infigw.TopKRecord(torch.randn(2, 5, 12), torch.randint(0, 20, (2, 5, 12)), 20)
    assert torch.isfinite(F.gld_loss(student(), record))
