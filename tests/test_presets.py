"""Named settings of the loss modules (``preset="paper"``) and the functional form of a preset."""
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
