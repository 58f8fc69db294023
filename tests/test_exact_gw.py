"""The exact-GW validation tools (infigw.exact_gw), the LLM-like generator (infigw.testing) and the contract's
GW lower bound checked against real couplings of co-activation graphs built from logits."""
import itertools

import pytest
import torch

import infigw.functional as F
from infigw import exact_gw as gw
from infigw.testing import SIMILARITY_LEVELS, llm_like_logits, logit_pair, parse_similarity

from .helpers import assert_close

pytest.importorskip("ot")


def gw_cost_four_loops(C, D, coupling, loss):
    """Σ_{i,j,k,l} ℓ(C_ik, D_jl) π_ij π_kl written out literally (tiny n only)."""
    n, m = C.shape[0], D.shape[0]
    ell = (lambda a, b: (a - b) ** 2) if loss == "square" else (lambda a, b: abs(a - b))
    return sum(float(ell(C[i, k], D[j, l]) * coupling[i, j] * coupling[k, l])
               for i, j, k, l in itertools.product(range(n), range(m), range(n), range(m)))


def gram_graph(n, generator, width=5):
    """A random positive semi-definite graph, like a co-activation graph (a Gram matrix)."""
    a = torch.rand(n, width, generator=generator, dtype=torch.float64) * 3
    return a @ a.T / width


def random_coupling(n, m, generator):
    """A feasible coupling with uniform marginals (Sinkhorn-balanced random positive matrix)."""
    coupling = torch.rand(n, m, generator=generator, dtype=torch.float64) + 0.05
    for _ in range(200):
        coupling *= (1.0 / n) / coupling.sum(1, keepdim=True)
        coupling *= (1.0 / m) / coupling.sum(0, keepdim=True)
    return coupling


def coactivation_pair(similarity, seed, seq_len, vocab, k, values="logits"):
    """Padded dense co-activation graphs (vocab nodes, mean norm) of a (student, teacher) logits pair."""
    student, teacher = logit_pair(1, seq_len, vocab, similarity=similarity, seed=seed)
    (_, C), = F.coactivation_graph(student, k=k, values=values, layout="dense")
    (_, D), = F.coactivation_graph(teacher, k=k, values=values, layout="dense")
    C, D = gw.pad_to_common_size(C, D)
    return student, teacher, C, D


# ------------------------------------------------------------------------------------------- gw_cost
@pytest.mark.parametrize("loss", ["square", "abs"])
@pytest.mark.parametrize("n, m", [(3, 3), (3, 4), (4, 2)])
def test_gw_cost_matches_the_literal_four_loop(loss, n, m):
    gen = torch.Generator().manual_seed(n * 10 + m)
    C, D = gram_graph(n, gen), torch.randn(m, m, generator=gen, dtype=torch.float64)
    coupling = torch.rand(n, m, generator=gen, dtype=torch.float64)
    coupling[0, -1] = 0.0  # a zero entry: the abs loss sums over the support only
    expected = gw_cost_four_loops(C, D, coupling, loss)
    assert_close(gw.gw_cost(C, D, coupling, loss=loss), expected, atol=1e-12, rtol=1e-12, name=f"{loss} cost")


def test_gw_cost_accepts_numpy_and_float32():
    gen = torch.Generator().manual_seed(0)
    C, D = gram_graph(4, gen), gram_graph(4, gen)
    coupling = random_coupling(4, 4, gen)
    expected = gw.gw_cost(C, D, coupling)
    assert_close(gw.gw_cost(C.numpy(), D.float(), coupling.numpy()), expected, rtol=1e-6, name="mixed inputs")


@pytest.mark.parametrize("C, D, coupling, loss, error, match", [
    (torch.zeros(3, 4), torch.zeros(3, 3), torch.zeros(3, 3), "square", ValueError, "C must be a non-empty square"),
    (torch.zeros(3, 3), torch.zeros(2, 2), torch.zeros(3, 3), "square", ValueError,
     r"coupling must have shape \(3, 2\)"),
    (torch.full((2, 2), float("nan")), torch.zeros(2, 2), torch.zeros(2, 2), "square", ValueError, "finite"),
    (torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2), "kl", ValueError, "loss must be one of"),
    (torch.zeros(2, 2, dtype=torch.complex64), torch.zeros(2, 2), torch.zeros(2, 2), "abs", TypeError, "real"),
    ("not a matrix", torch.zeros(2, 2), torch.zeros(2, 2), "abs", TypeError, "C must be a tensor"),
])
def test_gw_cost_rejects_bad_input(C, D, coupling, loss, error, match):
    with pytest.raises(error, match=match):
        gw.gw_cost(C, D, coupling, loss=loss)


# ------------------------------------------------------------------------------------- brute force
@pytest.mark.parametrize("n", [3, 4, 5, 6])
def test_brute_force_is_the_global_minimum_for_psd_graphs(n):
    """PSD graphs: the square-loss objective is concave, so no coupling beats the best permutation."""
    gen = torch.Generator().manual_seed(n)
    C, D = gram_graph(n, gen), gram_graph(n, gen)
    best = gw.brute_force_gw(C, D)
    assert_close(best.value, gw.gw_cost(C, D, best.coupling), rtol=1e-12, name="value = cost of its coupling")
    assert_close(best.coupling.sum(0), torch.full((n,), 1.0 / n), atol=1e-15, name="column marginals")
    assert_close(best.coupling.sum(1), torch.full((n,), 1.0 / n), atol=1e-15, name="row marginals")
    solver = gw.pot_gw(C, D)
    assert best.value <= solver.value * (1 + 1e-9), f"brute force {best.value} above POT CG {solver.value}"
    for _ in range(100):
        cost = gw.gw_cost(C, D, random_coupling(n, n, gen))
        assert cost >= best.value * (1 - 1e-9), f"a random coupling ({cost}) beats brute force ({best.value})"
    # POT started at the optimal permutation stays there (a vertex optimum is a stationary point).
    assert_close(gw.pot_gw(C, D, init=best.coupling).value, best.value, rtol=1e-9, name="POT from the optimum")


@pytest.mark.parametrize("n", [2, 5, 8])
def test_brute_force_finds_a_hidden_relabelling(n):
    gen = torch.Generator().manual_seed(100 + n)
    C = gram_graph(n, gen)
    perm = torch.randperm(n, generator=gen)
    D = C[perm][:, perm]
    best = gw.brute_force_gw(C, D)
    assert best.value <= 1e-12 * float(C.abs().max()) ** 2, f"relabelled copy at GW {best.value}"
    # D[a, b] = C[perm[a], perm[b]]: node i of C is node perm⁻¹(i) of D.
    assert torch.equal(best.coupling.argmax(1), torch.argsort(perm)), "the coupling is not the hidden permutation"
    assert_close(gw.pot_gw(C, D, init="degree-sorted").value, 0.0, atol=1e-9, name="POT from the degree order")


def test_brute_force_matches_pot_on_tiny_graphs():
    """n = 3: POT from several starts reaches the brute-force optimum."""
    gen = torch.Generator().manual_seed(7)
    for _ in range(10):
        C, D = gram_graph(3, gen), gram_graph(3, gen)
        best = gw.brute_force_gw(C, D)
        starts = ["product", "degree-sorted"] + [random_coupling(3, 3, gen) for _ in range(5)]
        solver = min(gw.pot_gw(C, D, init=start).value for start in starts)
        assert_close(solver, best.value, rtol=1e-7, atol=1e-12, name="POT (best start) vs brute force")


def test_brute_force_rejects_large_or_unequal_graphs():
    with pytest.raises(ValueError, match="at most 8 nodes"):
        gw.brute_force_gw(torch.eye(9), torch.eye(9))
    with pytest.raises(ValueError, match="same number of nodes"):
        gw.brute_force_gw(torch.eye(3), torch.eye(4))


def test_line_brute_force_matches_the_closed_form_for_small_n():
    """Points on a line, n <= 6: min(identity, anti-identity) is the exact 1-D GW (Beinert et al.)."""
    gen = torch.Generator().manual_seed(3)
    for n in (3, 4, 5, 6):
        x = torch.randn(n, generator=gen, dtype=torch.float64)
        y = torch.randn(n, generator=gen, dtype=torch.float64).exp()
        exact = gw.brute_force_gw(gw.line_distance_matrix(x), gw.line_distance_matrix(y)).value
        assert_close(F.sorted_gw1d(x, y), exact, rtol=1e-6, atol=1e-12, name=f"1-D GW n={n}")


# -------------------------------------------------------------------------------- padding and bounds
def test_pad_to_common_size_adds_isolated_nodes():
    C, D = torch.ones(2, 2), torch.full((4, 4), 2.0)
    Cp, Dp = gw.pad_to_common_size(C, D)
    assert Cp.shape == Dp.shape == (4, 4) and Cp.dtype == torch.float64
    assert torch.equal(Cp[:2, :2], C.double()) and Cp[2:].abs().sum() == 0 and Cp[:, 2:].abs().sum() == 0
    assert torch.equal(Dp, D.double())


def test_degree_lower_bound_formula():
    C = torch.tensor([[1.0, 2.0], [2.0, 0.0]])   # degrees 3, 2
    D = torch.tensor([[0.0, 0.0], [0.0, 5.0]])   # degrees 0, 5
    assert_close(gw.degree_lower_bound(C, D), (abs(2 - 0) + abs(3 - 5)) / 4, name="bound")
    with pytest.raises(ValueError, match="pad_to_common_size"):
        gw.degree_lower_bound(torch.eye(2), torch.eye(3))


def test_sorted_degree_coupling_pairs_sorted_degrees():
    C = torch.diag(torch.tensor([1.0, 5.0, 3.0]))
    D = torch.diag(torch.tensor([9.0, 2.0, 4.0]))
    coupling = gw.sorted_degree_coupling(C, D)
    assert torch.equal(coupling.argmax(1), torch.tensor([1, 0, 2])), "largest with largest, ..., smallest"
    assert_close(coupling.sum(), 1.0, name="mass")


LEVELS_FOR_BOUND = [level for level in SIMILARITY_LEVELS if level != "identical"]


@pytest.mark.filterwarnings("ignore:Sinkhorn did not converge")
@pytest.mark.parametrize("values", ["logits", "probs"])
def test_lower_bound_holds_for_every_coupling_of_coactivation_graphs(values):
    """The contract's inequality on 30 pairs per value mode (60 in all), against solver, entropic, degree-sorted,
    product and random feasible couplings; and gld_loss(l1) / n² equals the bound computed from the graphs."""
    gen = torch.Generator().manual_seed(11)
    checked = 0
    for pair in range(30):
        level = LEVELS_FOR_BOUND[pair % len(LEVELS_FOR_BOUND)]
        seq_len, vocab, k = 4 + pair % 5, 24 + 3 * pair, 3 + pair % 4
        student, teacher, C, D = coactivation_pair(level, pair, seq_len, vocab, k, values)
        n = C.shape[0]
        bound = gw.degree_lower_bound(C, D)
        gld = F.gld_loss(student, teacher, k=k, values=values, nodes="vocab", distance="l1", reduction="none")[0]
        # float32 degrees: errors scale with the degrees, not with their (possibly tiny) differences
        degree_scale = float(C.sum().abs() + D.sum().abs()) / n**2
        assert_close(gld / n**2, bound, rtol=1e-5, atol=1e-5 * degree_scale,
                     name=f"gld_loss / n² vs bound (pair {pair}, {level})")
        couplings = {"pot_cg": gw.pot_gw(C, D).coupling, "degree_sorted": gw.sorted_degree_coupling(C, D),
                     "product": torch.full((n, n), 1.0 / n**2, dtype=torch.float64),
                     "random": random_coupling(n, n, gen)}
        if pair % 5 == 0:  # the entropic solver is the slow one
            couplings["pot_entropic"] = gw.pot_entropic_gw(C, D, tol=1e-6, sinkhorn_tol=1e-6).coupling
        slack = 1e-9 * max(float(C.abs().max()), float(D.abs().max()))
        for name, coupling in couplings.items():
            cost = gw.gw_cost(C, D, coupling, loss="abs")
            assert cost >= bound - slack, f"pair {pair} ({level}), coupling {name}: GW1 cost {cost} < bound {bound}"
            checked += 1
    assert checked >= 120


def test_lower_bound_is_violated_by_an_infeasible_coupling():
    """The check can fail: a 'coupling' with the wrong marginals (mass 1/2) falls below the bound."""
    _, _, C, D = coactivation_pair("independent", 5, 6, 40, 4)
    n = C.shape[0]
    half = gw.sorted_degree_coupling(C, D) / 2
    assert gw.gw_cost(C, D, half, loss="abs") < gw.degree_lower_bound(C, D)


# ------------------------------------------------------------------------------------------- entropic
def test_torch_entropic_matches_pot():
    gen = torch.Generator().manual_seed(5)
    C, D = gram_graph(7, gen), gram_graph(9, gen)
    pot = gw.pot_entropic_gw(C, D, epsilon=0.02)
    mine = gw.torch_entropic_gw(C, D, epsilon=0.02, device="cpu")
    assert_close(mine.coupling, pot.coupling, atol=1e-7, rtol=1e-4, name="entropic coupling")
    assert_close(mine.value, pot.value, rtol=1e-6, name="entropic value")
    assert_close(mine.coupling.sum(1), torch.full((7,), 1 / 7, dtype=torch.float64), atol=1e-8, name="marginal")


@pytest.mark.parametrize("solver", [gw.pot_entropic_gw, gw.torch_entropic_gw])
def test_entropic_rejects_bad_epsilon(solver):
    with pytest.raises(ValueError, match="epsilon must be a finite number > 0"):
        solver(torch.eye(3), torch.eye(3), epsilon=0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_entropic_on_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(6)
    C, D = gram_graph(20, gen), gram_graph(24, gen)
    cpu = gw.torch_entropic_gw(C, D, device="cpu")
    cuda = gw.torch_entropic_gw(C.cuda(), D.cuda())
    assert_close(cuda.coupling, cpu.coupling, atol=1e-9, rtol=1e-6, name="CUDA vs CPU coupling")


# ------------------------------------------------------------------------------------------ generator
def test_llm_like_logits_is_deterministic_and_well_formed():
    a = llm_like_logits(2, 5, 50, seed=3)
    assert a.shape == (2, 5, 50) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, llm_like_logits(2, 5, 50, seed=3)), "same seed, different logits"
    assert not torch.equal(a, llm_like_logits(2, 5, 50, seed=4)), "different seeds, same logits"
    gen = torch.Generator().manual_seed(3)
    assert torch.equal(a, llm_like_logits(2, 5, 50, generator=gen)), "generator and seed disagree"
    assert not torch.equal(a, llm_like_logits(2, 5, 50, generator=gen)), "the generator did not advance"
    half = llm_like_logits(2, 5, 50, seed=3, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, a.to(torch.bfloat16)), "dtype changes the draw"


def test_llm_like_logits_has_dominant_tokens_heavy_tails_and_correlated_positions():
    logits = llm_like_logits(4, 64, 2000, seed=0, num_dominant=3, dominant_gap=6.0)
    top = logits.topk(4, dim=-1).values
    assert (top[..., 0] - top[..., 3] >= 6.0 / 3).all(), "the 3 dominant tokens do not stand out"
    assert logits.softmax(-1).amax(-1).mean() > 0.5, "the top token does not dominate the distribution"
    noise = llm_like_logits(4, 256, 500, seed=1, num_dominant=0, zipf_exponent=0.0, correlation=0.8, tail=0.0)
    lag1 = (noise[:, 1:] * noise[:, :-1]).mean() / (noise * noise).mean()
    assert abs(float(lag1) - 0.8) < 0.05, f"lag-1 autocorrelation {float(lag1):.3f}, expected 0.8"
    heavy = llm_like_logits(4, 64, 2000, seed=2, num_dominant=0, zipf_exponent=0.0, tail=0.5).flatten()
    kurtosis = float(((heavy - heavy.mean()) ** 4).mean() / heavy.var() ** 2)
    assert kurtosis > 4.0, f"kurtosis {kurtosis:.2f}: tails are not heavy"


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(batch=0), ValueError, "batch must be an int >= 1"),
    (dict(vocab=2.5), ValueError, "vocab must be an int >= 1"),
    (dict(correlation=1.0), ValueError, r"correlation must be in \[0, 1\)"),
    (dict(tail=-1.0), ValueError, "tail must be a finite number >= 0"),
    (dict(dtype=torch.int64), TypeError, "dtype must be a floating"),
    (dict(seed="x"), TypeError, "seed must be an int"),
    (dict(generator=object()), TypeError, "generator must be a CPU torch.Generator"),
])
def test_llm_like_logits_rejects_bad_arguments(kwargs, error, match):
    args = dict(batch=1, seq_len=2, vocab=8)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        llm_like_logits(args.pop("batch"), args.pop("seq_len"), args.pop("vocab"), **args)


def test_logit_pair_levels():
    teacher = llm_like_logits(2, 6, 40, seed=9)
    for level in SIMILARITY_LEVELS + ("perturbed-0",):
        student, same_teacher = logit_pair(2, 6, 40, similarity=level, seed=9)
        assert torch.equal(same_teacher, teacher), f"{level}: the teacher depends on the level"
        if level in ("identical", "perturbed-0"):
            assert torch.equal(student, teacher), level
        elif level == "relabelled":
            assert not torch.equal(student, teacher)
            assert torch.equal(student.sort(-1).values, teacher.sort(-1).values), "not a vocabulary permutation"
        else:
            assert not torch.equal(student.sort(-1).values, teacher.sort(-1).values), level
    assert parse_similarity("perturbed-0.25") == ("perturbed", 0.25)
    for bad in ("perturbed-1.5", "perturbed", "similar", None):
        with pytest.raises(ValueError, match="similarity must be"):
            logit_pair(1, 2, 8, similarity=bad)


@pytest.mark.parametrize("values", ["logits", "probs", "topk_probs"])
@pytest.mark.parametrize("graph_norm", ["mean", "sum", "cosine"])
def test_gld_with_vocab_nodes_is_exactly_invariant_to_relabelling(values, graph_norm):
    student, teacher = logit_pair(3, 12, 300, similarity="relabelled", seed=21)
    other = llm_like_logits(3, 12, 300, seed=22)
    options = dict(k=8, values=values, nodes="vocab", graph_norm=graph_norm, reduction="none")
    for distance in ("l1", "gw1d"):
        relabelled = F.gld_loss(student, other, distance=distance, **options)
        original = F.gld_loss(teacher, other, distance=distance, **options)
        if values == "probs":  # the full-row logsumexp sums the permuted row in another order: last-bit changes
            assert_close(relabelled, original, rtol=1e-5, name=f"{distance} after relabelling")
        else:
            assert torch.equal(relabelled, original), distance
        assert (relabelled > 0).all(), f"{distance}: independent logits at distance 0"
        self_distance = F.gld_loss(student, teacher, distance=distance, **options)
        if distance == "l1" and values != "probs":
            assert torch.equal(self_distance, torch.zeros(3)), "sorted L1 of equal degree lists"
        elif distance == "l1":
            assert (self_distance <= 1e-5 * relabelled).all(), f"l1 after relabelling: {self_distance}"
        else:  # power sums: equal lists give 0 only up to the rounding of the fp64 sums
            assert (self_distance.abs() <= 1e-9 * relabelled).all(), f"gw1d of equal lists: {self_distance}"
