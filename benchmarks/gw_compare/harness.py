"""The three experiments of the GLD-vs-GW benchmark: agreement, brute force (n <= 8) and time vs n.

Graphs: from a (student, teacher) pair of LLM-like logits (:func:`infigw.testing.logit_pair`), one sequence
each, dense co-activation graphs over the touched vocabulary ids (``coactivation_graph(..., layout="dense")``,
``nodes="vocab"``, ``graph_norm="mean"``), padded to a common size with isolated nodes. GLD values come from
``gld_loss(..., reduction="none")`` on the same logits; GW values from :mod:`infigw.exact_gw` on the graphs.

Every measurement is a row ``dict(experiment, pair, method, n, time_s, value, similarity)``; the report module
turns rows into the CSV, the plots and the Markdown summary.
"""
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

import infigw.functional as F
from infigw import dispatch, reference
from infigw import exact_gw as gw
from infigw.testing import SIMILARITY_LEVELS, logit_pair

from ..common import time_cpu, timed

# Method names (CSV "method" column).
GLD_L1 = "gld_l1"              # the paper's sorted-degree L1 (GLD's default distance)
GLD_GW1D = "gld_gw1d"          # the 1-D GW closed form on the degree lists
LOWER_BOUND = "gw1_lower_bound"  # (1/n²)·Σ|f↑ − g↑| from the graphs' row sums
POT_CG = "pot_cg"              # POT conditional gradient, product init (POT's default)
POT_CG_DEGREE = "pot_cg_degree_init"  # POT conditional gradient from the degree-sorted permutation
EXACT = "gw2_reference"        # min of the two CG runs (or brute force for n <= 8): the "exact GW₂"
POT_ENTROPIC = "pot_entropic"
TORCH_ENTROPIC = "torch_entropic"
BRUTE_FORCE = "brute_force"
LINE_BRUTE_FORCE = "gw1d_brute_force"  # exact 1-D GW of the degree clouds, by brute force

# Ranked against the reference GW₂. The lower bound is GLD's l1 divided by n² (normalised for graph size).
SURROGATES = (GLD_L1, LOWER_BOUND, GLD_GW1D, POT_ENTROPIC, TORCH_ENTROPIC)
TIMING_SIMILARITY = "perturbed-0.3"


@dataclass
class Settings:
    """Sizes of one run; :data:`QUICK` and :data:`FULL` are the two presets of the CLI."""

    pairs: int                       # agreement pairs per similarity level
    brute_pairs: int                 # brute-force pairs per similarity level
    brute_sizes: Tuple[int, ...]     # vocabulary sizes of the brute-force graphs (n <= vocab <= 8)
    gld_max_n: int                   # largest n of the GLD closed-form timings
    graph_max_n: int                 # largest n at which graph solvers may still be timed
    max_seconds: float               # a method stops growing n once a run takes (or would take) longer
    min_time: float                  # seconds of repeated calls per fast timing
    epsilon: float                   # relative entropic regularisation (see infigw.exact_gw)
    entropic_tol: float              # stopping threshold of the entropic solvers' outer and Sinkhorn loops
    seed: int = 0
    levels: Tuple[str, ...] = SIMILARITY_LEVELS
    torch_entropic: bool = field(default_factory=torch.cuda.is_available)
    device: str = "cpu"              # device of the GLD closed-form timings
    per_level_plots: bool = True     # one scatter figure per surrogate (slow to draw; off in quick mode)
    progress: Optional[bool] = None  # tqdm's disable=None: bars only on a terminal


QUICK = Settings(pairs=12, brute_pairs=2, brute_sizes=(6, 8), gld_max_n=1 << 18, graph_max_n=1000,
                 max_seconds=6.0, min_time=0.02, epsilon=0.01, entropic_tol=1e-6,
                 per_level_plots=False)
FULL = Settings(pairs=200, brute_pairs=10, brute_sizes=(5, 6, 7, 8), gld_max_n=1 << 22, graph_max_n=8000,
                max_seconds=60.0, min_time=0.2, epsilon=0.01, entropic_tol=1e-6)


def _row(experiment, pair, method, n, time_s, value, similarity) -> Dict:
    return dict(experiment=experiment, pair=pair, method=method, n=int(n), time_s=float(time_s),
                value=float(value), similarity=similarity)


def _progress(iterable=None, *, total=None, desc: str, settings: Settings):
    """A tqdm bar; ``settings.progress`` None shows it only on a terminal."""
    disable = None if settings.progress is None else not settings.progress
    return tqdm(iterable, total=total, desc=desc, disable=disable, mininterval=1.0)


def dense_pair(student: torch.Tensor, teacher: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Padded float64 dense co-activation graphs (C, D) of the first sequence of each side."""
    options = dict(k=k, nodes="vocab", graph_norm="mean", layout="dense")
    (_, C), = F.coactivation_graph(student[:1], **options)
    (_, D), = F.coactivation_graph(teacher[:1], **options)
    return gw.pad_to_common_size(C, D)


def gld_values(student: torch.Tensor, teacher: torch.Tensor, k: int) -> Dict[str, Tuple[float, float]]:
    """{method: (value, seconds)} of GLD's two distances on the first sequence of each side (end to end)."""
    out = {}
    for method, distance in ((GLD_L1, "l1"), (GLD_GW1D, "gw1d")):
        value, seconds = timed(lambda: F.gld_loss(student[:1], teacher[:1], k=k, nodes="vocab", graph_norm="mean",
                                                   distance=distance, reduction="none"))
        out[method] = (float(value[0]), seconds)
    return out


def random_feasible_coupling(n: int, gen: torch.Generator, mixtures: int = 4) -> torch.Tensor:
    """A doubly-stochastic coupling (marginals 1/n): the mean of ``mixtures`` random permutation couplings."""
    coupling = torch.zeros(n, n, dtype=torch.float64)
    for _ in range(mixtures):
        coupling[torch.arange(n), torch.randperm(n, generator=gen)] += 1.0 / (n * mixtures)
    return coupling


class BoundCheck:
    """Checks the contract's GW₁ lower bound against the abs-loss cost of every coupling it is shown."""

    # A violation must exceed float64 rounding of sums over n² terms of size max|C|, max|D|.
    RELATIVE_SLACK = 1e-9

    def __init__(self):
        self.checked = 0
        self.violations: List[Dict] = []
        self.min_ratio = math.inf   # min over checks of cost / bound (bound > 0) ...
        self.tightest: Dict = {}    # ... and where it was reached
        self.by_coupling: Dict[str, int] = {}

    def check(self, C, D, couplings: Dict[str, torch.Tensor], context: Dict) -> float:
        bound = gw.degree_lower_bound(C, D)
        slack = self.RELATIVE_SLACK * max(float(C.abs().max()), float(D.abs().max()), 1.0)
        for name, coupling in couplings.items():
            cost = gw.gw_cost(C, D, coupling, loss="abs")
            self.checked += 1
            self.by_coupling[name] = self.by_coupling.get(name, 0) + 1
            if bound > 0 and cost / bound < self.min_ratio:
                self.min_ratio = cost / bound
                self.tightest = dict(context, coupling=name, n=C.shape[0])
            if cost < bound - slack:
                self.violations.append(dict(context, coupling=name, cost=cost, bound=bound))
        return bound


@dataclass
class Results:
    rows: List[Dict] = field(default_factory=list)
    bound: BoundCheck = field(default_factory=BoundCheck)
    # max relative difference between gld_l1 / n² (public API, from logits) and the bound from the graphs
    api_bound_mismatch: float = 0.0
    relabel_exact: List[bool] = field(default_factory=list)   # GLD l1 == 0 exactly on relabelled pairs
    notes: Dict[str, object] = field(default_factory=dict)


def _pair_config(rng: np.random.Generator) -> Dict:
    """Random (seq_len, vocab, k) of one agreement pair: graphs of roughly 10 to 50 nodes."""
    return dict(seq_len=int(rng.integers(6, 15)), vocab=int(rng.integers(48, 161)), k=int(rng.integers(4, 9)))


def _entropic(settings: Settings) -> Dict[str, Callable]:
    """The entropic solvers of this run, each ``(C, D) -> GWResult``."""
    options = dict(epsilon=settings.epsilon, tol=settings.entropic_tol, sinkhorn_tol=settings.entropic_tol)
    solvers = {POT_ENTROPIC: lambda C, D: gw.pot_entropic_gw(C, D, **options)}
    if settings.torch_entropic:
        solvers[TORCH_ENTROPIC] = lambda C, D: gw.torch_entropic_gw(C, D, **options)
    return solvers


def _solve_all(C, D, settings: Settings) -> Dict[str, Tuple[gw.GWResult, float]]:
    solved = {
        POT_CG: timed(lambda: gw.pot_gw(C, D, init="product")),
        POT_CG_DEGREE: timed(lambda: gw.pot_gw(C, D, init="degree-sorted")),
    }
    for method, solver in _entropic(settings).items():
        solved[method] = timed(lambda: solver(C, D))
    return solved


def _record_api_consistency(results: Results, gld: Dict, bound: float, n: int) -> None:
    api_bound = gld[GLD_L1][0] / (n * n)
    scale = max(abs(bound), 1e-12)
    results.api_bound_mismatch = max(results.api_bound_mismatch, abs(api_bound - bound) / scale)


def run_agreement(settings: Settings, results: Results) -> None:
    """Surrogates vs the reference GW₂ on ``settings.pairs`` pairs per similarity level, plus the bound check."""
    rng = np.random.default_rng(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    total = settings.pairs * len(settings.levels)
    bar = _progress(total=total, desc="agreement pairs", settings=settings)
    pair_id = 0
    for level in settings.levels:
        for _ in range(settings.pairs):
            config = _pair_config(rng)
            student, teacher = logit_pair(1, config["seq_len"], config["vocab"], similarity=level,
                                          seed=settings.seed * 1_000_003 + pair_id)
            C, D = dense_pair(student, teacher, config["k"])
            n = C.shape[0]
            gld = gld_values(student, teacher, config["k"])
            solved = _solve_all(C, D, settings)
            couplings = {name: result.coupling for name, (result, _) in solved.items()}
            couplings["degree_sorted"] = gw.sorted_degree_coupling(C, D)
            couplings["product"] = torch.full((n, n), 1.0 / (n * n), dtype=torch.float64)
            couplings["random"] = random_feasible_coupling(n, gen)
            bound = results.bound.check(C, D, couplings, dict(experiment="agreement", pair=pair_id, level=level))
            _record_api_consistency(results, gld, bound, n)
            if level == "relabelled":
                results.relabel_exact.append(gld[GLD_L1][0] == 0.0)

            rows = [_row("agreement", pair_id, m, n, t, v, level) for m, (v, t) in gld.items()]
            rows += [_row("agreement", pair_id, m, n, t, r.value, level) for m, (r, t) in solved.items()]
            reference = min(solved[POT_CG][0].value, solved[POT_CG_DEGREE][0].value)
            rows.append(_row("agreement", pair_id, EXACT, n, solved[POT_CG][1] + solved[POT_CG_DEGREE][1],
                             reference, level))
            rows.append(_row("agreement", pair_id, LOWER_BOUND, n, 0.0, bound, level))
            results.rows.extend(rows)
            pair_id += 1
            bar.update()
    bar.close()


def _small_graph_pair(level: str, vocab: int, seed: int, rng: np.random.Generator):
    """Logits and padded graphs of at most ``vocab`` (<= 8) nodes: short sequences over a tiny vocabulary."""
    k = int(rng.integers(2, max(3, vocab // 2) + 1))
    seq_len = int(rng.integers(2, 7))
    student, teacher = logit_pair(1, seq_len, vocab, similarity=level, seed=seed,
                                  num_dominant=min(3, k))
    C, D = dense_pair(student, teacher, k)
    return student, teacher, k, C, D


def run_brute_force(settings: Settings, results: Results) -> None:
    """n <= 8: exact GW₂ by brute force vs POT CG and the surrogates; 1-D closed form vs 1-D brute force."""
    rng = np.random.default_rng(settings.seed + 1)
    gen = torch.Generator().manual_seed(settings.seed + 1)
    total = settings.brute_pairs * len(settings.levels) * len(settings.brute_sizes)
    bar = _progress(total=total, desc="brute-force pairs", settings=settings)
    pair_id = 0
    for level in settings.levels:
        for vocab in settings.brute_sizes:
            for _ in range(settings.brute_pairs):
                student, teacher, k, C, D = _small_graph_pair(level, vocab, settings.seed * 7919 + pair_id, rng)
                n = C.shape[0]
                gld = gld_values(student, teacher, k)
                exact, t_exact = timed(lambda: gw.brute_force_gw(C, D))
                cg, t_cg = timed(lambda: gw.pot_gw(C, D))
                cg_degree, t_cg_degree = timed(lambda: gw.pot_gw(C, D, init="degree-sorted"))
                exact_abs = gw.brute_force_gw(C, D, loss="abs")
                couplings = dict(brute_force=exact.coupling, brute_force_abs=exact_abs.coupling, pot_cg=cg.coupling,
                                 pot_cg_degree_init=cg_degree.coupling, random=random_feasible_coupling(n, gen))
                bound = results.bound.check(C, D, couplings, dict(experiment="brute_force", pair=pair_id, level=level))
                _record_api_consistency(results, gld, bound, n)
                # 1-D GW of the degree clouds: the closed form (as GLD computes it) against brute force.
                f, g = C.sum(dim=1), D.sum(dim=1)
                line, t_line = timed(lambda: gw.brute_force_gw(gw.line_distance_matrix(f), gw.line_distance_matrix(g)))
                closed = float(F.sorted_gw1d(f, g))
                rows = [_row("brute_force", pair_id, m, n, t, v, level) for m, (v, t) in gld.items()]
                rows += [_row("brute_force", pair_id, BRUTE_FORCE, n, t_exact, exact.value, level),
                         _row("brute_force", pair_id, POT_CG, n, t_cg, cg.value, level),
                         _row("brute_force", pair_id, EXACT, n, t_cg + t_cg_degree, min(cg.value, cg_degree.value),
                              level),
                         _row("brute_force", pair_id, LOWER_BOUND, n, 0.0, bound, level),
                         _row("brute_force", pair_id, LINE_BRUTE_FORCE, n, t_line, line.value, level),
                         _row("brute_force", pair_id, "gw1d_closed_form_f64", n, 0.0, closed, level)]
                results.rows.extend(rows)
                pair_id += 1
                bar.update()
    bar.close()
    _line_control(settings, results)


def _line_control(settings: Settings, results: Results) -> None:
    """Control for the 1-D closed form: Gaussian point clouds on a line (not degrees), n = 7 and 8."""
    gen = torch.Generator().manual_seed(settings.seed + 2)
    for n in (7, 8):
        for pair in range(settings.brute_pairs * len(settings.levels)):
            x = torch.randn(n, generator=gen, dtype=torch.float64)
            y = torch.randn(n, generator=gen, dtype=torch.float64)
            line = gw.brute_force_gw(gw.line_distance_matrix(x), gw.line_distance_matrix(y))
            closed = float(F.sorted_gw1d(x, y))
            results.rows.append(_row("line_control", pair, LINE_BRUTE_FORCE, n, 0.0, line.value, "gaussian-points"))
            results.rows.append(_row("line_control", pair, "gw1d_closed_form_f64", n, 0.0, closed, "gaussian-points"))


# ------------------------------------------------------------------------------------------------ timing
def timing_sizes(largest: int) -> List[int]:
    """8, 16, ..., 512, then 1000, 2000, 4000, ... up to ``largest`` (1000 is the target's size)."""
    sizes = [8 << i for i in range(7)]
    size = 1000
    while size <= largest:
        sizes.append(size)
        size *= 2
    return [s for s in sizes if s <= largest]


def measure(fn: Callable[[], object], min_time: float):
    """(first result, seconds per call): one call if it takes >= min_time, else the median of enough repeated
    calls to fill min_time (the first call, which pays one-off costs, is then not counted)."""
    result, first = timed(fn)
    if first >= min_time:
        return result, first
    repeat = max(3, int(min_time / max(first, 1e-7)))
    return result, time_cpu(fn, warmup=0, repeat=repeat, memory=False).p50_ms / 1e3


def timing_graphs(n: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two co-activation graphs of exactly n nodes (float64) for the timing runs.

    LLM-like pair at ``TIMING_SIMILARITY`` with vocab 2n, n positions, k = 8; each graph is restricted to its
    n highest-degree nodes (what ``num_nodes=n`` keeps of the degrees), padded with isolated nodes if fewer
    were touched.
    """
    student, teacher = logit_pair(1, max(8, n), 2 * n, similarity=TIMING_SIMILARITY, seed=seed)
    C, D = dense_pair(student, teacher, k=8)

    def exactly_n(matrix):
        keep = torch.argsort(matrix.sum(dim=1), descending=True, stable=True)[:n]
        matrix = matrix[keep][:, keep]
        return torch.nn.functional.pad(matrix, (0, n - matrix.shape[0], 0, n - matrix.shape[0]))

    return exactly_n(C), exactly_n(D)


def gld_closed_form(distance: str, device: torch.device) -> Callable:
    """GLD's per-graph work after the degree pass, as in gld_loss: sort/compress both sides, then the op."""
    gw1d = dispatch.resolve("sorted_gw1d", "auto", device)[1] if distance == "gw1d" else None

    def run(student_degrees, teacher_degrees, touched):
        f, f_count = F.sorted_degrees(student_degrees, touched)
        g, g_count = F.sorted_degrees(teacher_degrees, touched)
        return reference.sorted_l1(f, g) if gw1d is None else gw1d(f, g, torch.maximum(f_count, g_count))

    return run


class _Grower:
    """Decides whether a method still runs at the next size: stop once a run took, or would take, too long."""

    def __init__(self, max_seconds: float, min_slope: float):
        self.max_seconds, self.min_slope = max_seconds, min_slope
        self.history: List[Tuple[int, float]] = []
        self.stopped_at: Optional[int] = None

    def allows(self, n: int) -> bool:
        if self.stopped_at is not None:
            return False
        if self.history:
            (n1, t1) = self.history[-1]
            slope = self.min_slope
            if len(self.history) >= 2:
                (n0, t0) = self.history[-2]
                slope = max(slope, math.log(t1 / t0) / math.log(n1 / n0))
            if t1 > self.max_seconds or t1 * (n / n1) ** slope > self.max_seconds:
                self.stopped_at = n
                return False
        return True

    def add(self, n: int, seconds: float) -> None:
        self.history.append((n, seconds))


def run_timing(settings: Settings, results: Results) -> None:
    """Time vs n: GLD closed forms on degree vectors, graph solvers on dense graphs of n nodes."""
    device = torch.device(settings.device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(settings.seed + 3)
    gld_sizes = timing_sizes(settings.gld_max_n)
    graph_sizes = [s for s in gld_sizes if s <= settings.graph_max_n]
    # Solvers are at least quadratic in n; the brute force runs at n = 8 only.
    solvers = dict(_entropic(settings), **{POT_CG: gw.pot_gw})
    growers = {method: _Grower(settings.max_seconds, 2.0) for method in solvers}
    gld_growers = {GLD_L1: _Grower(settings.max_seconds, 1.0), GLD_GW1D: _Grower(settings.max_seconds, 1.0)}
    closed_forms = {GLD_L1: gld_closed_form("l1", device), GLD_GW1D: gld_closed_form("gw1d", device)}
    degrees_from_graphs = 0
    for n in _progress(gld_sizes, desc="timing sizes", settings=settings):
        graphs = None
        if n in graph_sizes and any(grower.allows(n) for grower in growers.values()):
            graphs = timing_graphs(n, settings.seed + n)
        if graphs is not None:
            C, D = graphs
            for method, grower in growers.items():
                if grower.allows(n):
                    solved, seconds = measure(lambda: solvers[method](C, D), settings.min_time)
                    grower.add(n, seconds)
                    results.rows.append(_row("timing", -1, method, n, seconds, solved.value, TIMING_SIMILARITY))
            if n == gw.BRUTE_FORCE_MAX_NODES:
                exact, seconds = measure(lambda: gw.brute_force_gw(C, D), settings.min_time)
                results.rows.append(_row("timing", -1, BRUTE_FORCE, n, seconds, exact.value, TIMING_SIMILARITY))
            # GLD on these graphs' own degrees (row sums) ...
            degrees_from_graphs = n
            student_degrees, teacher_degrees = C.sum(dim=1).float()[None], D.sum(dim=1).float()[None]
        else:
            # ... and beyond the graph sizes on log-normal degree vectors (the cost does not depend on values).
            student_degrees = torch.randn(1, n, generator=gen).exp()
            teacher_degrees = torch.randn(1, n, generator=gen).exp()
        student_degrees, teacher_degrees = student_degrees.to(device), teacher_degrees.to(device)
        touched = torch.ones(1, n, dtype=torch.bool, device=device)
        for method, grower in gld_growers.items():
            if grower.allows(n):
                run = closed_forms[method]

                def call():
                    out = run(student_degrees, teacher_degrees, touched)
                    synchronize()
                    return out

                value, seconds = measure(call, settings.min_time)
                grower.add(n, seconds)
                results.rows.append(_row("timing", -1, method, n, seconds, float(value[0]), TIMING_SIMILARITY))
    results.notes["gld_degrees_from_graphs_max_n"] = degrees_from_graphs
