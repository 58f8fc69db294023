"""Gromov-Wasserstein (GW) ground truth for validating GLD's closed forms (tests and benchmarks only).

Conventions (section 8 of the contract): graphs are symmetric (n, n) matrices with uniform node weights 1/n;
for a coupling π (n, m) with marginals 1/n, 1/m,

    cost(π) = Σ_{i,j,k,l} ℓ(C_ik, D_jl) π_ij π_kl,    ℓ = (a - b)²  (loss="square", GW₂)  or  |a - b|  (loss="abs", GW₁)

and GW is the minimum over couplings. Every solver returns a :class:`GWResult` whose ``value`` is the cost of
its ``coupling`` evaluated here in float64 (not the solver's own objective), so values are comparable.

- :func:`pot_gw`: POT's conditional-gradient solver (square loss; a local optimum).
- :func:`pot_entropic_gw`, :func:`torch_entropic_gw`: entropic GW (projected gradient with Sinkhorn
  projections, as POT's ``entropic_gromov_wasserstein``); the torch one runs on CUDA tensors as well.
- :func:`brute_force_gw`: minimum over permutation couplings, n <= 8. For positive semi-definite C and D
  (co-activation graphs are Gram matrices) and for squared-distance matrices of points on a line, the
  square-loss objective is concave on the couplings, so this minimum is the exact GW₂.
- :func:`degree_lower_bound`: the contract's bound GW₁(C, D) >= (1/n²) Σ_i |f↑(i) − g↑(i)| (f, g row sums),
  valid for the cost of *every* coupling, not only the optimal one.

POT is imported lazily: this module imports without it.
"""
import itertools
import math
from typing import NamedTuple, Optional, Tuple, Union

import torch

__all__ = [
    "GWResult",
    "BRUTE_FORCE_MAX_NODES",
    "as_graph",
    "pad_to_common_size",
    "degree_lower_bound",
    "sorted_degree_coupling",
    "line_distance_matrix",
    "gw_cost",
    "pot_gw",
    "pot_entropic_gw",
    "torch_entropic_gw",
    "brute_force_gw",
]

#: Largest n for :func:`brute_force_gw` (8! = 40320 permutations).
BRUTE_FORCE_MAX_NODES = 8
_LOSSES = ("square", "abs")
# Bytes of float64 work space per chunk of the abs-loss cost.
_ABS_CHUNK_BYTES = 1 << 27


class GWResult(NamedTuple):
    """value: the GW cost of ``coupling`` (float64 arithmetic); coupling: (n, m) float64 tensor."""

    value: float
    coupling: torch.Tensor


def _require_pot():
    try:
        import ot
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("this function needs POT (Python Optimal Transport): pip install pot") from error
    return ot


def as_graph(matrix, name: str = "C") -> torch.Tensor:
    """A square, finite, real matrix as a float64 tensor (device kept); clear errors otherwise."""
    if not isinstance(matrix, torch.Tensor):
        try:
            matrix = torch.as_tensor(matrix)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"{name} must be a tensor or array, got {type(matrix).__name__}") from error
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty square matrix (n, n), got shape {tuple(matrix.shape)}")
    if matrix.is_complex() or matrix.dtype == torch.bool:
        raise TypeError(f"{name} must be real-valued, got dtype {matrix.dtype}")
    matrix = matrix.to(torch.float64)
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError(f"{name} must be finite (no NaN/inf)")
    return matrix


def _check_loss(loss: str) -> None:
    if loss not in _LOSSES:
        raise ValueError(f"loss must be one of {_LOSSES}, got {loss!r}")


def _check_coupling(coupling, n: int, m: int, device) -> torch.Tensor:
    if not isinstance(coupling, torch.Tensor):
        coupling = torch.as_tensor(coupling)
    if coupling.shape != (n, m):
        raise ValueError(f"coupling must have shape ({n}, {m}), got {tuple(coupling.shape)}")
    coupling = coupling.to(device=device, dtype=torch.float64)
    if not bool(torch.isfinite(coupling).all()):
        raise ValueError("coupling must be finite (no NaN/inf)")
    return coupling


def pad_to_common_size(C, D) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pad the smaller graph with isolated nodes (zero rows and columns) to the larger size.

    This is the graph-side view of the contract's zero padding of the shorter degree list.
    Returns float64 tensors; a graph already of the common size is returned unpadded.
    """
    C, D = as_graph(C, "C"), as_graph(D, "D")
    size = max(C.shape[0], D.shape[0])

    def pad(matrix):
        extra = size - matrix.shape[0]
        return torch.nn.functional.pad(matrix, (0, extra, 0, extra)) if extra else matrix

    return pad(C), pad(D)


def _equal_sizes(C, D) -> Tuple[torch.Tensor, torch.Tensor]:
    C, D = as_graph(C, "C"), as_graph(D, "D")
    if C.shape != D.shape:
        raise ValueError(f"C and D must have the same number of nodes (use pad_to_common_size), "
                         f"got {C.shape[0]} and {D.shape[0]}")
    return C, D


def degree_lower_bound(C, D) -> float:
    """The contract's lower bound (1/n²)·Σ_i |f↑(i) − g↑(i)| of the abs-loss cost of any coupling.

    f, g are the row sums (weighted degrees) of C and D, which must have the same size n (pad first).
    Proof: for every coupling π, Σ_kl |C_ik − D_jl| π_kl >= |f(i) − g(j)|/n (triangle inequality), and
    Σ_ij π_ij |f(i) − g(j)|/n is at least 1/n times the 1-D W₁ between the degree distributions.
    """
    C, D = _equal_sizes(C, D)
    n = C.shape[0]
    f = torch.sort(C.sum(dim=1)).values
    g = torch.sort(D.sum(dim=1)).values
    return float((f - g).abs().sum()) / (n * n)


def sorted_degree_coupling(C, D) -> torch.Tensor:
    """The permutation coupling (P/n) that pairs the i-th largest degree of C with the i-th largest of D.

    A feasible coupling (equal sizes) whose cost is the contract's O(n²) upper-bound diagnostic.
    """
    C, D = _equal_sizes(C, D)
    n = C.shape[0]
    order_c = torch.argsort(C.sum(dim=1), descending=True, stable=True)
    order_d = torch.argsort(D.sum(dim=1), descending=True, stable=True)
    coupling = torch.zeros(n, n, dtype=torch.float64, device=C.device)
    coupling[order_c, order_d] = 1.0 / n
    return coupling


def line_distance_matrix(points) -> torch.Tensor:
    """Squared-distance matrix (x_i − x_k)² of 1-D points (n,): GW between two such matrices is 1-D GW."""
    points = torch.as_tensor(points).to(torch.float64)
    if points.dim() != 1 or points.numel() == 0:
        raise ValueError(f"points must be a non-empty 1-D tensor, got shape {tuple(points.shape)}")
    return (points[:, None] - points[None, :]) ** 2


def gw_cost(C, D, coupling, loss: str = "square") -> float:
    """Σ_{i,j,k,l} ℓ(C_ik, D_jl) π_ij π_kl for a given coupling π (n, m), in float64.

    The square loss uses the O(n²m + nm²) expansion of Peyré et al. (2016); the abs loss has none and sums
    over pairs of nonzero entries of π (O(n²) for a permutation, O(n²m²) for a dense coupling). Any
    nonnegative π is accepted: the marginals are not checked, so the cost of an approximate (entropic)
    coupling is what it is.
    """
    _check_loss(loss)
    C, D = as_graph(C, "C"), as_graph(D, "D")
    n, m = C.shape[0], D.shape[0]
    pi = _check_coupling(coupling, n, m, C.device)
    D = D.to(C.device)
    if loss == "square":
        p, q = pi.sum(dim=1), pi.sum(dim=0)
        # Σ ℓ π π = Σ_ik C_ik² p_i p_k + Σ_jl D_jl² q_j q_l − 2 Σ_ij π_ij (C π Dᵀ)_ij
        return float(p @ (C * C) @ p + q @ (D * D) @ q - 2.0 * (pi * (C @ pi @ D.T)).sum())
    # Only pairs of support entries of π contribute: O(|S|²) for a support S (about n for a permutation-like
    # solver output, n·m for a dense coupling), in chunks of bounded memory.
    rows, cols = pi.nonzero(as_tuple=True)
    weights = pi[rows, cols]
    chunk = max(1, _ABS_CHUNK_BYTES // (8 * max(1, rows.numel())))
    total = torch.zeros((), dtype=torch.float64, device=C.device)
    for start in range(0, rows.numel(), chunk):
        part = slice(start, start + chunk)
        diff = (C[rows[part]][:, rows] - D[cols[part]][:, cols]).abs_()  # |C_ik − D_jl| for (i,j), (k,l) in S
        total += weights[part] @ diff @ weights
    return float(total)


def _scale(C: torch.Tensor, D: torch.Tensor) -> float:
    scale = max(float(C.abs().max()), float(D.abs().max()))
    return scale if scale > 0 else 1.0


def _initial_coupling(init, C: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    n, m = C.shape[0], D.shape[0]
    if isinstance(init, str):
        if init == "product":
            return torch.full((n, m), 1.0 / (n * m), dtype=torch.float64, device=C.device)
        if init == "degree-sorted":
            return sorted_degree_coupling(C, D)
        raise ValueError(f"init must be 'product', 'degree-sorted' or an (n, m) coupling, got {init!r}")
    return _check_coupling(init, n, m, C.device)


def pot_gw(C, D, *, init: Union[str, torch.Tensor] = "product", max_iter: int = 10_000,
           tol: float = 1e-9) -> GWResult:
    """GW₂ by POT's conditional-gradient solver (``ot.gromov.gromov_wasserstein``, uniform weights).

    A local optimum of a non-convex problem: ``init`` = "product" (POT's default p·qᵀ), "degree-sorted"
    (:func:`sorted_degree_coupling`, equal sizes) or an explicit coupling. ``tol`` is POT's relative and
    absolute stopping threshold. Runs on CPU in float64.
    """
    ot = _require_pot()
    C, D = as_graph(C, "C").cpu(), as_graph(D, "D").cpu()
    G0 = _initial_coupling(init, C, D).numpy()
    coupling = ot.gromov.gromov_wasserstein(C.numpy(), D.numpy(), loss_fun="square_loss", G0=G0,
                                            max_iter=max_iter, tol_rel=tol, tol_abs=tol)
    coupling = torch.from_numpy(coupling)
    return GWResult(gw_cost(C, D, coupling), coupling)


def pot_entropic_gw(C, D, *, epsilon: float = 0.01, max_iter: int = 1000, tol: float = 1e-9,
                    sinkhorn_iter: int = 1000, sinkhorn_tol: float = 1e-9) -> GWResult:
    """Entropic GW₂ by POT (``ot.gromov.entropic_gromov_wasserstein``, projected gradient, uniform weights).

    ``epsilon`` is relative **(ours)**: both matrices are divided by their largest absolute entry before
    solving (the coupling equals the one for the original matrices with ε·scale²), so one ε suits graphs of
    any scale. ``tol`` stops the outer loop (‖π − π_prev‖_F, every 10 steps), ``sinkhorn_iter`` and
    ``sinkhorn_tol`` bound each inner Sinkhorn projection. ``value`` is the unregularised square-loss cost
    of the returned coupling.
    """
    ot = _require_pot()
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")
    C, D = as_graph(C, "C").cpu(), as_graph(D, "D").cpu()
    scale = _scale(C, D)
    coupling = ot.gromov.entropic_gromov_wasserstein(
        (C / scale).numpy(), (D / scale).numpy(), loss_fun="square_loss", epsilon=epsilon,
        max_iter=max_iter, tol=tol, numItermax=sinkhorn_iter, stopThr=sinkhorn_tol)
    coupling = torch.from_numpy(coupling)
    return GWResult(gw_cost(C, D, coupling), coupling)


def _log_sinkhorn(cost: torch.Tensor, epsilon: float, max_iter: int, tol: float,
                  check_every: int) -> torch.Tensor:
    """Entropic OT plan between uniform marginals for ``cost`` (n, m), in the log domain."""
    n, m = cost.shape
    log_p = torch.full((n,), -math.log(n), dtype=cost.dtype, device=cost.device)
    log_q = torch.full((m,), -math.log(m), dtype=cost.dtype, device=cost.device)
    log_kernel = -cost / epsilon
    u = torch.zeros_like(log_p)
    v = torch.zeros_like(log_q)
    for step in range(1, max_iter + 1):
        u = log_p - torch.logsumexp(log_kernel + v[None, :], dim=1)
        v = log_q - torch.logsumexp(log_kernel + u[:, None], dim=0)
        if step % check_every == 0:  # row marginals drift only after the v update; checked sparsely
            row_error = (torch.logsumexp(log_kernel + u[:, None] + v[None, :], dim=1).exp()
                         - log_p.exp()).abs().sum()
            if float(row_error) < tol:
                break
    return torch.exp(log_kernel + u[:, None] + v[None, :])


def torch_entropic_gw(C, D, *, epsilon: float = 0.01, max_iter: int = 1000, tol: float = 1e-9,
                      sinkhorn_iter: int = 1000, sinkhorn_tol: float = 1e-9, check_every: int = 10,
                      device: Optional[Union[str, torch.device]] = None) -> GWResult:
    """Entropic GW₂ in pure torch (float64), the same iteration as POT's ``entropic_gromov_wasserstein``.

    Each step solves an entropic OT problem (log-domain Sinkhorn) for the linearised cost 2·(constC −
    C π Dᵀ) at the current π. ``epsilon`` is relative as in :func:`pot_entropic_gw`. ``device`` defaults to
    CUDA when available, else the device of ``C``. Stops when ‖π − π_prev‖_F < tol (checked every
    ``check_every`` steps, to limit host syncs). Returns the coupling on the CPU.
    """
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")
    C, D = as_graph(C, "C"), as_graph(D, "D")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else C.device
    scale = _scale(C, D)
    Cs, Ds = (C / scale).to(device), (D / scale).to(device)
    n, m = Cs.shape[0], Ds.shape[0]
    p = torch.full((n,), 1.0 / n, dtype=torch.float64, device=device)
    q = torch.full((m,), 1.0 / m, dtype=torch.float64, device=device)
    const = ((Cs * Cs) @ p)[:, None] + ((Ds * Ds) @ q)[None, :]
    coupling = p[:, None] * q[None, :]
    for step in range(1, max_iter + 1):
        previous = coupling
        gradient = 2.0 * (const - 2.0 * Cs @ coupling @ Ds.T)
        coupling = _log_sinkhorn(gradient, epsilon, sinkhorn_iter, sinkhorn_tol, check_every)
        if step % check_every == 0 and float(torch.linalg.norm(coupling - previous)) < tol:
            break
    coupling = coupling.cpu()
    return GWResult(gw_cost(C.cpu(), D.cpu(), coupling), coupling)


def brute_force_gw(C, D, loss: str = "square") -> GWResult:
    """Minimum of the GW cost over the n! permutation couplings P/n (equal sizes, n <= 8).

    Exact GW₂ when both matrices are positive semi-definite or both are squared-distance matrices of points
    on a line (the square-loss objective is then concave on couplings, so a vertex, i.e. a permutation, is
    optimal); for other inputs or the abs loss it is an upper bound. Ties go to the first permutation in
    lexicographic order.
    """
    _check_loss(loss)
    C, D = _equal_sizes(C, D)
    n = C.shape[0]
    if n > BRUTE_FORCE_MAX_NODES:
        raise ValueError(f"brute_force_gw handles at most {BRUTE_FORCE_MAX_NODES} nodes, got n={n}")
    perms = torch.tensor(list(itertools.permutations(range(n))), dtype=torch.int64, device=C.device)
    permuted = D[perms[:, :, None], perms[:, None, :]]  # permuted[s, i, k] = D[σ_s(i), σ_s(k)]
    diff = C[None] - permuted
    costs = (diff * diff if loss == "square" else diff.abs()).sum(dim=(1, 2)) / (n * n)
    best = int(torch.argmin(costs))
    coupling = torch.zeros(n, n, dtype=torch.float64, device=C.device)
    coupling[torch.arange(n, device=C.device), perms[best]] = 1.0 / n
    return GWResult(float(costs[best]), coupling)
