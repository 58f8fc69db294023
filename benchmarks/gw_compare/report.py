"""Rows -> CSV, PNG plots and the Markdown summary of a gw_compare run."""
import csv
import dataclasses
import json
import math
import os
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy import stats

from ..common import commit, device_name
from .harness import (BRUTE_FORCE, EXACT, GLD_GW1D, GLD_L1, LINE_BRUTE_FORCE, LOWER_BOUND, POT_CG, POT_ENTROPIC,
                      SURROGATES, TORCH_ENTROPIC, BoundCheck, Results, Settings)

CSV_COLUMNS = ("method", "n", "time_s", "value", "similarity", "machine", "commit", "experiment", "pair")
CLOSED_FORM_F64 = "gw1d_closed_form_f64"
# Relative tolerance for "the same value" between float32 closed forms and float64 brute force.
SAME_VALUE_RTOL = 1e-5
# A reference GW value counts as zero below this fraction of the largest value of its experiment.
ZERO_FRACTION = 1e-9
PLOT_DPI = 80
TITLES = {GLD_L1: "GLD sorted L1", LOWER_BOUND: "GLD sorted L1 / n² (GW₁ lower bound)",
          GLD_GW1D: "GLD 1-D GW closed form", POT_ENTROPIC: "POT entropic GW₂", TORCH_ENTROPIC: "torch entropic GW₂"}


def machine_description() -> str:
    import ot
    gpu = f", {device_name('cuda')}" if torch.cuda.is_available() else ""
    return f"{device_name('cpu')}{gpu}; torch {torch.__version__}, POT {ot.__version__}"


def save_run(results: Results, settings: Settings, directory: str) -> None:
    """results.csv (the rows, with machine and commit) and run.json (settings and the run-level checks)."""
    notes = results.notes
    with open(os.path.join(directory, "results.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in results.rows:
            writer.writerow(dict(row, machine=notes["machine"], commit=notes["commit"]))
    bound = results.bound
    state = dict(settings=dataclasses.asdict(settings), notes=notes, api_bound_mismatch=results.api_bound_mismatch,
                 relabel_exact=results.relabel_exact,
                 bound=dict(checked=bound.checked, violations=bound.violations, min_ratio=bound.min_ratio,
                            tightest=bound.tightest, by_coupling=bound.by_coupling))
    with open(os.path.join(directory, "run.json"), "w") as handle:
        json.dump(state, handle, indent=1)


def load_run(directory: str) -> Tuple[Results, Settings]:
    """The inverse of :func:`save_run`."""
    with open(os.path.join(directory, "run.json")) as handle:
        state = json.load(handle)
    with open(os.path.join(directory, "results.csv"), newline="") as handle:
        rows = [dict(experiment=r["experiment"], pair=int(r["pair"]), method=r["method"], n=int(r["n"]),
                     time_s=float(r["time_s"]), value=float(r["value"]), similarity=r["similarity"])
                for r in csv.DictReader(handle)]
    bound = BoundCheck()
    for key, value in state["bound"].items():
        setattr(bound, key, value)
    settings = dict(state["settings"])
    settings.update(brute_sizes=tuple(settings["brute_sizes"]), levels=tuple(settings["levels"]))
    results = Results(rows=rows, bound=bound, api_bound_mismatch=state["api_bound_mismatch"],
                      relabel_exact=state["relabel_exact"], notes=state["notes"])
    return results, Settings(**settings)


# ------------------------------------------------------------------------------------------------ tables
def _by_pair(rows: Sequence[Dict], experiment: str) -> Dict[int, Dict[str, Dict]]:
    pairs: Dict[int, Dict[str, Dict]] = defaultdict(dict)
    for row in rows:
        if row["experiment"] == experiment:
            pairs[row["pair"]][row["method"]] = row
    return pairs


def fit_slope(points: Sequence[Tuple[int, float]]) -> Tuple[float, int, int]:
    """Least-squares slope of log(time) vs log(n) over the upper half of the sizes (>= 3 points).

    Small sizes measure call overhead, not growth. Returns (slope, first n, last n) or NaN with < 2 points.
    """
    points = sorted(points)
    if len(points) < 2:
        return math.nan, points[0][0] if points else 0, points[-1][0] if points else 0
    used = points[-max(min(3, len(points)), (len(points) + 1) // 2):]
    ns, ts = np.log([p[0] for p in used]), np.log([max(p[1], 1e-12) for p in used])
    return float(np.polyfit(ns, ts, 1)[0]), used[0][0], used[-1][0]


def timing_table(rows: Sequence[Dict], max_seconds: float) -> str:
    series: Dict[str, List[Tuple[int, float]]] = defaultdict(list)
    for row in rows:
        if row["experiment"] == "timing":
            series[row["method"]].append((row["n"], row["time_s"]))
    at = {m: dict(points).get(1000) for m, points in series.items()}
    lines = ["| method | n tried | largest n within limit | time at n=1000 | log-log slope (fit range) "
             "| POT CG time / method time at n=1000 |",
             "|---|---|---|---|---|---|"]
    for method in sorted(series, key=lambda m: -max(t for _, t in series[m])):
        points = sorted(series[method])
        within = [n for n, t in points if t <= max_seconds]
        slope, lo, hi = fit_slope(points)
        speedup = at.get(POT_CG) / at[method] if at.get(POT_CG) and at.get(method) else None
        lines.append(
            f"| {method} | {points[0][0]}–{points[-1][0]} | {max(within) if within else '—'} | "
            f"{_seconds(at[method])} | {_num(slope, 2)} ({lo}–{hi}) | {_num(speedup, 3, sci=True)} |")
    return "\n".join(lines)


def _seconds(value: Optional[float]) -> str:
    if value is None:
        return "—"
    return f"{value * 1e6:.1f} µs" if value < 1e-3 else f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


def _num(value: Optional[float], digits: int = 3, sci: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}g}" if not sci else f"{value:.{digits}g}".replace("e+0", "e").replace("e+", "e")


def _correlations(x: np.ndarray, y: np.ndarray) -> Tuple[float, float]:
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    return float(stats.spearmanr(x, y).statistic), float(stats.kendalltau(x, y).statistic)


def agreement_table(rows: Sequence[Dict], levels: Sequence[str], experiment: str = "agreement",
                    reference: str = EXACT) -> str:
    """Spearman / Kendall of each surrogate against the reference GW₂, per similarity level and pooled."""
    pairs = _by_pair(rows, experiment)
    surrogates = [m for m in SURROGATES if any(m in p for p in pairs.values())]
    zero = ZERO_FRACTION * max((p[reference]["value"] for p in pairs.values()), default=0.0)
    header = ("| similarity | pairs | n (min–max) | reference GW₂ = 0 | "
              + " | ".join(f"{m} ρ / τ" for m in surrogates) + " | GLD l1 = 0 |")
    lines = [header, "|" + "---|" * (5 + len(surrogates))]
    for level in list(levels) + ["all levels"]:
        chosen = [p for p in pairs.values() if level == "all levels" or p[reference]["similarity"] == level]
        if not chosen:
            continue
        ref = np.array([p[reference]["value"] for p in chosen])
        ns = [p[reference]["n"] for p in chosen]
        zeros = int((ref <= zero).sum())
        cells = []
        for method in surrogates:
            values = np.array([p[method]["value"] for p in chosen])
            rho, tau = _correlations(values, ref) if zeros < len(chosen) else (math.nan, math.nan)
            cells.append(f"{_num(rho, 3)} / {_num(tau, 3)}")
        gld_zero = sum(p[GLD_L1]["value"] == 0.0 for p in chosen)
        lines.append(f"| {level} | {len(chosen)} | {min(ns)}–{max(ns)} | {zeros}/{len(chosen)} | "
                     + " | ".join(cells) + f" | {gld_zero}/{len(chosen)} |")
    return "\n".join(lines)


def brute_force_facts(rows: Sequence[Dict]) -> Dict:
    pairs = _by_pair(rows, "brute_force")
    facts = {"pairs": len(pairs)}
    if not pairs:
        return facts
    for method, key in ((POT_CG, "cg"), (EXACT, "reference")):
        misses = [p for p in pairs.values()
                  if p[method]["value"] > p[BRUTE_FORCE]["value"] * (1 + SAME_VALUE_RTOL) + 1e-12]
        facts[f"{key}_misses"] = len(misses)
        facts[f"{key}_worst_ratio"] = max((p[method]["value"] / p[BRUTE_FORCE]["value"] for p in misses),
                                          default=1.0)
    for experiment, key in (("brute_force", "degrees"), ("line_control", "gaussian")):
        chosen = list(_by_pair(rows, experiment).values())
        # Relative gaps; values below ZERO_FRACTION of the largest one count as 0 (identical clouds).
        zero = ZERO_FRACTION * max(p[LINE_BRUTE_FORCE]["value"] for p in chosen)
        gaps = [(p[CLOSED_FORM_F64]["value"] - p[LINE_BRUTE_FORCE]["value"])
                / max(p[LINE_BRUTE_FORCE]["value"], zero, 1e-300) for p in chosen]
        closed = [p[CLOSED_FORM_F64]["value"] for p in chosen]
        facts[f"line_{key}_negative"] = sum(v < 0 for v in closed)
        facts[f"line_{key}_most_negative"] = min(closed + [0.0])
        facts[f"line_{key}_pairs"] = len(gaps)
        facts[f"line_{key}_not_optimal"] = sum(g > SAME_VALUE_RTOL for g in gaps)
        facts[f"line_{key}_max_gap"] = max(gaps, default=0.0)
        facts[f"line_{key}_below_brute_force"] = sum(g < -SAME_VALUE_RTOL for g in gaps)
    ref = np.array([p[BRUTE_FORCE]["value"] for p in pairs.values()])
    for method in (GLD_L1, GLD_GW1D):
        facts[f"corr_{method}"] = _correlations(np.array([p[method]["value"] for p in pairs.values()]), ref)
    return facts


def summary_markdown(results: Results, settings: Settings, plots: Sequence[str]) -> str:
    rows, notes = results.rows, results.notes
    timing = timing_table(rows, settings.max_seconds)
    agreement = agreement_table(rows, settings.levels)
    brute = brute_force_facts(rows)
    bound = results.bound
    bf_corr = {m: brute.get(f"corr_{m}", (math.nan, math.nan)) for m in (GLD_L1, GLD_GW1D)}
    relabel = results.relabel_exact
    lines = [
        "## gw_compare summary",
        "",
        f"- command: `{notes['command']}`; wall time {notes['elapsed']:.0f} s (timing {notes['run_timing']:.0f} s, "
        f"agreement {notes['run_agreement']:.0f} s, brute force {notes['run_brute_force']:.0f} s); 1-minute load average "
        f"{notes['load_before']:.1f} before, {notes['load_after']:.1f} after (other processes share the cores: "
        f"absolute times are upper bounds)",
        f"- machine: {notes['machine']}; {notes['threads']} thread(s) for torch and BLAS; "
        f"commit: {notes['commit']}",
        f"- graphs: co-activation graphs (nodes=vocab, graph_norm=mean) of one sequence of LLM-like logits "
        f"(`infigw.testing.logit_pair`), padded to a common size; reference GW₂ = min of POT conditional "
        f"gradient from the product coupling and from the degree-sorted permutation; entropic ε = "
        f"{settings.epsilon} (relative to the largest entry²)",
        "",
        "### Time vs number of nodes n",
        "",
        f"GLD rows time the closed form on {settings.device} degree vectors (sort both sides + sorted L1 / power sums, as "
        f"`gld_loss` does after its O(T·k) degree pass): the timing graphs' row sums up to "
        f"n = {results.notes.get('gld_degrees_from_graphs_max_n')}, log-normal degree vectors beyond. Solver "
        f"rows time one call on the dense graphs (n = matrix size). A method stops growing n once a run takes, "
        f"or is predicted to take, more than {settings.max_seconds:g} s.",
        "",
        timing,
        "",
        "### Agreement with GW₂ (Spearman ρ / Kendall τ against the reference GW₂)",
        "",
        "n/a: the reference is 0 on every pair (nothing to rank), or fewer than 3 pairs.",
        "",
        agreement,
        "",
        "### Contract checks",
        "",
        f"- lower bound GW₁-cost(π) ≥ (1/n²)·Σ|f↑ − g↑| on every coupling tried: {bound.checked} checks "
        f"({', '.join(f'{k}: {v}' for k, v in sorted(bound.by_coupling.items()))}), "
        f"**{len(bound.violations)} violations**; smallest cost / bound = {_num(bound.min_ratio, 4)} "
        f"({', '.join(f'{k}={v}' for k, v in bound.tightest.items())})",
        f"- `gld_loss(distance='l1') / n²` vs the bound from the explicit graphs: max relative difference "
        f"{results.api_bound_mismatch:.2e}",
        f"- relabelled vocabulary: GLD l1 exactly 0 on {sum(relabel)}/{len(relabel)} pairs",
    ]
    if brute.get("pairs"):
        lines += [
            f"- brute force (n ≤ 8, {brute['pairs']} pairs; exact GW₂ since co-activation graphs are PSD): POT CG "
            f"(product init) above the optimum on {brute['cg_misses']} pairs (worst ratio "
            f"{_num(brute['cg_worst_ratio'], 4)}), the reference (best of two CG inits) on "
            f"{brute['reference_misses']} (worst ratio {_num(brute['reference_worst_ratio'], 4)}); Spearman/Kendall vs exact GW₂: GLD l1 "
            f"{_num(bf_corr[GLD_L1][0])}/{_num(bf_corr[GLD_L1][1])}, GLD gw1d "
            f"{_num(bf_corr[GLD_GW1D][0])}/{_num(bf_corr[GLD_GW1D][1])}",
            f"- 1-D closed form min(identity, anti-identity) vs brute-force 1-D GW: not optimal on "
            f"{brute['line_degrees_not_optimal']}/{brute['line_degrees_pairs']} degree clouds (max relative gap "
            f"{brute['line_degrees_max_gap']:.2e}) and on {brute['line_gaussian_not_optimal']}/"
            f"{brute['line_gaussian_pairs']} Gaussian clouds of 7–8 points (max gap "
            f"{brute['line_gaussian_max_gap']:.2e}); closed form below the brute force (impossible, it is the "
            f"cost of a permutation; would flag a numerical error): "
            f"{brute['line_degrees_below_brute_force'] + brute['line_gaussian_below_brute_force']}; negative "
            f"closed-form values (cancellation in the power sums at equal clouds): "
            f"{brute['line_degrees_negative'] + brute['line_gaussian_negative']} (most negative "
            f"{min(brute['line_degrees_most_negative'], brute['line_gaussian_most_negative']):.3g})",
        ]
    if plots:
        lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in plots)]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ plots
def make_plots(results: Results, settings: Settings, directory: str) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    written = []
    series: Dict[str, List[Tuple[int, float]]] = defaultdict(list)
    for row in results.rows:
        if row["experiment"] == "timing":
            series[row["method"]].append((row["n"], row["time_s"]))
    if series:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for method, points in sorted(series.items()):
            points.sort()
            slope, _, _ = fit_slope(points)
            ax.loglog([p[0] for p in points], [p[1] for p in points], "o-", ms=3,
                      label=f"{method} (slope {_num(slope, 2)})")
        ax.axhline(settings.max_seconds, color="grey", ls=":", lw=1)
        ax.set_xlabel("number of nodes n")
        ax.set_ylabel("seconds per call")
        ax.set_title("GLD closed forms vs GW solvers (CPU)")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)
        written.append(_save(fig, directory, "time_vs_n.png"))

    pairs = _by_pair(results.rows, "agreement")
    surrogates = [m for m in SURROGATES if any(m in p for p in pairs.values())]
    if pairs:
        levels = list(settings.levels)
        cols = 3
        rows_ = math.ceil(len(levels) / cols)
        for method in surrogates if settings.per_level_plots else ():
            fig, axes = plt.subplots(rows_, cols, figsize=(9, 2.8 * rows_), squeeze=False)
            for ax, level in zip(axes.flat, levels):
                chosen = [p for p in pairs.values() if p[EXACT]["similarity"] == level]
                xs, ys = [p[EXACT]["value"] for p in chosen], [p[method]["value"] for p in chosen]
                ax.scatter(xs, ys, s=6, alpha=0.6)
                ax.set_title(level, fontsize=9)
                ax.tick_params(labelsize=7)
                if xs and min(xs) > 0 and min(ys) > 0:  # heavy-tailed values: log axes unless a value is 0
                    ax.set_xscale("log")
                    ax.set_yscale("log")
                else:
                    ax.ticklabel_format(style="sci", scilimits=(-3, 4), axis="both")
            for ax in list(axes.flat)[len(levels):]:
                ax.axis("off")
            fig.supxlabel("reference GW₂ (POT CG, best of two inits)", fontsize=9)
            fig.supylabel(TITLES[method], fontsize=9)
            written.append(_save(fig, directory, f"scatter_{method}.png"))
        written.append(_pooled_scatter(plt, pairs, levels, directory))
    return written


def _pooled_scatter(plt, pairs: Dict[int, Dict[str, Dict]], levels: Sequence[str], directory: str) -> str:
    """GLD's values against the reference over all levels (log-log; pairs at GW₂ = 0 are left out)."""
    methods = (GLD_L1, LOWER_BOUND, GLD_GW1D)
    fig, axes = plt.subplots(1, len(methods), figsize=(10.5, 3.4), squeeze=False)
    zero = ZERO_FRACTION * max(p[EXACT]["value"] for p in pairs.values())
    for ax, method in zip(axes.flat, methods):
        for level in levels:
            chosen = [p for p in pairs.values() if p[EXACT]["similarity"] == level and p[EXACT]["value"] > zero]
            if chosen:
                ax.scatter([p[EXACT]["value"] for p in chosen], [p[method]["value"] for p in chosen], s=5,
                           alpha=0.6, label=level)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("reference GW₂", fontsize=8)
        ax.set_title(TITLES[method], fontsize=9)
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=6, markerscale=2)
    return _save(fig, directory, "scatter_pooled.png")


def _save(fig, directory: str, name: str) -> str:
    path = os.path.join(directory, name)
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path
