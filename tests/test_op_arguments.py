"""Every registered op (torch.ops.infigw.* on CPU and CUDA, torch.ops.infigw_triton.*) called directly with
hostile arguments: a clear ValueError/TypeError naming the argument, never a crash (issue 14, defect 5:
``topk_degrees_backward`` with kept_ids = 10**9 segfaulted, -1000 wrote out of bounds). The index data is
scanned on CPU always and on CUDA with check_data=True (the schema default); with check_data=False the CUDA
and Triton kernels skip out-of-range indices (compute-sanitizer checks that on a GPU, benchmarks/gpu_check.sh).
"""
import pytest
import torch

from .conftest import op_backends


class Ops:
    """The registered ops of one backend, with the backward's schema differences hidden."""

    def __init__(self, backend):
        self.backend, self.device = backend.name, backend.device
        self.ns = torch.ops.infigw_triton if backend.name == "triton" else torch.ops.infigw

    def topk_degrees(self, logits, row_graph, num_graphs=2, k=3, values="probs", temperature=1.0, nodes="vocab",
                     graph_norm="mean", **kw):
        return self.ns.topk_degrees(logits, row_graph, num_graphs, k, values, temperature, nodes, graph_norm, False,
                                    **kw)

    def backward(self, grad_degrees, logits, row_graph, kept_values, kept_ids, row_lse, num_graphs=2,
                 values="probs", graph_norm="mean", **kw):
        if self.backend == "triton":
            return self.ns.topk_degrees_backward(grad_degrees, logits, row_graph, kept_values, kept_ids, row_lse,
                                                 logits.shape[1], logits.dtype, num_graphs, values, 1.0, "vocab",
                                                 graph_norm, False, **kw)
        return self.ns.topk_degrees_backward(grad_degrees, logits, row_graph, kept_values, kept_ids, row_lse,
                                             num_graphs, values, 1.0, "vocab", graph_norm, **kw)


@pytest.fixture
def inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(4, 10, generator=gen), torch.tensor([0, 0, 1, -1])


def _forward_cases(logits, rows):
    return [
        (dict(row_graph=torch.tensor([0, 0, 2, -1])), ValueError, "row_graph entries must lie in"),
        (dict(row_graph=torch.tensor([0, -2, 1, -1])), ValueError, "row_graph entries must lie in"),
        (dict(row_graph=rows[:3]), ValueError, "row_graph must have shape"),
        (dict(row_graph=rows.int()), TypeError, "row_graph must be"),
        (dict(logits=logits.long()), TypeError, "logits must be"),
        (dict(logits=logits.unsqueeze(0)), ValueError, "logits must"),
        (dict(values="softmax"), ValueError, "values must be one of"),
        (dict(nodes="token"), ValueError, "nodes must be one of"),
        (dict(graph_norm="norm"), ValueError, "graph_norm must be one of"),
        (dict(k=0), ValueError, "k must lie in"),
        (dict(k=11), ValueError, "k must lie in"),
        (dict(num_graphs=-1), ValueError, "num_graphs must be"),
        (dict(temperature=0.0), ValueError, "temperature must be"),
        (dict(temperature=float("nan")), ValueError, "temperature must be"),
    ]


@pytest.mark.parametrize("case", range(14))
@pytest.mark.parametrize("backend", op_backends("topk_degrees"))
def test_topk_degrees_rejects(backend, inputs, case):
    logits, rows = inputs
    change, error, message = _forward_cases(logits, rows)[case]
    args = dict(logits=logits, row_graph=rows)
    args.update(change)
    args = {name: value.to(backend.device) if isinstance(value, torch.Tensor) else value
            for name, value in args.items()}
    with pytest.raises(error, match=message):
        Ops(backend).topk_degrees(**args)


def _backward_inputs(ops, logits, rows, values="probs"):
    _, _, kept_values, kept_ids, row_lse = ops.topk_degrees(logits, rows, values=values)
    return dict(grad_degrees=torch.ones(2, logits.shape[1], device=logits.device), logits=logits, row_graph=rows,
                kept_values=kept_values, kept_ids=kept_ids, row_lse=row_lse)


@pytest.mark.parametrize("bad_id", [10**9, -1000, 10])
@pytest.mark.parametrize("backend", op_backends("topk_degrees"))
def test_backward_rejects_kept_ids_out_of_range(backend, inputs, bad_id):
    """The issue's repro: kept_ids = 10**9 segfaulted and -1000 wrote out of bounds."""
    ops = Ops(backend)
    args = _backward_inputs(ops, *(t.to(backend.device) for t in inputs))
    args["kept_ids"] = args["kept_ids"].clone()
    args["kept_ids"][1, 2] = bad_id
    with pytest.raises(ValueError, match="kept_ids entries must lie in"):
        ops.backward(**args)


@pytest.mark.parametrize("backend", op_backends("topk_degrees"))
def test_backward_rejects_bad_shapes_and_dtypes(backend, inputs):
    ops = Ops(backend)
    args = _backward_inputs(ops, *(t.to(backend.device) for t in inputs))
    cases = [
        (dict(kept_ids=args["kept_ids"][:, :2]), ValueError, "kept_(ids|values)"),
        (dict(kept_ids=args["kept_ids"].int()), TypeError, "kept_ids"),
        (dict(kept_values=args["kept_values"][:3]), ValueError, "kept_values"),
        (dict(kept_values=args["kept_values"].double()), TypeError, "kept_values"),
        (dict(grad_degrees=args["grad_degrees"][:, :4]), ValueError, "grad_degrees"),
        (dict(row_lse=args["row_lse"][:2]), ValueError, "row_lse"),
        (dict(row_graph=torch.tensor([0, 0, 5, -1], device=backend.device)), ValueError, "row_graph entries"),
        (dict(graph_norm="l2"), ValueError, "graph_norm must be one of"),
    ]
    for change, error, message in cases:
        with pytest.raises(error, match=message):
            ops.backward(**dict(args, **change))


@pytest.mark.parametrize("backend", op_backends("sorted_gw1d"))
def test_sorted_gw1d_rejects(backend):
    ns = torch.ops.infigw_triton if backend.name == "triton" else torch.ops.infigw
    x = torch.randn(2, 3, device=backend.device)
    lengths = torch.tensor([3, 1], device=backend.device)
    cases = [
        ((x, x, torch.tensor([4, 1], device=backend.device)), ValueError, "lengths entries must lie in"),
        ((x, x, torch.tensor([-1, 1], device=backend.device)), ValueError, "lengths entries must lie in"),
        ((x, x, lengths.int()), TypeError, "lengths must be"),
        ((x, x, lengths[:1]), ValueError, "lengths must have shape"),
        ((x, x[:, :2], lengths), ValueError, "y must"),
        ((x, x.long(), lengths), TypeError, "y must be"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            ns.sorted_gw1d(*args)
        with pytest.raises(error, match=message):
            ns.sorted_gw1d_backward(torch.ones(2, device=backend.device), *args)
    with pytest.raises(ValueError, match="grad must"):
        ns.sorted_gw1d_backward(torch.ones(3, device=backend.device), x, x, lengths)


@pytest.mark.parametrize("backend", [p for p in op_backends("topk_degrees") if p.values[0].name == "cpp"])
def test_cpu_scans_indices_even_without_check_data(backend, inputs):
    """The CPU kernels index with these values, so they always scan them (no host sync to save there)."""
    ops = Ops(backend)
    args = _backward_inputs(ops, *inputs)
    args["kept_ids"] = args["kept_ids"].clone()
    args["kept_ids"][0, 0] = 10**9
    with pytest.raises(ValueError, match="kept_ids entries must lie in"):
        ops.backward(**args, check_data=False)
    with pytest.raises(ValueError, match="lengths entries must lie in"):
        torch.ops.infigw.sorted_gw1d(inputs[0], inputs[0], torch.tensor([11, 0, 0, 0]), False)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [p for p in op_backends("topk_degrees") if p.values[0].device == "cuda"])
def test_cuda_skips_bad_indices_without_check_data(backend):
    """check_data=False (infigw's own calls): no host sync, and an out-of-range index is skipped, never followed;
    the valid rows are unaffected. compute-sanitizer runs this under memcheck (benchmarks/gpu_check.sh)."""
    ops = Ops(backend)
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 50, generator=gen).cuda()
    rows = torch.tensor([0, 1, 0, 1, 0, 1], device="cuda")
    args = _backward_inputs(ops, logits, rows)
    good = ops.backward(**args, check_data=False)
    args["kept_ids"] = args["kept_ids"].clone()
    args["kept_ids"][0] = torch.tensor([10**9, -1000, 7], device="cuda")
    bad = ops.backward(**args, check_data=False)
    assert torch.equal(bad[1:], good[1:]) and torch.isfinite(bad).all()
    wild = torch.tensor([0, 5, -3, 10**6, 1, 0], device="cuda")
    ops.topk_degrees(logits, wild, check_data=False)
    torch.ops.infigw.sorted_gw1d(logits[:2], logits[:2], torch.tensor([10**6, -5], device="cuda"), False)
    torch.cuda.synchronize()
