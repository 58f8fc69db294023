"""Tiny real components built on the spot (nothing is downloaded): fast tokenizers trained with the
``tokenizers`` library on a few texts, and small Llama-style ``transformers`` models from a config. The tests,
the embedded fusion experiment (``benchmarks/fusion``) and the demo configuration of ``python -m infigw.fuse``
use them.

Every tokenizer here is lossless on ASCII text (byte-level BPE, or a Metaspace pre-tokenizer that keeps the
spaces) and prepends a BOS token, so each model predicts every character of a text: per-character losses
compare across tokenizers.
"""
from typing import Sequence

KINDS = ("bpe", "wordpiece", "unigram")
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")


def train_tokenizer(kind: str, texts: Sequence[str], vocab_size: int):
    """A ``PreTrainedTokenizerFast`` of ``kind`` (``"bpe"`` byte-level, ``"wordpiece"`` or ``"unigram"``, both
    over Metaspace words) trained on ``texts``, with pad/bos/eos/unk tokens and a BOS prepended to every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    special = list(SPECIAL_TOKENS)
    if kind == "bpe":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif kind == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
        tokenizer.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special)
    else:
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
        tokenizer.decoder = decoders.Metaspace(prepend_scheme="never")
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=special, unk_token="<unk>")
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[
        ("<bos>", tokenizer.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")


def tiny_llama(vocab_size: int, hidden: int = 32, layers: int = 2, heads: int = 2, max_positions: int = 256,
               seed: int = 0):
    """A randomly initialised ``LlamaForCausalLM`` (fp32, eager attention), reproducible from ``seed``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=False, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
