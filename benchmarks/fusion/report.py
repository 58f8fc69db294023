"""The fusion experiment's table (Markdown) and plots (PNG) from its ``runs.json``.

Intervals are 95% Student-t intervals over seeds; "Δ vs CE+ULD" is the paired difference (same seed, same data
order) to the CE+ULD arm, so a negative Δ whose interval excludes 0 means the arm trains a better student.
"""
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

REFERENCE = "CE+ULD"


def _interval(values: List[float]):
    """(mean, half-width of the 95% t interval); half-width NaN for one value."""
    from scipy.stats import t

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t.ppf(0.975, n - 1) * sd / math.sqrt(n)


def _fmt(mean, half, digits=3):
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def _by_arm(runs) -> Dict[str, List[dict]]:
    grouped = defaultdict(list)
    for run in runs:
        grouped[run["arm"]].append(run)
    return grouped


def _final(run, prefix: str) -> float:
    """The last logged value of a component, summed over teachers (0 if never logged)."""
    last = run["history"][-1] if run["history"] else {}
    return sum(v for k, v in last.items() if k.startswith(prefix + "/"))


def summary_rows(runs):
    """One row per arm: means and intervals."""
    arms = _by_arm(runs)
    reference = {r["seed"]: r["bpc"] for r in arms.get(REFERENCE, [])}
    rows = []
    for name, group in arms.items():
        bpc = _interval([r["bpc"] for r in group])
        paired = [r["bpc"] - reference[r["seed"]] for r in group if r["seed"] in reference]
        delta = _interval(paired) if paired and name != REFERENCE else (float("nan"), float("nan"))
        rows.append({"arm": name, "group": group[0]["group"], "seeds": len(group), "bpc": bpc, "delta": delta,
                     "gld_distance": _interval([r["gld_distance"] for r in group]),
                     "uld_distance": _interval([r["uld_distance"] for r in group]),
                     "ce_end": _interval([r["history"][-1]["ce"] for r in group]),
                     "uld_end": _interval([_final(r, "uld") for r in group]),
                     "gld_end": _interval([_final(r, "gld") for r in group]),
                     "seconds": sum(r["seconds"] for r in group) / len(group)})
    return rows


def table(runs, arms_options: Dict[str, dict]) -> str:
    lines = ["| arm | options | held-out bits/char | Δ vs CE+ULD (paired) | GLD distance to teachers | "
             "ULD distance | training terms at the end: CE / ULD / GLD (Σ teachers) | s/run |",
             "|---|---|---|---|---|---|---|---|"]
    for row in summary_rows(runs):
        options = ", ".join(f"{k}={v}" for k, v in arms_options.get(row["arm"], {}).items()) or "—"
        delta = "—" if math.isnan(row["delta"][0]) else _fmt(*row["delta"])
        terms = " / ".join(f"{row[key][0]:.3g}" for key in ("ce_end", "uld_end", "gld_end"))
        lines.append(f"| {row['arm']} | {options} | {_fmt(*row['bpc'])} | {delta} | {_fmt(*row['gld_distance'])} | "
                     f"{_fmt(*row['uld_distance'])} | {terms} | {row['seconds']:.0f} |")
    return "\n".join(lines)


def domain_table(runs, domains) -> str:
    lines = ["| arm | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for name, group in _by_arm(runs).items():
        cells = [_fmt(*_interval([r["bpc_by_domain"][d] for r in group])) for d in domains]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(runs, out: Path) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary_rows(runs)
    names = [r["arm"] for r in rows]
    files = []
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    ax.errorbar([r["bpc"][0] for r in rows], range(len(rows)), xerr=[r["bpc"][1] for r in rows], fmt="o")
    ax.set_yticks(range(len(rows)), names, fontsize=8)
    ax.invert_yaxis()
    reference = [r for r in rows if r["arm"] == REFERENCE]
    if reference:
        ax.axvline(reference[0]["bpc"][0], color="grey", linestyle="--", label=REFERENCE)
        ax.legend()
    ax.set_xlabel("held-out bits per character (mean, 95% CI over seeds)")
    fig.tight_layout()
    fig.savefig(out / "fusion_bpc.png", dpi=110)
    plt.close(fig)
    files.append("fusion_bpc.png")

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in rows:
        ax.errorbar(r["gld_distance"][0], r["bpc"][0], xerr=r["gld_distance"][1], yerr=r["bpc"][1], fmt="o")
        ax.annotate(r["arm"], (r["gld_distance"][0], r["bpc"][0]), fontsize=6)
    ax.set_xlabel("GLD distance to the teachers (held-out, topk_probs/rank/mean)")
    ax.set_ylabel("held-out bits per character")
    fig.tight_layout()
    fig.savefig(out / "fusion_distance.png", dpi=110)
    plt.close(fig)
    files.append("fusion_distance.png")

    arms = _by_arm(runs)
    key_arms = ("CE", REFERENCE, "defaults: InfiGFusionLoss()", "GLD logits/vocab",
                "paper (logits/rank/sum, ULD top-10)", "GLD topk_probs/rank", "GLD probs/vocab", "CE+ULD offsets")
    shown = ([n for n in key_arms if n in arms] + [n for n in names if n not in key_arms])[:8]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for name in shown:
        history = arms[name][0]["history"]  # seed 0
        steps = [h["step"] for h in history]
        axes[0].plot(steps, [h["ce"] for h in history], label=name)
        axes[1].plot(steps, [sum(v for k, v in h.items() if k.startswith("uld/")) for h in history])
        axes[2].plot(steps, [sum(v for k, v in h.items() if k.startswith("gld/")) for h in history])
    for axis, title in zip(axes, ("CE (train)", "ULD (Σ teachers)", "GLD (Σ teachers)")):
        axis.set_title(title)
        axis.set_xlabel("step")
    axes[2].set_yscale("symlog", linthresh=1e-3)
    fig.legend(fontsize=6, loc="lower center", ncol=4)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(out / "fusion_components.png", dpi=110)
    plt.close(fig)
    files.append("fusion_components.png")
    return files


def save(out: Path, meta: dict, runs: List[dict]) -> None:
    """Write runs.json atomically."""
    tmp = out / "runs.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    tmp.replace(out / "runs.json")


def combine(parts: List[Path], out: Path) -> None:
    """Gather the runs of several finished runs (same scale) into ``out``/runs.json."""
    loaded = [json.loads((part / "runs.json").read_text()) for part in parts]
    meta = dict(loaded[0]["meta"])
    if any(data["meta"]["scale"] != meta["scale"] for data in loaded):
        raise ValueError("the runs to combine were made at different scales")
    meta["arms"] = [arm for data in loaded for arm in data["meta"]["arms"]]
    meta["command"] = " ; ".join(data["meta"]["command"] for data in loaded)
    meta["total_seconds"] = max(data["meta"]["total_seconds"] for data in loaded)
    meta["note"] = f"{len(parts)} processes in parallel"
    out.mkdir(parents=True, exist_ok=True)
    save(out, meta, [run for data in loaded for run in data["runs"]])


def render(out: Path) -> str:
    data = json.loads((out / "runs.json").read_text())
    meta, runs = data["meta"], data["runs"]
    from .grid import FULL_ARMS

    # the options as the grid names them now (older runs.json files may leave defaults implicit)
    arms_options = {**{a["name"]: a["options"] for a in meta["arms"]}, **{a.name: a.options for a in FULL_ARMS}}
    from .corpus import DOMAINS

    files = plots(runs, out)
    teachers = " · ".join(f"{name}: " + ", ".join(f"{d} {v:.3f}" for d, v in bpc.items())
                          for name, bpc in meta["teacher_bpc"].items())
    text = "\n".join([
        f"Fusion experiment ({meta['mode']}): {meta['date']}, commit {meta['commit']}, {meta['machine']}.",
        f"Command: `{meta['command']}`; total {meta['total_seconds']:.0f} s (teachers and caches: "
        f"{meta['setup_seconds']:.0f} s).",
        f"Teachers' held-out bits/char per domain — {teachers}.",
        "",
        table(runs, arms_options),
        "",
        "Held-out bits per character by domain:",
        "",
        domain_table(runs, DOMAINS),
        "",
        "Plots: " + ", ".join(files),
    ])
    (out / "summary.md").write_text(text + "\n")
    return text
