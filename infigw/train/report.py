"""The report of a ``python -m infigw.fuse`` run: Markdown, PNG plots of the loss components, the raw logs."""
import json
from pathlib import Path
from typing import Dict, List, Optional

from .metrics import bits_per_character

COMPONENTS = ("loss", "ce", "uld", "gld", "weights")


def evaluate(config: dict, texts: List[str], model_class, tokenizer_class) -> Dict[str, Dict[str, float]]:
    """Held-out bits per character of the pivot before and after fusion, and of each teacher."""
    max_length = config["data"]["max_length"]
    models = {"pivot (before)": config["student"], "fused pivot": config["output"] / "model"}
    models.update({f"teacher {t['name']}": t["model"] for t in config["teachers"] if t["model"] is not None})
    tokenizers = {f"teacher {t['name']}": t["tokenizer"] for t in config["teachers"]}
    result = {}
    for name, path in models.items():
        model = model_class.from_pretrained(path)
        tokenizer = tokenizer_class.from_pretrained(tokenizers.get(name, path))
        result[name] = bits_per_character(model, tokenizer, texts, max_length)
    return result


def _series(history: List[dict], prefix: str) -> Dict[str, tuple]:
    """{key: (steps, values)} of the logged keys equal to ``prefix`` or starting with ``prefix/``."""
    series: Dict[str, tuple] = {}
    for entry in history:
        for key, value in entry.items():
            if key == prefix or key.startswith(prefix + "/"):
                steps, values = series.setdefault(key, ([], []))
                steps.append(entry["step"])
                values.append(value)
    return series


def plot(histories: Dict[str, List[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(COMPONENTS), figsize=(4 * len(COMPONENTS), 3.6))
    for run, history in histories.items():
        for axis, component in zip(axes, COMPONENTS):
            for key, (steps, values) in _series(history, component).items():
                label = key if len(histories) == 1 else f"{run}: {key}"
                axis.plot(steps, values, label=label)
    for axis, component in zip(axes, COMPONENTS):
        axis.set_title(component)
        axis.set_xlabel("step")
        if axis.lines:
            axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(output: Path, config: dict, histories: Dict[str, List[dict]],
          evaluation: Optional[Dict[str, float]]) -> Path:
    """Write report.md, loss_components.png and log_history.json into ``output``; returns the report's path."""
    (output / "log_history.json").write_text(json.dumps(histories, indent=1))
    plot(histories, output / "loss_components.png")
    lines = [f"# Fusion report: {config['strategy']}", "",
             f"- pivot: `{config['student']}`; fused model: `{output / 'model'}`",
             "- teachers: " + ", ".join(f"{t['name']} (`{t['model'] or t['store']}`)" for t in config["teachers"]),
             f"- objective: `{config['objective'] or 'defaults'}`; training: `{config['training']}`"]
    if config["strategy"] == "pairwise":
        lines.append(f"- merge: `{config['merge'] or {'method': 'rsaf'}}` over `{output / 'pairwise'}`")
    lines += ["", "## Loss components (last logged values)", "", "| run | component | value |", "|---|---|---|"]
    for run, history in histories.items():
        for component in COMPONENTS:
            for key, (_, values) in _series(history, component).items():
                lines.append(f"| {run} | {key} | {values[-1]:.4g} |")
    lines += ["", "![loss components](loss_components.png)"]
    if evaluation:
        lines += ["", "## Held-out bits per character", "", "| model | bits/char |", "|---|---|"]
        lines += [f"| {name} | {value:.4f} |" for name, value in evaluation.items()]
    path = output / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
