"""Stage 2: per-graph degrees, never forming the graph, against the explicit graph and a direct loop."""
import itertools

import pytest
import torch

from infigw.reference import coactivation_graph, degrees_from_kept, dense_graphs, node_ids, topk_degrees

from .helpers import NODE_MODES, NORM_MODES, VALUE_MODES, assert_close, random_mask, rows_of


def loop_graph(kept_values, kept_ids, row_graph, num_graphs, num_nodes, nodes, norm):
    """Dense (G, M, M) graphs by an explicit loop over rows and slot pairs (the definition)."""
    graphs = torch.zeros(num_graphs, num_nodes, num_nodes, dtype=torch.float64)
    rows = torch.zeros(num_graphs, dtype=torch.float64)
    slots = node_ids(kept_ids, nodes)
    for p in range(kept_values.shape[0]):
        g = int(row_graph[p])
        if g < 0:
            continue
        rows[g] += 1
        for r, s in itertools.product(range(kept_values.shape[1]), repeat=2):
            graphs[g, slots[p, r], slots[p, s]] += float(kept_values[p, r]) * float(kept_values[p, s])
    if norm == "mean":
        graphs /= rows.clamp_min(1).view(-1, 1, 1)
    elif norm == "cosine":
        diag = torch.diagonal(graphs, dim1=1, dim2=2)
        inv = torch.where(diag > 0, diag.clamp_min(1e-300).rsqrt(), torch.zeros_like(diag))
        graphs = graphs * inv.unsqueeze(-1) * inv.unsqueeze(-2)
    return graphs


@pytest.mark.parametrize("values", VALUE_MODES)
@pytest.mark.parametrize("nodes", NODE_MODES)
@pytest.mark.parametrize("norm", NORM_MODES)
def test_degrees_are_row_sums_of_the_explicit_graph(values, nodes, norm):
    g = torch.Generator().manual_seed(hash((values, nodes, norm)) % 1000)
    batch, length, vocab, k = 3, 6, 23, 4
    logits = torch.randn(batch * length, vocab, generator=g) * 2
    mask = random_mask(batch, length, generator=g, empty_rows=(2,))
    row_graph = rows_of(mask)
    result = topk_degrees(logits, row_graph, batch, k, values, 0.7, nodes, norm)
    num_nodes = vocab if nodes == "vocab" else k
    graphs = loop_graph(result.kept_values, result.kept_ids, row_graph, batch, num_nodes, nodes, norm)
    assert_close(result.degrees, graphs.sum(-1), atol=1e-4, rtol=1e-5, name="degrees")
    # random values are never exactly 0, so the touched nodes are those with a non-zero diagonal entry
    assert torch.equal(result.touched, torch.diagonal(graphs, dim1=1, dim2=2) != 0), "touched nodes"
    assert not result.touched[2].any(), "a graph without valid rows touches no node"
    assert (result.kept_values[row_graph < 0] == 0).all(), "masked rows keep no values"
    # the sparse graph op agrees with the loop, entry for entry
    indices, entries = coactivation_graph(result.kept_values, result.kept_ids, row_graph, batch, nodes, norm)
    dense = torch.zeros(batch, num_nodes, num_nodes, dtype=torch.float64)
    dense[indices[0], indices[1], indices[2]] = entries.double()
    assert_close(dense, graphs, atol=1e-5, rtol=1e-5, name="coactivation graph")
    assert torch.equal(indices, torch.unique(indices, dim=1)), "COO indices are coalesced and sorted"


def test_touched_nodes_exactly_the_kept_ids():
    logits = torch.tensor([[5.0, 0.0, 4.0, 0.0], [0.0, 0.0, 9.0, 8.0]])
    result = topk_degrees(logits, torch.tensor([0, 0]), 1, 2)
    assert result.touched.tolist() == [[True, False, True, True]]
    # node 0: 5 * (5 + 4); node 2: 4 * 9 + 9 * 17; node 3: 8 * 17; mean over 2 rows
    assert_close(result.degrees, torch.tensor([[22.5, 0.0, 94.5, 68.0]]), name="degrees")


def test_batch_scope_pools_rows_and_rank_nodes_have_k_nodes():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 12, generator=g)
    per_row = topk_degrees(logits, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), 2, 3, nodes="rank", norm="sum")
    pooled = topk_degrees(logits, torch.zeros(8, dtype=torch.long), 1, 3, nodes="rank", norm="sum")
    assert per_row.degrees.shape == (2, 3) and pooled.degrees.shape == (1, 3)
    assert_close(pooled.degrees[0], per_row.degrees.sum(0), name="sum-norm degrees add over graphs")


def test_dense_graphs_over_touched_ids():
    logits = torch.tensor([[3.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    result = topk_degrees(logits, torch.tensor([0, 1]), 2, 2, norm="sum")
    indices, entries = coactivation_graph(result.kept_values, result.kept_ids, torch.tensor([0, 1]), 2, "vocab", "sum")
    (ids0, m0), (ids1, m1) = dense_graphs(indices, entries, 2)
    assert ids0.tolist() == [0, 2] and m0.tolist() == [[9.0, 3.0], [3.0, 1.0]]
    assert ids1.tolist() == [1, 2] and m1.tolist() == [[4.0, 10.0], [10.0, 25.0]]


@pytest.mark.parametrize("norm", NORM_MODES)
def test_degrees_gradcheck(norm):
    g = torch.Generator().manual_seed(4)
    kept = (torch.rand(5, 3, generator=g, dtype=torch.float64) + 0.2).requires_grad_()
    ids = torch.tensor([[0, 1, 2], [2, 3, 0], [1, 2, 4], [4, 0, 3], [3, 1, 2]])
    row_graph = torch.tensor([0, 0, 1, -1, 1])
    torch.autograd.gradcheck(
        lambda v: degrees_from_kept(v, ids, row_graph, 2, 5, "vocab", norm)[0], (kept,))


def test_cosine_degrees_do_not_depend_on_a_scale_per_node():
    """The cosine norm divides each node by its own diagonal, so scaling every value of a node by c_n changes
    nothing, even where D = sum a^2 would underflow (c_n = 1e-30) or overflow (1e30) fp32; probability values pass
    log a, which stays exact where a itself underflows (1e-60)."""
    g = torch.Generator().manual_seed(6)
    kept = torch.rand(8, 3, generator=g, dtype=torch.float64) + 0.5
    ids = torch.tensor([[0, 1, 2], [2, 3, 0], [1, 2, 4], [4, 0, 3], [3, 1, 2], [0, 4, 1], [2, 0, 3], [1, 3, 4]])
    row_graph = torch.tensor([0, 0, 1, -1, 1, 1, 0, 1])
    base, touched = degrees_from_kept(kept, ids, row_graph, 2, 5, "vocab", "cosine")
    node_scale = torch.tensor([1e-30, 1e30, 1.0, 1e-20, 1e25], dtype=torch.float64)
    scaled = (kept * node_scale[ids]).float()
    degrees, scaled_touched = degrees_from_kept(scaled, ids, row_graph, 2, 5, "vocab", "cosine")
    assert torch.equal(touched, scaled_touched)
    assert_close(degrees, base, atol=1e-6, rtol=1e-5, name="cosine degrees, scaled nodes")
    logs = (kept.log() + torch.tensor([-138.0, 0.0, -5.0, -40.0, 0.0], dtype=torch.float64)[ids]).float()
    base, _ = degrees_from_kept(kept, ids, row_graph, 2, 5, "vocab", "cosine")
    degrees, _ = degrees_from_kept(logs.exp(), ids, row_graph, 2, 5, "vocab", "cosine", logs=logs)
    assert_close(degrees, base, atol=1e-5, rtol=1e-5, name="cosine degrees from log values")


def test_degrees_of_huge_values_overflow_to_inf_never_nan():
    """Terms a_p[i] s_p of finite float32 values beyond ~1e19 exceed float32, and +inf and -inf terms can meet in
    one degree: the sums are fp64, so a degree is at most +-inf in float32, never inf - inf."""
    big = 3e38
    values = torch.tensor([[big, big], [-big, big], [big, -big / 2]])
    kept = values.clone().requires_grad_(True)
    ids = torch.tensor([[0, 1], [0, 1], [0, 2]])
    degrees, _ = degrees_from_kept(kept, ids, torch.tensor([0, 0, 0]), 1, 3, "vocab", "sum")
    expected = torch.zeros(3, dtype=torch.float64)
    for p in range(3):
        for r in range(2):
            expected[ids[p, r]] += float(values[p, r]) * float(values[p].double().sum())
    assert not degrees.isnan().any()
    assert torch.equal(degrees.detach(), expected.float().view(1, 3))
    (grad,) = torch.autograd.grad(degrees.sum(), kept)
    assert not grad.isnan().any()
