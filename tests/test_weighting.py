"""Teacher weights of the multi-source losses: uncertainty measures, granularity, alignment, gradients, errors."""
import pytest
import torch

import infigw
import infigw.functional as F
from infigw import weighting

from .helpers import assert_close


def logits(*shape, seed=0, dtype=torch.float32, scale=2.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def confident_on(gold, vocab, margin=6.0, seed=0):
    """(B, T', V) logits whose argmax is ``gold`` with a large margin (invalid gold ids are clamped)."""
    base = logits(*gold.shape, vocab, seed=seed, scale=0.5)
    return base.scatter_add(-1, gold.clamp_min(0).unsqueeze(-1), torch.full((*gold.shape, 1), margin))


def entropy_of_top(row, k, temperature=1.0):
    q = torch.softmax(torch.topk(row.double(), k).values / temperature, -1)
    return float(-(q * q.log()).sum())


def sorted_l1(p, q):
    width = max(p.numel(), q.numel())
    p = torch.nn.functional.pad(p.sort(descending=True).values, (0, width - p.numel()))
    q = torch.nn.functional.pad(q.sort(descending=True).values, (0, width - q.numel()))
    return float((p - q).abs().sum())


# ------------------------------------------------------------------------------------------------ measures
def test_position_nll_dense_is_the_cross_entropy():
    teacher, gold = logits(2, 5, 13, seed=1), torch.randint(0, 13, (2, 5), generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.cross_entropy((teacher / 0.7).reshape(-1, 13), gold.reshape(-1), reduction="none")
    assert_close(weighting.position_nll(teacher, gold, 4, 0.7), expected.view(2, 5), name="dense NLL")


@pytest.mark.parametrize("with_logsumexp", [True, False])
def test_position_nll_of_records_uses_kept_ids_and_bounds_missing_gold(with_logsumexp):
    teacher = logits(1, 2, 12, seed=2)
    record = infigw.TopKRecord.from_logits(teacher, 3, temperature=0.5, with_logsumexp=with_logsumexp)
    order = teacher[0].argsort(-1, descending=True)
    gold = torch.stack([order[0, 1], order[1, 7]]).unsqueeze(0)  # kept at position 0, not kept at position 1
    log_p = torch.log_softmax(teacher[0].double() / 0.5, -1)
    if with_logsumexp:  # exact kept probabilities; the missing gold is bounded by min(p_min, mass left)
        kept = log_p.gather(-1, order[:, :3])
        bound = torch.minimum(kept[1].min(), torch.log1p(-kept[1].exp().sum()))
        expected = torch.stack([-kept[0, 1], -bound])
    else:  # renormalised over the kept entries; the missing gold is bounded by the smallest kept probability
        kept = torch.log_softmax(teacher[0].double().gather(-1, order[:, :3]) / 0.5, -1)
        expected = torch.stack([-kept[0, 1], -kept[1].min()])
    assert_close(weighting.position_nll(record, gold, 3, 0.5)[0], expected, name="record NLL")


def test_record_entropy_matches_dense_entropy():
    teacher = logits(2, 4, 20, seed=3)
    record = infigw.TopKRecord.from_logits(teacher, 6)
    assert_close(weighting.position_entropy(record, None, 4, 1.3), weighting.position_entropy(teacher, None, 4, 1.3),
                 name="entropy of a record")
    assert_close(weighting.position_entropy(teacher, None, 4, 1.3)[1, 2], entropy_of_top(teacher[1, 2], 4, 1.3),
                 name="entropy formula")


# ------------------------------------------------------------------------------------------------ sequence level
def test_sequence_weights_sum_to_one_over_present_teachers_and_favour_the_sharp_one():
    student = logits(3, 6, 20, seed=4)
    sharp, flat, other = logits(3, 6, 20, seed=5, scale=8.0), logits(3, 6, 20, seed=6, scale=0.1), logits(3, 9, 25)
    other_mask = torch.ones(3, 9, dtype=torch.bool)
    other_mask[1] = False  # absent from sequence 1
    for loss_fn in (F.uld_loss, F.gld_loss):
        _, parts = loss_fn(student, [sharp, flat, other], teacher_mask=[None, None, other_mask],
                           teacher_weights="uncertainty", return_components=True)
        weights = parts["weights"]
        assert_close(weights.sum(0), torch.ones(3), name=f"{loss_fn.__name__} weights sum to 1")
        assert weights[2, 1] == 0 and (weights[:, 1][:2] > 0).all(), "an absent teacher gets 0"
        assert (weights[0] > weights[1]).all(), "the confident (low-entropy) teacher gets more weight"
        assert not weights.requires_grad


@pytest.mark.parametrize("as_record", [False, True])
def test_nll_weights_favour_the_teacher_that_predicts_its_gold_tokens(as_record):
    gen = torch.Generator().manual_seed(7)
    student, labels = logits(2, 6, 20, seed=8), torch.randint(0, 20, (2, 6), generator=gen)
    right_labels = torch.randint(0, 30, (2, 8), generator=gen)  # another tokenizer: 8 positions, 30 ids
    right_labels[0, :2] = -100
    right = confident_on(right_labels, 30, seed=9)
    wrong = confident_on(torch.randint(0, 20, (2, 6), generator=gen), 20, seed=10)  # confident, other tokens
    teachers = [right, wrong]
    if as_record:
        teachers = [infigw.TopKRecord.from_logits(t, 5) for t in teachers]
    _, parts = F.uld_loss(student, teachers, labels, teacher_labels=[right_labels, None], teacher_weights="nll",
                          weight_k=5, return_components=True)
    assert_close(parts["weights"].sum(0), torch.ones(2), name="nll weights sum to 1")
    assert (parts["weights"][0] > 0.9).all(), f"the teacher that predicts its gold tokens wins: {parts['weights']}"
    # the label-free measure cannot tell the two confident teachers apart this clearly
    _, free = F.uld_loss(student, teachers, labels, teacher_labels=[right_labels, None], weight_k=5,
                         teacher_weights="uncertainty", return_components=True)
    assert (free["weights"][0] < parts["weights"][0]).all()


def test_weight_temperature_sharpens_and_flattens():
    student, sharp, flat = logits(2, 5, 20, seed=11), logits(2, 5, 20, seed=12, scale=8.0), logits(2, 5, 20, seed=13)
    weights = {tau: F.uld_loss(student, [sharp, flat], teacher_weights="uncertainty", weight_temperature=tau,
                               return_components=True)[1]["weights"] for tau in (1e-3, 1.0, 1e3)}
    assert_close(weights[1e-3], torch.tensor([[1.0, 1.0], [0.0, 0.0]]), atol=1e-6, name="tau_w -> 0: one-hot")
    assert_close(weights[1e3], torch.full((2, 2), 0.5), atol=1e-2, name="tau_w -> inf: uniform")
    assert (weights[1.0][0] > 0.5).all() and (weights[1.0][0] < 1).all()


# ------------------------------------------------------------------------------------------------ token level
def test_token_weights_sum_to_one_per_position_and_follow_per_position_confidence():
    student = logits(2, 6, 20, seed=14)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    # teacher a is sharp on its even positions, teacher b (5 positions) on its odd ones
    scale_a = torch.tensor([8.0, 0.05] * 4).view(1, 8, 1)
    scale_b = torch.tensor([0.05, 8.0] * 2 + [0.05]).view(1, 5, 1)
    a, b = logits(2, 8, 20, seed=15, scale=1.0) * scale_a, logits(2, 5, 24, seed=16, scale=1.0) * scale_b
    a_mask = torch.ones(2, 8, dtype=torch.bool)
    _, parts = F.uld_loss(student, [a, b], mask=mask, teacher_mask=[a_mask, torch.ones(2, 5, dtype=torch.bool)],
                          teacher_weights="uncertainty", weight_granularity="token", return_components=True)
    token = parts["token_weights"]
    assert token.shape == (2, 2, 6)
    assert_close(token.sum(0), mask.float(), name="token weights sum to 1 at valid student positions, 0 elsewhere")
    # sequence 0: student position t pairs with a[t] and, for t < 5, with b[t]; position 5 only has teacher a
    assert token[1, 0, 5] == 0 and token[0, 0, 5] == 1
    assert (token[0, 0, [0, 2, 4]] > 0.5).all() and (token[1, 0, [1, 3]] > 0.5).all(), token[:, 0]
    # the (S, B) weights are the teachers' shares of the covered positions
    assert_close(parts["weights"], token.sum(-1) / mask.sum(-1), name="pooled weights")
    assert_close(parts["weights"].sum(0), torch.ones(2), name="pooled weights sum to 1")


def test_token_uld_equals_a_direct_loop():
    student = logits(2, 5, 9, seed=17)
    teachers = [logits(2, 6, 11, seed=18, scale=3.0), logits(2, 4, 7, seed=19, scale=1.0)]
    mask = torch.tensor([[1, 0, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)
    teacher_masks = [torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool),
                     torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)]
    k, temperature, tau = 3, 1.5, 0.7
    out = F.uld_loss(student, teachers, mask=mask, teacher_mask=teacher_masks, temperature=temperature,
                     teacher_weights="uncertainty", weight_k=k, weight_temperature=tau, weight_granularity="token",
                     reduction="none")
    expected = []
    for b in range(2):
        s_pos = mask[b].nonzero().flatten().tolist()
        t_pos = [m[b].nonzero().flatten().tolist() for m in teacher_masks]
        total, covered = 0.0, 0
        for i, s in enumerate(s_pos):
            present = [j for j in range(2) if i < len(t_pos[j])]
            if not present:
                continue
            covered += 1
            scores = torch.tensor([-entropy_of_top(teachers[j][b, t_pos[j][i]], k, temperature) / tau for j in present])
            for w, j in zip(torch.softmax(scores, 0).tolist(), present):
                p = torch.softmax(student[b, s].double() / temperature, -1)
                q = torch.softmax(teachers[j][b, t_pos[j][i]].double() / temperature, -1)
                total += w * sorted_l1(p, q)
        expected.append(total / max(covered, 1))
    assert_close(out, torch.tensor(expected), atol=1e-5, name="token-weighted ULD")


def test_uniform_token_weights_equal_sequence_weights_when_every_position_pairs():
    student, teachers = logits(2, 5, 12, seed=20), [logits(2, 5, 12, seed=21), logits(2, 5, 15, seed=22)]
    for spec in (None, [0.3, 1.2]):
        kwargs = dict(teacher_weights=spec, reduction="none")
        assert_close(F.uld_loss(student, teachers, weight_granularity="token", **kwargs),
                     F.uld_loss(student, teachers, **kwargs), atol=1e-6, name=f"ULD {spec}")
        assert_close(F.gld_loss(student, teachers, k=3, weight_granularity="token", **kwargs),
                     F.gld_loss(student, teachers, k=3, **kwargs), atol=1e-6, name=f"GLD {spec}")


def test_gld_token_granularity_uses_pooled_weights_and_batch_scope():
    student, teachers = logits(2, 6, 16, seed=23), [logits(2, 6, 16, seed=24, scale=6.0), logits(2, 3, 16, seed=25)]
    masks = [None, torch.ones(2, 3, dtype=torch.bool)]
    loss, parts = F.gld_loss(student, teachers, k=3, teacher_mask=masks, teacher_weights="uncertainty",
                             weight_granularity="token", reduction="none", return_components=True)
    assert_close(parts["weights"], parts["token_weights"].sum(-1) / 6, name="mean over covered positions")
    assert_close(loss, (parts["weights"] * parts["gld"]).sum(0), name="weighted GLD")
    _, batch = F.gld_loss(student, teachers, k=3, teacher_mask=masks, scope="batch", teacher_weights="uncertainty",
                          weight_granularity="token", return_components=True)
    assert batch["weights"].shape == (2, 1)
    assert_close(batch["weights"][:, 0], parts["token_weights"].sum((1, 2)) / 12, name="batch-scope pooled weights")
    _, sequence = F.gld_loss(student, teachers, k=3, teacher_mask=masks, scope="batch", teacher_weights="uncertainty",
                             return_components=True)
    assert_close(sequence["weights"].sum(0), torch.ones(1), name="batch-scope weights, teachers of different lengths")


def test_infigfusion_token_weights_combine_token_uld_and_sequence_gld():
    gen = torch.Generator().manual_seed(4)
    student, labels = logits(2, 5, 14, seed=26), torch.randint(0, 14, (2, 5), generator=gen)
    labels[0, 0] = -100
    other_labels = torch.randint(0, 18, (2, 7), generator=gen)
    other_labels[1, 5:] = -100
    teachers = [logits(2, 5, 14, seed=27, scale=5.0), logits(2, 7, 18, seed=28)]
    common = dict(teacher_labels=[None, other_labels], teacher_weights="nll", weight_granularity="token")
    loss, parts = F.infigfusion_loss(student, teachers, labels, lam=0.4, gamma=1.5, k=3, return_components=True,
                                     **common)
    uld, uld_parts = F.uld_loss(student, teachers, labels, weight_k=3, reduction="none", return_components=True,
                                **common)
    gld = F.gld_loss(student, teachers, labels, k=3, reduction="none", **common)
    assert_close(loss, 0.6 * parts["ce"] + 0.4 * (uld + 1.5 * gld).mean(), atol=1e-5, name="objective")
    assert_close(parts["token_weights"], uld_parts["token_weights"], name="token weights")
    assert_close(parts["weights"].sum(0), torch.ones(2), name="pooled weights sum to 1")


# ------------------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("spec", ["uncertainty", "nll"])
@pytest.mark.parametrize("granularity", ["sequence", "token"])
def test_weighted_losses_gradcheck(spec, granularity):
    student = logits(2, 4, 7, seed=29, dtype=torch.float64).requires_grad_()
    labels = torch.tensor([[1, 2, -100, 3], [0, 6, 4, 5]])
    teacher_labels = torch.tensor([[2, 2, 8], [1, 0, -100]])
    teachers = [logits(2, 4, 7, seed=30, dtype=torch.float64, scale=3.0), logits(2, 3, 9, seed=31, dtype=torch.float64)]
    common = dict(teacher_labels=[None, teacher_labels], teacher_weights=spec, weight_granularity=granularity)
    torch.autograd.gradcheck(lambda x: F.uld_loss(x, teachers, labels, temperature=1.3, **common), (student,),
                             fast_mode=True)
    torch.autograd.gradcheck(lambda x: F.infigfusion_loss(x, teachers, labels, k=2, **common), (student,),
                             fast_mode=True)


# ------------------------------------------------------------------------------------------------ swappable, modules
def test_a_registered_measure_is_accepted_by_name(monkeypatch):
    def top_logit(teacher, gold, k, temperature):  # trusts the teacher with the larger top logit less
        return teacher.max(-1).values.float()

    monkeypatch.setitem(weighting.MEASURES, "max_logit", weighting.Measure(top_logit, needs_labels=False))
    student, low, high = logits(2, 4, 10, seed=32), logits(2, 4, 10, seed=33), logits(2, 4, 10, seed=33) + 1.0
    _, parts = F.uld_loss(student, [low, high], teacher_weights="max_logit", return_components=True)
    assert_close(parts["weights"][0], torch.full((2,), torch.sigmoid(torch.tensor(1.0)).item()), name="custom measure")


def test_modules_take_the_weight_options():
    student, teachers = logits(2, 5, 12, seed=34), [logits(2, 5, 12, seed=35), logits(2, 6, 13, seed=36)]
    labels = torch.randint(0, 12, (2, 5), generator=torch.Generator().manual_seed(5))
    teacher_labels = [None, torch.randint(0, 13, (2, 6), generator=torch.Generator().manual_seed(6))]
    for module in (infigw.ULDLoss(teacher_weights="nll", weight_granularity="token", return_components=True),
                   infigw.InfiGFusionLoss(k=3, teacher_weights="nll", weight_granularity="token",
                                          return_components=True),
                   infigw.GLDLoss(k=3, teacher_weights="nll", weight_granularity="token", return_components=True)):
        assert "weight_granularity='token'" in repr(module)
        _, parts = module(student, teachers, labels, teacher_labels=teacher_labels)
        assert parts["token_weights"].shape == (2, 2, 5)


# ------------------------------------------------------------------------------------------------ bad inputs
BAD = [
    ("unknown measure", dict(teacher_weights="confidence"), "teacher_weights must be None, one of"),
    ("non-numeric weights", dict(teacher_weights=["a", "b"]), "teacher_weights must be None, one of"),
    ("bad granularity", dict(teacher_weights="uncertainty", weight_granularity="position"),
     "weight_granularity must be one of"),
    ("nll without labels", dict(teacher_weights="nll", mask=torch.ones(2, 5, dtype=torch.bool)),
     "teacher_weights='nll' needs each teacher's gold next tokens"),
    ("nll with a teacher mask only",
     dict(teacher_weights="nll", teacher_mask=[None, torch.ones(2, 6, dtype=torch.bool)],
          labels=torch.zeros(2, 5, dtype=torch.long)), r"teacher_labels\[1\]"),
    ("gold out of range", dict(teacher_weights="nll", teacher_labels=[None, torch.full((2, 6), 13)],
                               labels=torch.zeros(2, 5, dtype=torch.long)), r"must be in \[0, 13\)"),
    ("bad tau", dict(teacher_weights="uncertainty", weight_temperature=0.0), "weight_temperature must be"),
]


@pytest.mark.parametrize("name,kwargs,message", BAD, ids=[case[0] for case in BAD])
@pytest.mark.parametrize("loss_fn", [F.uld_loss, F.gld_loss])
def test_bad_weight_options_raise_clear_errors(loss_fn, name, kwargs, message):
    student, teachers = logits(2, 5, 12, seed=37), [logits(2, 5, 12, seed=38), logits(2, 6, 13, seed=39)]
    kwargs = dict(kwargs)
    if "teacher_mask" not in kwargs and "teacher_labels" not in kwargs:
        kwargs["teacher_mask"] = [None, torch.ones(2, 6, dtype=torch.bool)]
    labels = kwargs.pop("labels", None)
    if loss_fn is F.gld_loss:
        kwargs["k"] = 3
    with pytest.raises(ValueError, match=message):
        loss_fn(student, teachers, labels, **kwargs)


def _nll_logits(nll: torch.Tensor) -> torch.Tensor:
    """(B, T) target NLLs -> (B, T, 2) logits whose gold token 0 has exactly that NLL (log(1 + e^x) = nll)."""
    x = torch.log(torch.expm1(nll))
    return torch.stack([torch.zeros_like(x), x], dim=-1)


@pytest.mark.parametrize("granularity", ["sequence", "token"])
def test_nll_per_character_compares_tokenizers_of_different_granularity(granularity):
    """Teacher A cuts 8 characters into 4 tokens of NLL 2, teacher B into 8 tokens of NLL 1: per token B looks
    twice as certain, per character (teacher_chars) both are 1 nat per character: equal weights."""
    student = logits(1, 4, 5, seed=1, scale=1.0).requires_grad_()
    coarse, fine = _nll_logits(torch.full((1, 4), 2.0)), _nll_logits(torch.full((1, 8), 1.0))
    golds = [torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long)]
    chars = [torch.full((1, 4), 2), torch.ones(1, 8, dtype=torch.long)]
    common = dict(teacher_labels=golds, teacher_weights="nll", weight_granularity=granularity,
                  return_components=True)
    _, per_token = F.uld_loss(student, [coarse, fine], **common)
    _, per_char = F.uld_loss(student, [coarse, fine], teacher_chars=chars, **common)
    assert per_token["weights"][1, 0] > 0.6  # e^-1 / (e^-1 + e^-2) = 0.73 at sequence level
    assert_close(per_char["weights"][:, 0], torch.tensor([0.5, 0.5]), atol=1e-5, name="per-character weights")
    with pytest.raises(ValueError, match=r"teacher_chars\[1\] must be a numeric tensor"):
        F.uld_loss(student, [coarse, fine], teacher_chars=[chars[0], chars[0]], **common)
