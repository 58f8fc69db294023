"""Dynamic Logits Fusion: the candidate search, and decoding with it against plain ``generate``.

    python -m benchmarks.bench_dlf --device cuda --out DIR                 # search: B 256, V 32000/128256, T 1/4
    python -m benchmarks.bench_dlf --device cpu --batch 32 --repeat 2      # search, what fits a small CPU box
    python -m benchmarks.bench_dlf --bench decode --device cpu             # decoding tokens/s, tiny models

``--bench search``: fused ``dlf_search`` (Triton on CUDA, torch on CPU) against the brute-force ``dlf_reference``
on fp32 random logits (B, V), (B, V), (B, T, V) with the paper's grid (C = 21·T candidates, one active expert).
The reference evaluates candidates in chunks sized to ``--ref-mem-gib`` (it holds about
``REFERENCE_LIVE_COPIES`` (B, chunk, V) tensors); a cell where one candidate would not fit is skipped. Both must
choose the same candidates, or the benchmark stops.

``--bench decode``: randomly initialised Llama models (a large base, a small base and ``--experts`` small
experts; vocabulary ``--vocab``), a left-padded batch, greedy decoding of ``--new-tokens`` tokens:
plain ``large.generate``, ``large.generate`` with :class:`DLFLogitsProcessor`, and :func:`dlf_generate`, reported
as tokens/s (rows × new tokens / p50 time); plus ``dlf_search`` alone on one step's logits, the α-search overhead
per step.

Timing and rows: :mod:`benchmarks.common` (p50/p20/p80, peak extra memory, one CSV schema); the table printed at
the end adds the derived columns. CSV: ``bench_dlf_<bench>_<device>.csv`` under ``--out``.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from infigw.dlf import DLFLogitsProcessor, candidate_alphas, dlf_generate, dlf_reference, dlf_search

from .common import commit, device_name, row, time_call, write_csv

# The reference holds about this many (B, chunk, V) fp32 tensors at once (logits, log-softmax, exp, products).
REFERENCE_LIVE_COPIES = 4
GIB = 1 << 30
PAD = 0
# Tiny Llama shapes of the decoding benchmark: (hidden, layers, heads); the small models share one shape.
LARGE_SHAPE = (256, 4, 4)
SMALL_SHAPE = (64, 2, 2)
PROMPT_LENGTHS = (24, 17, 32, 9)  # left-padded to the longest; cycled over the batch


def _logits(batch, vocab, experts, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    large = torch.randn(batch, vocab, device=device, generator=g) * 3
    small = torch.randn(batch, vocab, device=device, generator=g) * 3
    expert = small.unsqueeze(1) + torch.randn(batch, experts, vocab, device=device, generator=g)
    return large, small, expert


def _timing_options(device, repeat):
    return {} if torch.device(device).type == "cuda" else {"repeat": repeat}


def bench_search(device, batch, vocabs, experts_list, repeat, ref_mem_gib):
    backend = "triton" if torch.device(device).type == "cuda" else "torch"
    rows, table = [], []
    for vocab in vocabs:
        for experts in experts_list:
            inputs = _logits(batch, vocab, experts, device)
            num_c = candidate_alphas(experts).shape[0]
            shape = f"B={batch},V={vocab},T={experts},C={num_c}"
            fused = time_call(lambda: dlf_search(*inputs, backend=backend), device, **_timing_options(device, repeat))
            rows.append(row("dlf_search", backend, "single", shape, fused, device))
            chunk = min(num_c, int(ref_mem_gib * GIB // (REFERENCE_LIVE_COPIES * batch * vocab * 4)))
            reference = None
            if chunk >= 1:
                if not torch.equal(dlf_search(*inputs, backend=backend).candidate,
                                   dlf_reference(*inputs, candidate_chunk=chunk).candidate):
                    raise AssertionError(f"{shape}: the fused search and the reference chose different candidates")
                reference = time_call(lambda: dlf_reference(*inputs, candidate_chunk=chunk), device,
                                      **_timing_options(device, repeat))
                rows.append(row("dlf_reference", "torch", "single", f"{shape},chunk={chunk}", reference, device))
            table.append((shape, num_c, fused, reference, chunk))
            print(f"{shape}: fused {fused.p50_ms:.2f} ms, reference "
                  f"{'skipped' if reference is None else f'{reference.p50_ms:.2f} ms'}", flush=True)
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
    lines = ["| B, V, T, C | reference p50 ms | fused p50 ms | speed-up | ref extra mem | fused extra mem |",
             "|---|---|---|---|---|---|"]
    for shape, num_c, fused, reference, chunk in table:
        ref = "skipped" if reference is None else f"{reference.p50_ms:.1f}"
        if reference is not None and chunk < num_c:
            ref += f" (chunks of {chunk})"
        speed = "—" if reference is None else f"{reference.p50_ms / fused.p50_ms:.1f}×"
        lines.append(f"| {shape} | {ref} | {fused.p50_ms:.2f} | {speed} | "
                     f"{_mib(reference.peak_extra_bytes) if reference else '—'} | {_mib(fused.peak_extra_bytes)} |")
    return rows, "\n".join(lines)


def _mib(n):
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def _tiny_llama(shape, vocab, seed, device):
    import transformers

    hidden, layers, heads = shape
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=None,  # no EOS: every row decodes every token
    )
    return transformers.LlamaForCausalLM(config).to(device).eval()


def bench_decode(device, batch, vocab, num_experts, new_tokens, repeat):
    large = _tiny_llama(LARGE_SHAPE, vocab, 0, device)
    small = _tiny_llama(SMALL_SHAPE, vocab, 1, device)
    experts = [_tiny_llama(SMALL_SHAPE, vocab, 2 + t, device) for t in range(num_experts)]
    lengths = [PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)] for i in range(batch)]
    width = max(lengths)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, width), generator=g)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, width - n:] = 1
    ids = ids.masked_fill(mask == 0, PAD).to(device)
    mask = mask.to(device)
    backend = "triton" if torch.device(device).type == "cuda" else "torch"
    shape = f"B={batch},prompt<={width},new={new_tokens},V={vocab},T={num_experts}"
    options = _timing_options(device, repeat)

    def plain():
        return large.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD)

    def with_processor():
        processor = DLFLogitsProcessor(small, experts, mask, backend=backend)
        return large.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=PAD, logits_processor=[processor])

    def own_loop():
        return dlf_generate(large, small, experts, ids, mask, max_new_tokens=new_tokens, backend=backend)

    if not torch.equal(with_processor(), own_loop().sequences):
        raise AssertionError("generate with DLFLogitsProcessor and dlf_generate decoded different tokens")
    step_logits = _logits(batch, vocab, num_experts, device, seed=1)
    cases = [
        ("generate", "hf", "greedy", plain),
        ("generate+DLFLogitsProcessor", backend, "greedy", with_processor),
        ("dlf_generate", backend, "greedy", own_loop),
        ("dlf_search", backend, "single", lambda: dlf_search(*step_logits, backend=backend)),
    ]
    rows, timings = [], {}
    with torch.no_grad():
        for op, case_backend, mode, fn in cases:
            timings[op] = time_call(fn, device, **options)
            rows.append(row(op, case_backend, mode, shape if op != "dlf_search" else
                            f"B={batch},V={vocab},T={num_experts}", timings[op], device))
            print(f"{op}: p50 {timings[op].p50_ms:.1f} ms", flush=True)
    tokens = batch * new_tokens
    plain_step = timings["generate"].p50_ms / new_tokens
    search = timings["dlf_search"].p50_ms
    lines = [f"{shape}; large {LARGE_SHAPE}, small {SMALL_SHAPE} (hidden, layers, heads)", "",
             "| decoding | p50 s | tokens/s | ms per step | vs plain generate | α search share of a step |",
             "|---|---|---|---|---|---|"]
    for op in ("generate", "generate+DLFLogitsProcessor", "dlf_generate"):
        t = timings[op]
        step = t.p50_ms / new_tokens
        share = "—" if op == "generate" else f"{search / step:.0%}"
        lines.append(f"| {op} | {t.p50_ms / 1e3:.2f} | {tokens / (t.p50_ms / 1e3):.0f} | {step:.1f} | "
                     f"{plain_step / step:.2f}× | {share} |")
    alone = timings["dlf_search"]
    lines.append(f"\nα search alone (`dlf_search`, one step's (B, V) logits, C = {21 * num_experts}): "
                 f"p50 {search:.2f} ms (p20 {alone.p20_ms:.2f}, p80 {alone.p80_ms:.2f})")
    return rows, "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", choices=("search", "decode"), default="search")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    parser.add_argument("--batch", type=int, default=None, help="default: 256 (search), 4 (decode)")
    parser.add_argument("--vocab", type=int, nargs="+", default=None,
                        help="default: 32000 128256 (search), 32000 (decode: the first value is used)")
    parser.add_argument("--experts", type=int, nargs="+", default=None, help="default: 1 4 (search), 2 (decode)")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode: tokens generated per row")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls on CPU (CUDA: do_bench's time budget)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 for decode, where tiny models gain nothing from intra-op "
                        "threads and a loaded machine makes them much slower; torch's default for search)")
    parser.add_argument("--ref-mem-gib", type=float, default=None,
                        help="search: memory budget of the reference's candidate chunks (default: 4 on CPU, half the "
                        "free GPU memory on CUDA)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a visible CUDA device")
    threads = args.threads or (1 if args.bench == "decode" else None)
    if threads:
        torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, {device_name(args.device)}, threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}, commit {commit()}", flush=True)
    if args.bench == "search":
        if args.ref_mem_gib is not None:
            ref_mem = args.ref_mem_gib
        else:
            ref_mem = torch.cuda.mem_get_info()[0] / GIB / 2 if args.device == "cuda" else 4.0
        rows, table = bench_search(args.device, args.batch or 256, args.vocab or [32000, 128256],
                                   args.experts or [1, 4], args.repeat, ref_mem)
    else:
        rows, table = bench_decode(args.device, args.batch or 4, (args.vocab or [32000])[0],
                                   (args.experts or [2])[0], args.new_tokens, args.repeat)
    path = args.out / f"bench_dlf_{args.bench}_{args.device}.csv"
    write_csv(rows, str(path))
    print(f"\n{table}\n\nwrote {path}")


if __name__ == "__main__":
    main()
