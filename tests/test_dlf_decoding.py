"""DLF decoding with tiny randomly initialised HF models (no downloads); skipped without transformers."""
import sys

import pytest
import torch

from infigw.dlf import DLFLogitsProcessor, dlf_generate
from infigw.dlf.decoding import _require_transformers

VOCAB = 61
PAD, EOS = 0, 2
# The search backends are compared in test_dlf.py; here the decoding logic runs on the torch search (the
# interpreted Triton kernel would make every step slow), except in test_auto_backend_decodes_like_torch.
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
def test_auto_backend_decodes_like_torch(models, prompt):
    """The default backend (Triton on CUDA / under TRITON_INTERPRET=1, else torch) inside the loop."""
    large, small, experts = models
    ids, mask = prompt
    auto = dlf_generate(large, small, experts, ids, mask, max_new_tokens=3)
    torch_search = dlf_generate(large, small, experts, ids, mask, max_new_tokens=3, backend=BACKEND)
    assert torch.equal(auto.sequences, torch_search.sequences) and torch.equal(auto.alphas, torch_search.alphas)


def test_bad_arguments(models, prompt):
    large, small, experts = models
    ids, mask = prompt
    with pytest.raises(ValueError, match="vocabulary mismatch: small_logits"):
        dlf_generate(large, _tiny_llama(9, vocab=VOCAB + 3), experts, ids, mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="experts is empty"):
        dlf_generate(large, small, [], ids, mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="pad_token_id is required"):
        dlf_generate(large, small, experts, ids, mask, max_new_tokens=2, eos_token_id=EOS)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        dlf_generate(large, small, experts, ids, mask, max_new_tokens=2, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="input_ids must be a"):
        dlf_generate(large, small, experts, ids.float(), mask, max_new_tokens=2)


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install infigw\[hf\]"):
        _require_transformers()
