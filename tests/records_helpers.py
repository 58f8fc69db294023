"""Builders shared by the records tests: tokenizers trained on a small text and a tiny random Llama teacher."""
import json

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France.",
    "Distillation transfers knowledge from a teacher to a student model; émigré café naïve.",
    "Graphs on logits compare which tokens rise together, position after position.",
    "A teacher's records hold its top-k logits, their ids and the full logsumexp.",
]
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")


def bpe_tokenizer(vocab_size: int = 300):
    """A byte-level BPE (GPT-2 style: the space belongs to the next word's token) with a chat template."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 10, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def wordpiece_tokenizer(vocab_size: int = 200):
    """A BERT-style WordPiece (splits on spaces and punctuation, spaces belong to no token): coarser words,
    other boundaries than the BPE."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS * 10, trainers.WordPieceTrainer(vocab_size=vocab_size,
                                                                   special_tokens=["[UNK]", "[PAD]"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 32):
    import transformers

    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def save_teacher(directory, seed: int = 0):
    """Save a tiny Llama and its BPE tokenizer in ``directory``; returns (model, tokenizer)."""
    tokenizer = bpe_tokenizer()
    model = tiny_llama(len(tokenizer), seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer


def rows(count: int):
    """``count`` JSONL rows: plain text of varied lengths with a response span, and a chat row every fourth."""
    out = []
    for i in range(count):
        if i % 4 == 3:
            out.append({"messages": [{"role": "user", "content": CORPUS[i % 4][:20]},
                                     {"role": "assistant", "content": CORPUS[(i + 1) % 4][: 10 + 3 * i]}]})
        else:
            text = CORPUS[i % 4][: 15 + 5 * i]
            out.append({"text": text, "response_start": min(6, len(text))})
    return out


def write_jsonl(path, items):
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    return path
