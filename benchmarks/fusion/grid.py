"""The arms of the fusion experiment and one student run per (arm, seed).

A student run: a tiny Llama (Unigram tokenizer) trained from a seed on the few training documents of every
domain, with the InfiGFusion objective of its arm against the two teachers' cached outputs (exactly what
:class:`~infigw.train.FusionTrainer` computes per step: :class:`~infigw.train.FusionObjective`), then evaluated
on the held-out documents: bits per character per domain, and the structural (GLD) and token-level (ULD)
distances to each teacher.
"""
import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from infigw import InfiGFusionLoss, functional
from infigw.train import FusionCollator, FusionObjective, shifted_targets
from infigw.train.metrics import bits_per_character
from infigw.train.toy import tiny_llama

from . import corpus
from .assets import Assets, pad_outputs

# The structural distance reported for every arm (whatever the arm trains with): GLD with scale-free node values
# on k x k rank graphs, the mean over the held-out documents and the teachers.
METRIC_GLD = dict(k=10, values="topk_probs", nodes="rank", graph_norm="mean", distance="l1")


@dataclass(frozen=True)
class Arm:
    name: str
    group: str  # what the arm varies (for the table and the plots)
    options: Dict = field(default_factory=dict)  # InfiGFusionLoss options


def _gld(group, name, **options):
    """A GLD arm; the sorted-degree distance is the paper's sum ("l1") unless given, whatever the defaults."""
    return Arm(name, group, {"distance": "l1", **options})


BASELINES = [
    Arm("CE", "baseline", dict(lam=0.0)),
    Arm("CE+ULD", "baseline", dict(gamma=0.0)),
    Arm("defaults: InfiGFusionLoss()", "defaults", {}),
    Arm("CE+ULD top-10", "uld", dict(gamma=0.0, uld_top_k=10)),
]
VALUES = [_gld("values x nodes", "GLD logits/vocab", values="logits", nodes="vocab")] + [
    _gld("values x nodes", f"GLD {values}/{nodes}", values=values, nodes=nodes)
    for values in ("probs", "topk_probs") for nodes in ("vocab", "rank")
]
NORMS = [_gld("graph_norm", "GLD probs/vocab/cosine", values="probs", graph_norm="cosine"),
         _gld("graph_norm", "GLD logits/vocab/cosine", values="logits", graph_norm="cosine")]
NUM_NODES = [_gld("num_nodes", "GLD probs/vocab k nodes", values="probs", num_nodes=10)]
GAMMAS = [_gld("gamma", f"GLD topk_probs/rank gamma={g}", values="topk_probs", nodes="rank", gamma=g)
          for g in (0.1, 0.3, 3.0)]
LAMBDAS = [Arm("CE+ULD lam=0.25", "lambda", dict(gamma=0.0, lam=0.25)),
           _gld("lambda", "GLD topk_probs/rank lam=0.25", values="topk_probs", nodes="rank", lam=0.25)]
PAPER = [_gld("paper", "paper (logits/rank/sum, ULD top-10)", values="logits", nodes="rank", graph_norm="sum",
              uld_top_k=10)]
PAIRING = [Arm("CE+ULD offsets", "pairing", dict(gamma=0.0, pairing="offsets")),
           Arm("defaults, offsets pairing", "pairing", dict(pairing="offsets"))]
WEIGHTS = [Arm("CE+ULD uncertainty", "teacher weights", dict(gamma=0.0, teacher_weights="uncertainty")),
           _gld("teacher weights", "GLD topk_probs/rank uncertainty", values="topk_probs", nodes="rank",
                teacher_weights="uncertainty")]

FULL_ARMS = BASELINES + VALUES + NORMS + NUM_NODES + GAMMAS + LAMBDAS + PAPER + WEIGHTS + PAIRING
QUICK_ARMS = BASELINES[:3] + [VALUES[0]] + PAPER


@dataclass
class RunResult:
    arm: str
    group: str
    seed: int
    bpc: float  # held-out bits per character, all domains
    bpc_by_domain: Dict[str, float]
    gld_distance: float  # METRIC_GLD to the teachers (mean over teachers and documents)
    uld_distance: float
    seconds: float  # wall time
    cpu_seconds: float  # CPU time of the run's process (what the run costs on a machine shared with others)
    history: List[Dict[str, float]]  # logged components during training


def _student_batch(collator, assets: Assets, indices):
    return collator([{"text": assets.train_texts[i]} for i in indices])


@torch.no_grad()
def _distances(model, assets: Assets) -> tuple:
    """(GLD at METRIC_GLD, full-vocabulary ULD) between the student and each teacher on held-out documents."""
    texts = [t for d in corpus.DOMAINS for t in assets.eval_texts[d]]
    collator = FusionCollator(assets.student_tokenizer, max_length=assets.scale.max_length)
    gld, uld, count = 0.0, 0.0, 0
    for start in range(0, len(texts), 32):
        indices = list(range(start, min(start + 32, len(texts))))
        inputs = collator([{"text": texts[i]} for i in indices])
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
        targets = shifted_targets(inputs["labels"])
        for teacher in assets.teachers:
            teacher_logits, teacher_targets, _ = pad_outputs(teacher.eval_outputs, indices)
            common = dict(teacher_labels=teacher_targets, reduction="sum")
            gld += float(functional.gld_loss(logits, teacher_logits, targets, **METRIC_GLD, **common))
            uld += float(functional.uld_loss(logits, teacher_logits, targets, **common))
        count += len(indices)
    scale = count * len(assets.teachers)
    return gld / scale, uld / scale


def run_student(arm: Arm, seed: int, assets: Assets, lr: float = 3e-3, log_every: int = 10) -> RunResult:
    """Train one student for ``arm`` from ``seed`` and evaluate it."""
    started, cpu_started = time.perf_counter(), time.process_time()
    scale = assets.scale
    model = tiny_llama(len(assets.student_tokenizer), hidden=scale.student_hidden, layers=scale.student_layers,
                       heads=4, seed=1000 + seed)
    objective = FusionObjective(InfiGFusionLoss(**arm.options), [t.name for t in assets.teachers])
    collator = FusionCollator(assets.student_tokenizer, max_length=scale.max_length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = scale.student_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    generator = torch.Generator().manual_seed(seed)
    order: List[int] = []
    history, window = [], []
    model.train()
    for step in range(steps):
        if len(order) < scale.batch:
            order += torch.randperm(len(assets.train_texts), generator=generator).tolist()
        chosen, order = order[:scale.batch], order[scale.batch:]
        inputs = _student_batch(collator, assets, chosen)
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        teachers = [pad_outputs(t.train_outputs, chosen) for t in assets.teachers]
        terms = objective(logits, inputs, teachers)
        terms.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        window.append({**{k: float(v) for k, v in terms.logs.items()}, "loss": float(terms.loss.detach()),
                       "grad_norm": float(grad_norm)})
        if (step + 1) % log_every == 0:
            history.append({"step": step + 1, **{k: sum(w[k] for w in window) / len(window) for k in window[0]}})
            window = []
    model.eval()
    by_domain = {d: bits_per_character(model, assets.student_tokenizer, assets.eval_texts[d], scale.max_length)
                 for d in corpus.DOMAINS}
    chars = {d: sum(len(t) for t in assets.eval_texts[d]) for d in corpus.DOMAINS}
    overall = sum(by_domain[d] * chars[d] for d in corpus.DOMAINS) / sum(chars.values())
    gld, uld = _distances(model, assets)
    return RunResult(arm.name, arm.group, seed, overall, by_domain, gld, uld, time.perf_counter() - started,
                     time.process_time() - cpu_started, history)


def arm_by_name(name: str, arms: Optional[List[Arm]] = None) -> Arm:
    for arm in arms or FULL_ARMS:
        if arm.name == name:
            return arm
    raise KeyError(name)


# Parallel runs (python -m benchmarks.fusion --jobs N): each worker process loads the cached assets once.
_WORKER_ASSETS: Optional[Assets] = None


def worker_setup(scale, cache: str, threads: int) -> None:
    global _WORKER_ASSETS
    from pathlib import Path

    from .assets import build

    torch.set_num_threads(threads)
    _WORKER_ASSETS = build(scale, Path(cache))


def worker_run(arm: Arm, seed: int) -> RunResult:
    return run_student(arm, seed, _WORKER_ASSETS)
