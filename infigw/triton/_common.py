"""What the Triton kernels of infigw share: the option codes as kernel constexprs, the interpreter switch, and
the argument checks of the ``infigw_triton`` ops (they mirror ``csrc/op_checks.h``: every error names the
argument; the index data is scanned, a host sync on CUDA, only when an op is called with ``check_data=True``).
"""
import torch
import triton
import triton.language as tl

from ..contract import NODES, NORMS, VALUES

#: values= codes (infigw.contract, csrc/contract.h) as constexprs the kernels compare ``VALUES_MODE`` with
#: ("topk_probs" is the remaining case).
LOGITS = tl.constexpr(VALUES["logits"])
PROBS = tl.constexpr(VALUES["probs"])


@triton.jit
def _probe():
    pass


#: True when TRITON_INTERPRET=1 was set when the kernels were defined: they then run in Python, on CPU tensors.
INTERPRETED = not isinstance(_probe, triton.runtime.JITFunction)


def check_device(tensor: torch.Tensor, name: str) -> None:
    """The kernels take CUDA tensors, or CPU tensors when Triton interprets them (TRITON_INTERPRET=1 at import)."""
    if tensor.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"{name} must be a CUDA tensor for the triton backend (CPU tensors only under "
                         f"TRITON_INTERPRET=1), got a {tensor.device.type} tensor")


def padded(k: int) -> int:
    """The power-of-two block that holds k slots."""
    return triton.next_power_of_2(k)


def option_code(name: str, argument: str) -> int:
    """The code of an option name (``values``, ``nodes`` or ``graph_norm``); ValueError naming the argument."""
    table = {"values": VALUES, "nodes": NODES, "graph_norm": NORMS}[argument]
    if name not in table:
        raise ValueError(f"{argument} must be one of {tuple(table)}, got {name!r}")
    return table[name]


def check_tensor(tensor, name: str, dtype: torch.dtype, shape, device) -> None:
    """A tensor of ``dtype`` and ``shape`` on ``device``."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {tensor.dtype}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{name} must be on {device}, got {tensor.device}")


def check_index_range(tensor: torch.Tensor, name: str, low: int, high: int) -> None:
    """Every entry of an integer tensor lies in [low, high) (one read-back: a host sync on CUDA)."""
    if tensor.numel() == 0:
        return
    smallest, largest = (int(v) for v in torch.stack(torch.aminmax(tensor)).tolist())
    if smallest < low or largest >= high:
        raise ValueError(f"{name} entries must lie in [{low}, {high}), got values in [{smallest}, {largest}]")
