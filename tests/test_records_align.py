"""Cross-tokenizer alignment by target-token start characters, and response masks: against brute-force loops and
with two real tokenizers of different granularity (byte-level BPE and WordPiece) built from a small text."""
import numpy as np
import pytest
import torch

from infigw.inputs import index_partners
from infigw.records import offset_match, offset_pairs, response_mask, token_offsets, trim_leading_whitespace

from .records_helpers import CORPUS, bpe_tokenizer, wordpiece_tokenizer


def brute_force_pairs(s_off, s_valid, t_off, t_valid):
    """Loop version of offset_pairs: first unused partner by start, first position of a start on each side."""
    student_rows, teacher_rows = [], []
    batch, length = s_valid.shape
    t_length = t_valid.shape[1]
    for b in range(batch):
        used_starts = set()
        for t in range(length):
            start, end = s_off[b, t].tolist()
            if not s_valid[b, t] or start < 0 or end <= start or start in used_starts:
                continue
            used_starts.add(start)
            for u in range(t_length):
                t_start, t_end = t_off[b, u].tolist()
                if t_valid[b, u] and t_start >= 0 and t_end > t_start and t_start == start:
                    student_rows.append(b * length + t)
                    teacher_rows.append(b * t_length + u)
                    break
    return torch.tensor(student_rows, dtype=torch.long), torch.tensor(teacher_rows, dtype=torch.long)


def random_offsets(batch, length, generator, chars=40):
    """Monotone-ish spans with repeats, zero-width spans and unknown (-1) spans."""
    starts = torch.randint(0, chars, (batch, length), generator=generator).sort(-1).values
    ends = starts + torch.randint(0, 4, (batch, length), generator=generator)  # width 0 sometimes
    offsets = torch.stack([starts, ends], -1)
    unknown = torch.rand(batch, length, generator=generator) < 0.1
    offsets[unknown] = -1
    return offsets


@pytest.mark.parametrize("seed", range(6))
def test_offset_pairs_match_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    batch, length, t_length = 3, 17, 11
    s_off, t_off = random_offsets(batch, length, g), random_offsets(batch, t_length, g)
    s_valid = torch.rand(batch, length, generator=g) < 0.8
    t_valid = torch.rand(batch, t_length, generator=g) < 0.8
    s_valid[2] = False  # a sequence with no student positions
    rows = offset_pairs(s_off, s_valid, t_off, t_valid)
    expected = brute_force_pairs(s_off, s_valid, t_off, t_valid)
    assert torch.equal(rows[0], expected[0]) and torch.equal(rows[1], expected[1])
    assert len(set(rows[1].tolist())) == len(rows[1])  # each teacher position at most once
    match = offset_match(s_off, s_valid, t_off, t_valid)
    assert ((match >= 0).sum() == len(rows[0])).item()


def test_identical_tokenizations_pair_like_index_alignment():
    g = torch.Generator().manual_seed(0)
    starts = torch.arange(10).repeat(2, 1) * 3
    offsets = torch.stack([starts, starts + 2], -1)
    valid = torch.rand(2, 10, generator=g) < 0.7
    student_rows, teacher_rows = offset_pairs(offsets, valid, offsets, valid)
    partners = index_partners(valid, valid).reshape(-1)
    assert torch.equal(student_rows, (partners >= 0).nonzero().squeeze(-1))
    assert torch.equal(teacher_rows, partners[partners >= 0])


def target_spans(tokenizer, texts):
    """(B, T, 2) target-token spans (shifted like labels: row t holds token t+1) and (B, T) valid, right-padded."""
    encoded = [token_offsets(tokenizer, text, add_special_tokens=False)[1][1:] for text in texts]
    length = max(len(e) for e in encoded)
    offsets = torch.full((len(texts), length, 2), -1, dtype=torch.long)
    valid = torch.zeros(len(texts), length, dtype=torch.bool)
    for b, spans in enumerate(encoded):
        offsets[b, : len(spans)] = torch.from_numpy(spans)
        valid[b, : len(spans)] = True
    return offsets, valid


def test_real_tokenizers_of_different_granularity():
    bpe, wordpiece = bpe_tokenizer(), wordpiece_tokenizer()
    texts = [CORPUS[0], CORPUS[1] + " " + CORPUS[2]]
    s_off, s_valid = target_spans(bpe, texts)
    t_off, t_valid = target_spans(wordpiece, texts)
    assert s_valid.sum() > t_valid.sum()  # the small BPE splits words finer than the WordPiece
    student_rows, teacher_rows = offset_pairs(s_off, s_valid, t_off, t_valid)
    expected = brute_force_pairs(s_off, s_valid, t_off, t_valid)
    assert torch.equal(student_rows, expected[0]) and torch.equal(teacher_rows, expected[1])
    # Every paired student and teacher token starts on the same character; every word start pairs.
    s_flat, t_flat = s_off.reshape(-1, 2), t_off.reshape(-1, 2)
    assert torch.equal(s_flat[student_rows, 0], t_flat[teacher_rows, 0])
    for b, text in enumerate(texts):
        word_starts = {i for i, c in enumerate(text) if c.isalnum() and (i == 0 or not text[i - 1].isalnum())}
        rows = student_rows[student_rows // s_off.shape[1] == b]
        paired_starts = set(s_flat[rows, 0].tolist())
        first_token_start = int(s_off[b, 0, 0]) if s_valid[b, 0] else None
        assert word_starts - paired_starts - {0, first_token_start} == set(), text


def test_whitespace_is_trimmed_so_word_starts_agree():
    bpe, wordpiece = bpe_tokenizer(), wordpiece_tokenizer()
    text = "Paris is the capital"
    ids, spans = token_offsets(bpe, text, add_special_tokens=False)
    raw = bpe(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert any(text[s] == " " for s, e in raw)  # the BPE attaches spaces to the next word
    assert all(text[s] != " " or text[s:e].isspace() for s, e in spans.tolist())
    _, wp_spans = token_offsets(wordpiece, text, add_special_tokens=False)
    assert {s for s, _ in wp_spans.tolist()} <= {s for s, _ in spans.tolist()}
    assert trim_leading_whitespace(np.array([[0, 3], [3, 5], [5, 5], [-1, -1]]), "ab   c").tolist() == \
        [[0, 3], [3, 5], [5, 5], [-1, -1]]
    assert trim_leading_whitespace(np.array([[2, 6], [2, 4]]), "ab \t\ncd").tolist() == [[5, 6], [2, 4]]


def brute_force_response(offsets, start, end, valid):
    mask = torch.zeros(valid.shape, dtype=torch.bool)
    for b in range(valid.shape[0]):
        for t in range(valid.shape[1]):
            s, e = offsets[b, t].tolist()
            if start[b] < 0:
                mask[b, t] = bool(valid[b, t])
            else:
                stop = end[b] if end[b] >= 0 else float("inf")
                mask[b, t] = bool(valid[b, t]) and 0 <= s < e and s < stop and e > start[b]
    return mask


def test_response_mask_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    offsets = random_offsets(4, 13, g)
    valid = torch.rand(4, 13, generator=g) < 0.9
    start, end = torch.tensor([5, -1, 12, 0]), torch.tensor([20, -1, -1, 3])
    assert torch.equal(response_mask(offsets, start, end, valid), brute_force_response(offsets, start, end, valid))
    everything = torch.full((4,), -1)
    assert torch.equal(response_mask(offsets, None), torch.ones(4, 13, dtype=torch.bool))
    assert torch.equal(response_mask(offsets, 5, None, valid),
                       brute_force_response(offsets, torch.full((4,), 5), everything, valid))


def test_response_mask_on_both_sides_of_two_tokenizers():
    """The same character span selects the response's tokens on either side."""
    bpe, wordpiece = bpe_tokenizer(), wordpiece_tokenizer()
    text = "Question: where is Paris? Answer: Paris is in France."
    response_start = text.index("Paris is")
    for tokenizer in (bpe, wordpiece):
        offsets, valid = target_spans(tokenizer, [text])
        mask = response_mask(offsets, response_start, valid=valid)
        covered = "".join(text[s:e] for s, e in offsets[0][mask[0]].tolist())
        assert covered.replace(" ", "") == text[response_start:].replace(" ", "")


def test_bad_arguments_are_named():
    offsets, valid = torch.zeros(2, 3, 2, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"student_offsets must be a tensor \(B, T, 2\)"):
        offset_pairs(offsets[..., 0], valid, offsets, valid)
    with pytest.raises(TypeError, match="teacher_offsets must be an integer tensor"):
        offset_pairs(offsets, valid, offsets.float(), valid)
    with pytest.raises(ValueError, match="teacher_valid must be a bool tensor of shape"):
        offset_pairs(offsets, valid, offsets, valid.long())
    with pytest.raises(ValueError, match="both sides must hold the same batch"):
        offset_pairs(offsets, valid, offsets[:1], valid[:1])
    with pytest.raises(ValueError, match="response_start must be an int, None or 2 integers"):
        response_mask(offsets, torch.tensor([1.5, 2.0]))
    with pytest.raises(TypeError, match="fast tokenizer"):
        token_offsets(object(), "text")
