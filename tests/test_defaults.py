"""The loss defaults (bounded, scale-free GLD) and the named settings (``preset="paper"``)."""
import pytest
import torch

import infigw
import infigw.functional as F
from infigw.losses import PRESETS, preset_options

from .helpers import assert_close


def test_paper_preset_sets_the_paper_literal_options_and_explicit_options_win():
    gld = infigw.GLDLoss(preset="paper")
    assert {k: gld.options[k] for k in ("values", "nodes", "graph_norm", "k")} == {
        "values": "logits", "nodes": "rank", "graph_norm": "sum", "k": 10}
    fusion = infigw.InfiGFusionLoss(preset="paper", gamma=0.25)
    assert fusion.options["uld_top_k"] == 10 and fusion.options["gamma"] == 0.25
    assert infigw.ULDLoss(preset="paper").options["top_k"] == 10
    assert "preset='paper'" in repr(fusion) and "gamma=0.25" in repr(fusion)


def test_a_preset_module_equals_the_functional_with_the_preset_options():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 7, 30, generator=generator), torch.randn(2, 9, 40, generator=generator)
    labels = torch.randint(0, 30, (2, 7), generator=generator)
    teacher_labels = torch.randint(0, 40, (2, 9), generator=generator)
    module = infigw.InfiGFusionLoss(preset="paper")(student, teacher, labels, teacher_labels=teacher_labels)
    functional = F.infigfusion_loss(student, teacher, labels, teacher_labels=teacher_labels,
                                    **preset_options("paper", F.infigfusion_loss))
    assert_close(module, functional, name="paper preset")
    assert set(preset_options("paper", F.gld_loss)) <= set(PRESETS["paper"]) - {"uld_top_k", "top_k", "lam"}


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match=r"preset must be one of \['paper'\]"):
        infigw.GLDLoss(preset="papr")


def test_mean_l1_is_the_sorted_l1_per_node_of_each_pair():
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(3, 6, 40, generator=generator), torch.randn(3, 9, 50, generator=generator)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[2, 3:] = False  # fewer positions: fewer touched vocabulary nodes in that graph
    common = dict(mask=mask, teacher_mask=torch.ones(3, 9, dtype=torch.bool), k=4, reduction="none")
    for nodes in ("vocab", "rank"):
        l1 = F.gld_loss(student, teacher, nodes=nodes, distance="l1", **common)
        mean = F.gld_loss(student, teacher, nodes=nodes, distance="mean_l1", **common)
        if nodes == "rank":
            n = torch.full((3,), 4.0)
        else:
            touched = [F.coactivation_degrees(x, mask=m, k=4, nodes="vocab").touched.sum(-1)
                       for x, m in ((student, mask), (teacher, common["teacher_mask"]))]
            n = torch.maximum(*touched).float()
        assert_close(mean, l1 / n, name=f"mean_l1, {nodes} nodes")


def test_default_terms_are_bounded_whatever_the_logit_scale_and_the_paper_reading_is_not():
    """The default GLD (top-k probabilities, k rank nodes, per-node L1) lies in [0, 2/k] for any logits, so with
    gamma = 1 it never swamps CE and ULD; the paper-literal reading grows with the logits' scale and offset."""
    generator = torch.Generator().manual_seed(2)
    student = torch.randn(2, 12, 64, generator=generator) * 30 + 200
    teacher = torch.randn(2, 15, 80, generator=generator) * 5 - 40
    default = F.gld_loss(student, teacher, reduction="none")
    assert (default >= 0).all() and (default <= 2 / 10).all()
    paper = F.gld_loss(student, teacher, reduction="none", **preset_options("paper", F.gld_loss))
    assert (paper > 1e4).all()
    labels = torch.randint(0, 64, (2, 12), generator=generator)
    teacher_labels = torch.randint(0, 80, (2, 15), generator=generator)
    _, parts = infigw.InfiGFusionLoss(return_components=True)(student, teacher, labels,
                                                               teacher_labels=teacher_labels)
    assert parts["gld"].max() <= 0.2 < parts["ce"]
