"""DLF decoding with tiny randomly initialised HF models and a word-level tokenizer trained here (no downloads);
skipped without transformers."""
import logging
import os
import pathlib
import re
import subprocess
import sys
import warnings

import pytest
import torch

from infigw.dlf import DLFLogitsProcessor, decoding, dlf_generate
from infigw.dlf.decoding import _require_transformers

from .helpers import assert_close

VOCAB = 61
PAD, EOS = 0, 2
# The search backends are compared in test_dlf.py; here the decoding logic runs on the torch search (the
# interpreted Triton kernel would make every step slow), except in test_triton_backend_decodes_like_torch.
BACKEND = "torch"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded CI box OpenMP spinning makes each
    forward ~10× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_llama(seed, hidden=32, vocab=VOCAB):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def models():
    # large base wider than the small ones; two experts
    return _tiny_llama(0, hidden=64), _tiny_llama(1), [_tiny_llama(2), _tiny_llama(3)]


@pytest.fixture(scope="module")
def prompt():
    ids = torch.tensor([[5, 6, 7, 8, 9], [PAD, PAD, 3, 4, 5], [PAD, 11, 12, 13, 14]])
    return ids, (ids != PAD).long()


def test_alpha_zero_reproduces_large_greedy(models, prompt):
    large, small, experts = models
    ids, mask = prompt
    want = large.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD, eos_token_id=EOS)
    got = dlf_generate(large, small, experts, ids, mask, max_new_tokens=10, grid=(0.0,), backend=BACKEND, pad_token_id=PAD, eos_token_id=EOS)
    assert torch.equal(got.sequences, want), f"\n{got.sequences}\n{want}"
    assert bool((got.alphas == 0).all())


def test_stops_at_eos_like_generate(models, prompt):
    """Take as EOS a token the large model emits greedily: that row is padded afterwards, the loop stops when
    every row finished, all exactly like HF generate."""
    large, small, experts = models
    ids, mask = prompt
    free = dlf_generate(large, small, experts, ids, mask, max_new_tokens=6, grid=(0.0,), backend=BACKEND)
    eos = [int(free.sequences[0, ids.shape[1] + 1]), int(free.sequences[1, ids.shape[1]]), int(free.sequences[2, -1])]
    want = large.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD, eos_token_id=eos)
    got = dlf_generate(large, small, experts, ids, mask, max_new_tokens=12, grid=(0.0,), backend=BACKEND, pad_token_id=PAD, eos_token_id=eos)
    assert torch.equal(got.sequences, want), f"\n{got.sequences}\n{want}"
    assert got.sequences.shape[1] < ids.shape[1] + 12, "the loop should stop once every row emitted an EOS"


def test_kv_cached_equals_uncached(models, prompt):
    large, small, experts = models
    ids, mask = prompt
    cached = dlf_generate(large, small, experts, ids, mask, max_new_tokens=8, backend=BACKEND)
    full = dlf_generate(large, small, experts, ids, mask, max_new_tokens=8, backend=BACKEND, use_cache=False)
    assert torch.equal(cached.sequences, full.sequences), f"\n{cached.sequences}\n{full.sequences}"
    assert torch.equal(cached.alphas, full.alphas)
    assert torch.equal(cached.experts, full.experts)
    assert bool((cached.alphas != 0).any()), "the default grid should pick some non-zero α on these models"


def test_prompt_logits_are_not_computed(models, prompt):
    """Only the last position's logits are used: the prefill must not compute length × vocabulary of them."""
    large, small, experts = models
    ids, mask = prompt
    positions = []
    hooks = [m.lm_head.register_forward_hook(lambda module, inputs, out: positions.append(out.shape[1]))
             for m in (large, small, *experts)]
    try:
        dlf_generate(large, small, experts, ids, mask, max_new_tokens=2, backend=BACKEND)
    finally:
        for hook in hooks:
            hook.remove()
    assert positions == [1] * 8, positions


def test_processor_inside_hf_generate_matches_loop(models, prompt):
    large, small, experts = models
    ids, mask = prompt
    ours = dlf_generate(large, small, experts, ids, mask, max_new_tokens=8, mode="full", backend=BACKEND)
    processor = DLFLogitsProcessor(small, experts, attention_mask=mask, mode="full", backend=BACKEND)
    hf = large.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=PAD, logits_processor=[processor])
    assert torch.equal(hf, ours.sequences), f"\n{hf}\n{ours.sequences}"
    assert torch.equal(torch.stack(processor.alphas, 1), ours.alphas)
    assert ours.experts is None and ours.alphas.shape == (3, 8, 2)


def test_sampling_is_reproducible(models, prompt):
    large, small, experts = models
    ids, mask = prompt
    runs = [
        dlf_generate(large, small, experts, ids, mask, max_new_tokens=6, do_sample=True, temperature=0.7,
                     backend=BACKEND, generator=torch.Generator().manual_seed(4))
        for _ in range(2)
    ]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert torch.equal(runs[0].sequences[:, : ids.shape[1]], ids)
    assert bool((runs[0].sequences >= 0).all()) and bool((runs[0].sequences < VOCAB).all())


def test_mixed_architectures_cached_equals_uncached(models, prompt):
    """Small side from another family (GPT-2: learned absolute positions) sharing the vocabulary."""
    transformers = pytest.importorskip("transformers")
    large = models[0]

    def tiny_gpt2(seed):
        torch.manual_seed(seed)
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        return transformers.GPT2LMHeadModel(config).eval()

    small, experts = tiny_gpt2(5), [tiny_gpt2(6)]
    ids, mask = prompt
    cached = dlf_generate(large, small, experts, ids, mask, max_new_tokens=6, backend=BACKEND)
    full = dlf_generate(large, small, experts, ids, mask, max_new_tokens=6, backend=BACKEND, use_cache=False)
    assert torch.equal(cached.sequences, full.sequences), f"\n{cached.sequences}\n{full.sequences}"
    assert torch.equal(cached.alphas, full.alphas)


@pytest.mark.triton_interpret
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 set before pytest")
def test_triton_backend_decodes_like_torch(models, prompt):
    """The interpreted Triton kernel inside the loop (slow per step: two steps)."""
    large, small, experts = models
    ids, mask = prompt
    triton = dlf_generate(large, small, experts, ids, mask, max_new_tokens=2, backend="triton")
    torch_search = dlf_generate(large, small, experts, ids, mask, max_new_tokens=2, backend=BACKEND)
    assert torch.equal(triton.sequences, torch_search.sequences) and torch.equal(triton.alphas, torch_search.alphas)


def test_no_deprecation_warnings(models, prompt):
    """transformers 5.x renamed the cache argument: nothing may warn about past_key_values (or anything else
    deprecated) in generate with the processor or in dlf_generate."""
    transformers = pytest.importorskip("transformers")
    large, small, experts = models
    ids, mask = prompt
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logger = transformers.utils.logging.get_logger("transformers")
    hf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            processor = DLFLogitsProcessor(small, experts, mask, backend=BACKEND)
            large.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=PAD,
                           logits_processor=[processor])
            dlf_generate(large, small, experts, ids, mask, max_new_tokens=3, backend=BACKEND)
    finally:
        hf_logger.removeHandler(handler)
    deprecated = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    deprecated += [r.getMessage() for r in records if "deprecat" in r.getMessage().lower()]
    assert not deprecated, deprecated


def test_num_return_sequences_expands_like_generate(models, prompt):
    """generate repeats every prompt row num_return_sequences times: the processor expands the prompt mask and
    the small models' rows the same way, so sampling with n = 2 equals sampling the repeated prompts."""
    large, small, experts = models
    ids, mask = prompt

    def sample(prompt_ids, prompt_mask, n):
        torch.manual_seed(7)
        processor = DLFLogitsProcessor(small, experts, prompt_mask, backend=BACKEND)
        out = large.generate(prompt_ids, attention_mask=prompt_mask, max_new_tokens=5, do_sample=True,
                             num_return_sequences=n, pad_token_id=PAD, logits_processor=[processor])
        return out, torch.stack(processor.alphas, 1)

    expanded, expanded_alphas = sample(ids, mask, 2)
    repeated, repeated_alphas = sample(ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0), 1)
    assert expanded.shape[0] == 2 * ids.shape[0]
    assert torch.equal(expanded, repeated), f"\n{expanded}\n{repeated}"
    assert torch.equal(expanded_alphas, repeated_alphas)
    ours = dlf_generate(large, small, experts, ids, mask, max_new_tokens=5, do_sample=True, num_return_sequences=2,
                        backend=BACKEND, generator=torch.Generator().manual_seed(3))
    ours_repeated = dlf_generate(large, small, experts, ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0),
                                 max_new_tokens=5, do_sample=True, backend=BACKEND,
                                 generator=torch.Generator().manual_seed(3))
    assert torch.equal(ours.sequences, ours_repeated.sequences)


def test_beam_search_follows_reordered_rows(models, prompt, monkeypatch):
    """Beam search reorders rows between steps; the small models' caches must follow. Cached decoding (which
    reorders the caches) equals uncached decoding (which recomputes every prefix), and α = 0 is plain beam
    search of the large model."""
    large, small, experts = models
    ids, mask = prompt
    reorders = []
    select_rows = decoding._IncrementalLM.select_rows
    monkeypatch.setattr(decoding._IncrementalLM, "select_rows",
                        lambda self, source: (reorders.append(source), select_rows(self, source)))
    options = dict(attention_mask=mask, max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False,
                   pad_token_id=PAD, output_scores=True, return_dict_in_generate=True)
    runs = []
    for use_cache in (True, False):
        processor = DLFLogitsProcessor(small, experts, mask, backend=BACKEND, use_cache=use_cache)
        runs.append((large.generate(ids, logits_processor=[processor], **options), processor))
    (cached, cached_processor), (uncached, _) = runs
    assert any(not torch.equal(r, torch.arange(len(r))) for r in reorders), "beam search never reordered rows"
    assert torch.equal(cached.sequences, uncached.sequences), f"\n{cached.sequences}\n{uncached.sequences}"
    assert_close(cached.sequences_scores, uncached.sequences_scores, atol=1e-4, rtol=1e-4, name="beam scores")
    assert bool(torch.cat(cached_processor.alphas).ne(0).any()), "the default grid should pick some non-zero α"
    # the processor returns log-probabilities, which beam search adds up
    assert_close(cached.scores[0].logsumexp(-1), torch.zeros(ids.shape[0] * 3), atol=1e-5, name="logsumexp")
    plain = large.generate(ids, attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=PAD)
    alpha_zero = DLFLogitsProcessor(small, experts, mask, grid=(0.0,), backend=BACKEND)
    fused = large.generate(ids, attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False,
                           pad_token_id=PAD, logits_processor=[alpha_zero])
    assert torch.equal(fused, plain), f"\n{fused}\n{plain}"


def test_tokens_masked_by_earlier_processors_stay_masked(models, prompt):
    """generate's own processors run first and may set scores to -inf (here bad_words_ids)."""
    large, small, experts = models
    ids, mask = prompt
    free = dlf_generate(large, small, experts, ids, mask, max_new_tokens=6, backend=BACKEND)
    banned = int(free.sequences[0, ids.shape[1]])
    processor = DLFLogitsProcessor(small, experts, mask, backend=BACKEND)
    out = large.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD,
                         bad_words_ids=[[banned]], logits_processor=[processor])
    assert not bool((out[:, ids.shape[1]:] == banned).any())


def test_attention_mask_is_required_or_derived_exactly(models, prompt):
    large, small, experts = models
    ids, mask = prompt
    with pytest.raises(ValueError, match="attention_mask is required"):
        DLFLogitsProcessor(small, experts, None)
    with pytest.raises(ValueError, match="attention_mask is required"):
        dlf_generate(large, small, experts, ids, max_new_tokens=2, backend=BACKEND)  # pad id unknown
    with pytest.raises(ValueError, match="attention_mask is required"):
        dlf_generate(large, small, experts, ids, max_new_tokens=2, pad_token_id=PAD, backend=BACKEND)  # pads present
    unpadded = ids[:1]
    derived = dlf_generate(large, small, experts, unpadded, max_new_tokens=4, pad_token_id=PAD, backend=BACKEND)
    given = dlf_generate(large, small, experts, unpadded, torch.ones_like(unpadded), max_new_tokens=4, backend=BACKEND)
    assert torch.equal(derived.sequences, given.sequences)
    for bad, exc, text in (
        (mask[:, 1:], ValueError, "does not fit the prompt"),
        (mask[:2], ValueError, "does not fit the prompt"),
        (mask * 2, ValueError, "0/1 with at least one 1 per row"),
        (torch.zeros_like(mask), ValueError, "0/1 with at least one 1 per row"),
        (mask.float(), TypeError, "bool or integer tensor"),
    ):
        with pytest.raises(exc, match=text):
            dlf_generate(large, small, experts, ids, bad, max_new_tokens=1, backend=BACKEND)
    processor = DLFLogitsProcessor(small, experts, mask, backend=BACKEND)
    large.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=PAD, logits_processor=[processor])
    with pytest.raises(ValueError, match="call reset"):
        large.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=PAD, logits_processor=[processor])


# ------------------------------------------------------------------------------- padded vocabularies (Qwen-style)

WORDS = ("the a cat dog sat ran on under mat rug red blue big small old new one two three four five six seven eight "
         "nine ten sun moon star sky sea river hill tree leaf rock sand rain snow wind fire ice day night morning "
         "evening bread milk tea cup plate fork spoon door window house road car bus train boat ship bird fish")


def _tokenizer(text, vocab_size=VOCAB):
    """A word-level fast tokenizer trained on ``text``: ids 0/1/2 are pad/bos/eos like the tiny models' configs."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tok.train_from_iterator([text], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>", padding_side="left")
    assert len(fast) == vocab_size
    return fast


def _unpadded_twin(model, vocab):
    """The same weights with the embedding and output rows beyond ``vocab`` removed."""
    transformers = pytest.importorskip("transformers")
    config = model.config.to_dict()
    config["vocab_size"] = vocab
    twin = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    state = {k: v[:vocab] if k in ("model.embed_tokens.weight", "lm_head.weight") else v
             for k, v in model.state_dict().items()}
    twin.load_state_dict(state)
    return twin


@pytest.fixture(scope="module")
def padded_pair():
    """Large model with 64 logits, small base 62, experts 62 and 63, all on one 61-token tokenizer (the shape of
    Qwen2.5-7B's 152064 vs Qwen2.5-0.5B's 151936 logits on a 151665-token tokenizer)."""
    tok = _tokenizer(WORDS)
    large = _tiny_llama(10, hidden=64, vocab=VOCAB + 3)
    small = _tiny_llama(11, vocab=VOCAB + 1)
    experts = [_tiny_llama(12, vocab=VOCAB + 1), _tiny_llama(13, vocab=VOCAB + 2)]
    batch = tok(["the cat sat on the mat", "red sun", "one two three"], return_tensors="pt", padding=True)
    return tok, large, small, experts, batch["input_ids"], batch["attention_mask"]


def test_padded_vocabularies_fuse_on_the_shared_tokenizer(padded_pair):
    """Cutting every model's logits to the tokenizer is the same as decoding with twins whose padded rows were
    removed; the padded columns of the output are -inf, so generate never picks them."""
    tok, large, small, experts, ids, mask = padded_pair
    twins = [_unpadded_twin(m, VOCAB) for m in (large, small, *experts)]
    padded = dlf_generate(large, small, experts, ids, mask, max_new_tokens=6, tokenizer=tok, backend=BACKEND)
    twin = dlf_generate(twins[0], twins[1], twins[2:], ids, mask, max_new_tokens=6, backend=BACKEND)
    assert torch.equal(padded.sequences, twin.sequences), f"\n{padded.sequences}\n{twin.sequences}"
    assert torch.equal(padded.alphas, twin.alphas)
    by_size = dlf_generate(large, small, experts, ids, mask, max_new_tokens=6, vocab_size=VOCAB, backend=BACKEND)
    assert torch.equal(by_size.sequences, padded.sequences)

    options = dict(attention_mask=mask, max_new_tokens=6, pad_token_id=PAD, output_scores=True,
                   return_dict_in_generate=True)
    processor = DLFLogitsProcessor(small, experts, mask, tokenizer=[tok, tok], backend=BACKEND)
    out = large.generate(ids, do_sample=False, logits_processor=[processor], **options)
    twin_out = twins[0].generate(ids, do_sample=False, **options,
                                 logits_processor=[DLFLogitsProcessor(twins[1], twins[2:], mask, backend=BACKEND)])
    assert torch.equal(out.sequences, twin_out.sequences)
    for step, (scores, twin_scores) in enumerate(zip(out.scores, twin_out.scores)):
        assert scores.shape[-1] == VOCAB + 3 and bool(scores[:, VOCAB:].eq(float("-inf")).all())
        assert_close(scores[:, :VOCAB], twin_scores, atol=1e-5, rtol=1e-5, name=f"log-probabilities at step {step}")
    torch.manual_seed(0)
    processor.reset(mask)
    sampled = large.generate(ids, do_sample=True, top_k=0, logits_processor=[processor], **options)
    assert bool((sampled.sequences < VOCAB).all()), "sampled a padded id"


def test_padded_vocabularies_need_the_tokenizer_and_one_tokenizer(padded_pair):
    tok, large, small, experts, ids, mask = padded_pair
    with pytest.raises(ValueError, match="vocabulary widths differ: the large model's scores have 64 columns, "
                                         "small_base 62.*tokenizer="):
        dlf_generate(large, small, experts, ids, mask, max_new_tokens=1, backend=BACKEND)
    other = _tokenizer(" ".join(reversed(WORDS.split())) + " extra words here")
    with pytest.raises(ValueError, match=r"tokenizer\[1\] differs from tokenizer\[0\]"):
        DLFLogitsProcessor(small, experts, mask, tokenizer=[tok, other])
    with pytest.raises(ValueError, match="vocab_size=60 but the tokenizer has ids 0..60"):
        DLFLogitsProcessor(small, experts, mask, tokenizer=tok, vocab_size=60)
    with pytest.raises(TypeError, match="tokenizer must be a Hugging Face tokenizer"):
        DLFLogitsProcessor(small, experts, mask, tokenizer="qwen")
    with pytest.raises(ValueError, match="vocab_size must be an int >= 1"):
        DLFLogitsProcessor(small, experts, mask, vocab_size=0)
    with pytest.raises(ValueError, match="small_base has 62 logits per token, fewer than the 63 shared ids"):
        dlf_generate(large, small, experts, ids, mask, max_new_tokens=1, vocab_size=VOCAB + 2, backend=BACKEND)


def test_bad_arguments(models, prompt):
    large, small, experts = models
    ids, mask = prompt
    with pytest.raises(ValueError, match="experts is empty"):
        dlf_generate(large, small, [], ids, mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="pad_token_id is required"):
        dlf_generate(large, small, experts, ids, mask, max_new_tokens=2, eos_token_id=EOS)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        dlf_generate(large, small, experts, ids, mask, max_new_tokens=2, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="num_return_sequences > 1 needs do_sample=True"):
        dlf_generate(large, small, experts, ids, mask, max_new_tokens=2, num_return_sequences=2)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        dlf_generate(large, small, experts, ids, mask, max_new_tokens=0)
    with pytest.raises(TypeError, match="grid must be a sequence"):
        DLFLogitsProcessor(small, experts, mask, grid=1.0)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        dlf_generate(large, small, experts, ids, mask, max_new_tokens=1, backend="bogus")
    with pytest.raises(ValueError, match="input_ids must be a"):
        dlf_generate(large, small, experts, ids.float(), mask, max_new_tokens=2)


def test_legacy_tuple_caches_are_refused_for_beam_search(models):
    """Before transformers 4.48 some models return tuples, whose layout varies by model: beam search cannot
    reorder them safely, so DLF says so."""
    lm = decoding._IncrementalLM(models[1], use_cache=True)
    lm.cache = ((torch.zeros(2, 4, 3, 8), torch.zeros(2, 4, 3, 8)),)
    with pytest.raises(TypeError, match="returned a tuple cache, which DLF cannot reorder for beam search"):
        lm.select_rows(torch.tensor([1, 1]))


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("INFIGW_OLDEST_TRANSFORMERS_PYTHON"),
                    reason="INFIGW_OLDEST_TRANSFORMERS_PYTHON: a python whose transformers is the [hf] lower bound")
def test_oldest_transformers_the_extra_allows():
    """This file's tests again, under the oldest transformers of setup.py's [hf] extra (an interpreter prepared
    by hand, see docs/dlf.md: nothing is installed by the test)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    lowest = re.search(r'"transformers>=([0-9.]+)"', (root / "setup.py").read_text()).group(1)
    python = os.environ["INFIGW_OLDEST_TRANSFORMERS_PYTHON"]
    version = subprocess.run([python, "-c", "import transformers; print(transformers.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version.startswith(lowest), f"{python} has transformers {version}, the [hf] extra allows >= {lowest}"
    run = subprocess.run([python, "-m", "pytest", __file__, "-q", "-m", "not slow", "-p", "no:cacheprovider"],
                         cwd=root, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install infigw\[hf\]"):
        _require_transformers()
