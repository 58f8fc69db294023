"""What only the compiled backends (``cpp`` on CPU, ``cuda`` on GPU) need checked: ``torch.library.opcheck`` of
every registered op (schema, fake kernels, autograd registration), fp64 gradcheck through the registered
autograd formulas (the CPU kernels compute in fp64 for fp64 logits), and the INFIGW_DISABLE_EXTENSION switch.
Their numerics against the reference are in test_topk_degrees.py and test_sorted_gw1d.py, their argument checks
in test_op_arguments.py.
"""
import os
import subprocess
import sys

import pytest
import torch

import infigw
from infigw import dispatch, extension

from .conftest import op_backends
from .helpers import MODES, sorted_lists

COMPILED = [p for p in op_backends("topk_degrees") if p.values[0].name in ("cpp", "cuda")]
pytestmark = pytest.mark.skipif(not COMPILED, reason=f"C++ extension not usable: {dispatch.backends()['cpp']}")


@pytest.mark.parametrize("backend", COMPILED)
def test_opcheck_every_op(backend):
    device = backend.device
    gen = torch.Generator().manual_seed(23)
    logits = torch.randn(12, 50, generator=gen).to(device).requires_grad_(True)
    row_graph = torch.tensor([0, 0, 0, 1, 1, -1, 1, 2, 2, 2, 2, 0], device=device)
    ops = torch.ops.infigw
    # every values mode, both node kinds and every norm appear (opcheck is slow; the full product adds nothing
    # to the schema/registration checks)
    for values, nodes, norm in [("logits", "vocab", "mean"), ("probs", "rank", "sum"), ("topk_probs", "vocab", "cosine"),
                                ("probs", "vocab", "cosine"), ("topk_probs", "rank", "mean")]:
        torch.library.opcheck(ops.topk_degrees.default, (logits, row_graph, 3, 5, values, 0.7, nodes, norm, False))
    for values in ("logits", "probs", "topk_probs"):
        degrees, _, kept_values, kept_ids, row_lse = ops.topk_degrees(logits.detach(), row_graph, 3, 5, values, 0.7,
                                                                       "vocab", "cosine", False)
        torch.library.opcheck(ops.topk_degrees_backward.default,
                              (torch.randn_like(degrees), logits.detach(), row_graph, kept_values, kept_ids, row_lse,
                               3, values, 0.7, "vocab", "cosine"))
    x = sorted_lists(gen, 6, 40, device=device).requires_grad_(True)
    y = sorted_lists(gen, 6, 40, scale=2, device=device).requires_grad_(True)
    lengths = torch.tensor([40, 0, 1, 2, 7, 37], device=device)
    torch.library.opcheck(ops.sorted_gw1d.default, (x, y, lengths))
    torch.library.opcheck(ops.sorted_gw1d_backward.default,
                          (torch.randn(6, device=device), x.detach(), y.detach(), lengths))


@pytest.mark.parametrize("values,nodes,norm", MODES)
def test_topk_degrees_gradcheck_fp64(values, nodes, norm):
    """The analytic backward (CPU kernels compute in fp64 for fp64 logits) against finite differences."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(7, 19, generator=gen, dtype=torch.float64).requires_grad_(True)
    row_graph = torch.tensor([0, 0, 1, -1, 1, 1, 0])

    def degrees(x):
        return extension.topk_degrees(x, row_graph, 3, 4, values, 0.8, nodes, norm, False).degrees

    assert torch.autograd.gradcheck(degrees, (logits,))


def test_sorted_gw1d_gradcheck_fp64():
    gen = torch.Generator().manual_seed(19)
    x = sorted_lists(gen, 6, 12).double().requires_grad_(True)
    y = sorted_lists(gen, 6, 12, scale=2).double().requires_grad_(True)
    lengths = torch.tensor([12, 0, 1, 2, 7, 9])
    assert torch.autograd.gradcheck(lambda a, b: extension.sorted_gw1d(a, b, lengths), (x, y))


def test_disable_switch_falls_back_to_reference(tmp_path):
    """INFIGW_DISABLE_EXTENSION=1 marks cpp unavailable with the reason, and auto resolves to torch."""
    code = ("from infigw import dispatch; import torch; r = dispatch.backends(); "
            "assert 'INFIGW_DISABLE_EXTENSION' in r['cpp'], r; "
            "assert dispatch.resolve('topk_degrees', 'auto', torch.device('cpu'))[0] == 'torch'")
    root = os.path.dirname(os.path.dirname(os.path.abspath(infigw.__file__)))
    env = dict(os.environ, INFIGW_DISABLE_EXTENSION="1",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path)
