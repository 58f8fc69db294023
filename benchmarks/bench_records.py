"""Teacher records (issue 17): store size, capture throughput, and what ULD loses without the tail mass.

    python -m benchmarks.bench_records [--quick]

1. Size: bytes per token of a store at k = 16 with fp16 values, without and with zstd, for two vocabulary sizes
   (ids fit in 16 bits / need the 8-bit high plane) and two example lengths (the per-example Arrow overhead).
   Top-k values, ids and logsumexp come from :func:`infigw.testing.llm_like_logits` (Zipf base rates, dominant
   tokens); token ids and character spans from a byte-level BPE trained on this repository's text.
2. Capture throughput on CPU: :func:`infigw.records.capture.capture` end to end (tokenisation, forward, top-k,
   logsumexp, writing) against the bare forward pass over the same length-sorted batches, with a tiny random
   Llama (hidden 256, 4 layers, vocabulary 32000) on text from this repository. Best of ``--repeats`` runs each.
3. ULD from top-10 records (the reference sorted-probability L1, :func:`infigw.reference.sorted_prob_l1`) on
   :func:`infigw.testing.logit_pair` data (the default peaked teacher, a flatter one with ``dominant_gap=2``, and
   the default at temperature 2): dense logits against the kept probabilities with zeros elsewhere, with a
   one-entry tail bucket ``1 - sum p`` on the teacher only, with a tail bucket on both sides (the student's own
   top-10 plus its rest), and renormalised over the kept entries (a record without logsumexp).
"""
import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from infigw.reference import row_logsumexp, sorted_prob_l1
from infigw.records import StoreMetadata, StoreWriter, open_store, token_offsets
from infigw.records.capture import capture, topk_records
from infigw.testing import llm_like_logits, logit_pair

ROOT = Path(__file__).resolve().parents[1]


def repository_text() -> str:
    files = sorted(ROOT.glob("*.md")) + sorted((ROOT / "infigw").rglob("*.py")) + sorted((ROOT / "docs").glob("*.md"))
    return "\n".join(path.read_text(encoding="utf-8") for path in files)


def train_tokenizer(text: str, vocab_size: int):
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(text.splitlines(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")


# ------------------------------------------------------------------------------------------------- 1. size
def topk_rows(tokens: int, vocab: int, k: int, chunk: int = 256):
    values, ids, lse = [], [], []
    for seed, first in enumerate(range(0, tokens, chunk)):
        logits = llm_like_logits(1, min(chunk, tokens - first), vocab, seed=seed)[0]
        v, i = topk_records(logits, k)
        values.append(v), ids.append(i), lse.append(row_logsumexp(logits, 1.0))
    return torch.cat(values), torch.cat(ids), torch.cat(lse)


def size_table(tokens: int, lengths, vocabs, k: int = 16):
    text = repository_text()
    tokenizer = train_tokenizer(text, 8000)
    token_ids, offsets = token_offsets(tokenizer, text)
    lines = ["| V | tokens per example | compression | bytes / token | the arrays alone, uncompressed |",
             "|---:|---:|---|---:|---:|"]
    for vocab in vocabs:
        values, ids, lse = topk_rows(tokens, vocab, k)
        raw = k * 2 + k * (3 if vocab > 65536 else 2) + 4 + (3 if vocab > 65536 else 2) + 8
        for length in lengths:
            for compression in ("none", "zstd"):
                meta = StoreMetadata(teacher="bench", tokenizer_name="bpe", tokenizer_hash="0" * 64,
                                     vocab_size=vocab, k=k, value_dtype="float16", compression=compression)
                with tempfile.TemporaryDirectory() as directory:
                    with StoreWriter(directory, meta, shard_examples=64) as writer:
                        for n, first in enumerate(range(0, tokens - length + 1, length)):
                            rows = slice(first, first + length - 1)
                            writer.add(n, token_ids[first: first + length], offsets[first: first + length],
                                       values[rows], ids[rows], lse[rows])
                    store = open_store(directory)
                    lines.append(f"| {vocab} | {length} | {compression} | {store.num_bytes / store.num_tokens:.1f} "
                                 f"| {raw} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- 2. throughput
def tiny_llama(vocab: int):
    import transformers

    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def bare_forward(model, tokenizer, texts, batch_size):
    """Tokens of the forward pass alone over the length-sorted batches capture forms."""
    encoded = sorted((token_offsets(tokenizer, t)[0] for t in texts), key=lambda ids: -len(ids))
    with torch.inference_mode():
        for first in range(0, len(encoded), batch_size):
            batch = encoded[first: first + batch_size]
            ids = torch.zeros(len(batch), max(map(len, batch)), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, item in enumerate(batch):
                ids[row, : len(item)] = torch.from_numpy(item)
                mask[row, : len(item)] = 1
            model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return sum(map(len, encoded))


def timed(run):
    """(result, wall seconds, CPU seconds of this process) of ``run()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def throughput_table(examples: int, chars: int, batch_size: int, repeats: int, k: int = 16):
    """Bare forward and capture, alternating; tokens/s by wall time (best of the repeats: the machine is shared)
    and by this process's CPU time (summed over the repeats: less sensitive to other jobs)."""
    import json

    text = repository_text()
    tokenizer = train_tokenizer(text, 32000)
    model = tiny_llama(32000)
    texts = [text[i * chars: (i + 1) * chars] for i in range(examples)]
    runs = {"bare": [], "capture": []}
    with tempfile.TemporaryDirectory() as directory:
        data = Path(directory) / "data.jsonl"
        data.write_text("\n".join(json.dumps({"text": t}) for t in texts))
        bare_forward(model, tokenizer, texts[:batch_size], batch_size)  # warm-up
        for repeat in range(repeats):
            runs["bare"].append(timed(lambda: bare_forward(model, tokenizer, texts, batch_size)))
            runs["capture"].append(timed(lambda: capture(
                model, data, Path(directory) / f"store{repeat}", k=k, tokenizer=tokenizer, batch_size=batch_size,
                progress=False)["tokens"]))
    tokens = runs["bare"][0][0]
    best = {name: max(tok / wall for tok, wall, _ in done) for name, done in runs.items()}
    cpu = {name: sum(tok for tok, _, _ in done) / sum(c for _, _, c in done) for name, done in runs.items()}
    return ("| tokens | batch | bare forward tok/s: wall best; per CPU-s | capture tok/s: wall best; per CPU-s | "
            "capture / bare: wall; CPU |\n|---:|---:|---:|---:|---:|\n"
            f"| {tokens} | {batch_size} | {best['bare']:,.0f}; {cpu['bare']:,.0f} | {best['capture']:,.0f}; "
            f"{cpu['capture']:,.0f} | {best['capture'] / best['bare']:.0%}; {cpu['capture'] / cpu['bare']:.0%} |")


# ----------------------------------------------------------------------------------------------- 3. ULD tail
def _kept_probs(logits, k, temperature):
    """Exact probabilities (with the full logsumexp) of the top-k entries of logits / temperature."""
    scaled = logits / temperature
    return torch.exp(torch.topk(scaled, k, dim=-1).values - torch.logsumexp(scaled, -1, keepdim=True))


def _with_tail(kept):
    return torch.cat([kept, (1 - kept.sum(-1, keepdim=True)).clamp_min(0)], -1)


def uld_tail_table(batch: int, seq_len: int, vocab: int, k: int = 10):
    lines = ["| T | dominant gap | similarity | teacher mass outside top-10 | ULD dense | zeros elsewhere | "
             "teacher tail bucket | tail bucket both sides | renormalised over kept |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for temperature, gap in ((1.0, 6.0), (1.0, 2.0), (2.0, 6.0)):
        for similarity in ("identical", "perturbed-0.3", "perturbed-0.6", "independent"):
            student, teacher = logit_pair(batch, seq_len, vocab, similarity=similarity, seed=0, dominant_gap=gap)
            student, teacher = student.reshape(-1, vocab), teacher.reshape(-1, vocab)
            p = torch.softmax(student / temperature, -1)
            dense = sorted_prob_l1(p, torch.softmax(teacher / temperature, -1)).mean().item()
            kept = _kept_probs(teacher, k, temperature)
            variants = [sorted_prob_l1(p, kept), sorted_prob_l1(p, _with_tail(kept)),
                        sorted_prob_l1(_with_tail(_kept_probs(student, k, temperature)), _with_tail(kept)),
                        sorted_prob_l1(p, kept / kept.sum(-1, keepdim=True))]
            cells = [f"{v.mean().item():.4f}" + (f" ({v.mean().item() / dense - 1:+.1%})" if dense > 0 else "")
                     for v in variants]
            tail = (1 - kept.sum(-1)).mean().item()
            lines.append(f"| {temperature:g} | {gap:g} | {similarity} | {tail:.3f} | {dense:.4f} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the script runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["size", "throughput", "uld"], action="append",
                        help="run only these parts (repeatable; default all)")
    args = parser.parse_args()
    quick, parts = args.quick, args.only or ["size", "throughput", "uld"]
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    if "size" in parts:
        print("\n## Size (k = 16, fp16 values)\n")
        print(size_table(tokens=512 if quick else 4096, lengths=(128, 512) if quick else (128, 1024),
                         vocabs=(32000,) if quick else (32000, 151936)))
    if "throughput" in parts:
        print("\n## Capture throughput (CPU, tiny Llama, k = 16, fp32 model, fp16 values, zstd)\n")
        print(throughput_table(examples=8 if quick else 64, chars=1000, batch_size=8,
                               repeats=1 if quick else args.repeats))
    if "uld" in parts:
        print("\n## ULD from top-10 records vs dense logits (mean over positions; relative to dense)\n")
        print(uld_tail_table(batch=2, seq_len=64 if quick else 256, vocab=32000))


if __name__ == "__main__":
    main()
