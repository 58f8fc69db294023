"""Capture a ``transformers`` teacher's top-k records into a store.

    python -m infigw.records capture --model PATH --data FILE --k K --out STORE [options]
    torchrun --nproc_per_node N -m infigw.records capture ...        (N ranks, disjoint slices, one index)

Row t of an example is the top-k of the logits at input position t, i.e. of the distribution predicting token
t+1 (the next-token convention), selected with the library's tie rule (:func:`infigw.reference.select_topk`:
value descending, ties to the smaller id), with ``logsumexp(logits / temperature)`` over the full vocabulary
(in fp32).

Resumable: the store's manifests say which examples are done; a rerun with the same arguments skips them, and
refuses to continue a store made from other data, another model or other options. Rank r of W takes the examples
with ``index % W == r`` that are not done (whatever W was before). ``INFIGW_RECORDS_EXIT_AFTER=N`` (a testing
hook) makes the process exit abruptly after it has handed N examples to the writer, as a kill would.
"""
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch

from ..checks import check_choice, check_count
from ..reference import rank_order, select_topk
from .manifest import file_sha256, merge_index
from .store import StoreMetadata, StoreWriter, tokenizer_identity
from .text import iter_rows, render, token_offsets

#: Compute dtypes of the model (``--dtype``).
MODEL_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: Value dtypes of the store (``--value-dtype``), by their short names.
STORE_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def topk_records(logits: torch.Tensor, k: int):
    """Top-k (values, ids int64) of (N, V) logits in rank order, with :func:`~infigw.reference.select_topk`'s
    tie rule and result.

    One ``torch.topk`` of k + 1 entries settles every row whose k-th and (k+1)-th values differ (then the kept
    set is unique); rows with ties inside it are put in rank order, and rows with a tie at the boundary or a NaN
    go through the reference. Synchronises with the host (which rows need which fix-up).
    """
    vocab = logits.shape[-1]
    values, ids = torch.topk(logits, min(k + 1, vocab), dim=-1)
    boundary = torch.isnan(values).any(-1)
    if k < vocab:
        boundary |= values[:, k - 1] == values[:, k]
    values, ids = values[:, :k], ids[:, :k]
    tied = (values[:, 1:] == values[:, :-1]).any(-1) & ~boundary
    if tied.any():
        rows = tied.nonzero().squeeze(-1)
        ids[rows] = rank_order(values[rows], ids[rows])
    if boundary.any():
        rows = boundary.nonzero().squeeze(-1)
        ids[rows] = select_topk(logits[rows], k)[1]
    return logits.gather(-1, ids), ids


#: |row maximum| up to which exp(logits) can be summed unshifted: exp(64) * 2**24 entries stays far below the fp32
#: maximum, and the largest term exp(-64) is a normal number, so the sum keeps its relative precision.
_UNSHIFTED_RANGE = 64.0


def logsumexp_(rows: torch.Tensor, temperature: float, row_max: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``logsumexp(rows / temperature)`` over the last dimension in fp32, overwriting fp32 ``rows`` (other dtypes
    are converted first); equal to :func:`~infigw.reference.row_logsumexp` up to fp32 rounding.

    An in-place exp and a sum, and no (N, V) temporary (``torch.logsumexp`` takes about 2x longer): the rows are
    shifted by their maximum (and divided by the temperature) only where exp could overflow or underflow.
    ``row_max`` (N, 1), e.g. the top-1 value of the records, saves the pass that finds the maximum.
    """
    work = rows if rows.dtype == torch.float32 else rows.float()
    peak = work.amax(-1, keepdim=True) if row_max is None else row_max.float()
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak)) / temperature  # -inf/inf/NaN rows stay
    if not bool((peak.abs() <= _UNSHIFTED_RANGE).all()) or temperature != 1:
        work.sub_(peak * temperature)
        if temperature != 1:
            work.div_(temperature)
        return peak.squeeze(-1) + work.exp_().sum(-1).log()
    return work.exp_().sum(-1).log()


def _distributed(rank: Optional[int], world_size: Optional[int]):
    """(rank, world size, whether a gloo group was started for the final barrier)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    group = False
    if world_size > 1 and "MASTER_ADDR" in os.environ and torch.distributed.is_available():
        if not torch.distributed.is_initialized():
            # Only the closing barrier uses it, after ranks that may finish hours apart.
            torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size,
                                                 timeout=timedelta(days=7))
            group = True
    return rank, world_size, group


def _load(model, tokenizer, dtype: torch.dtype, device):
    import transformers

    if tokenizer is None and not isinstance(model, (str, Path)):
        raise ValueError("tokenizer is needed (a path or a tokenizer) when model is a loaded model, not a path")
    if isinstance(tokenizer, (str, Path)) or tokenizer is None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer if tokenizer is not None else model))
    model_path = None
    if isinstance(model, (str, Path)):
        model_path = str(model)
        model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    model = model.to(device=device, dtype=dtype).eval()
    return model, tokenizer, model_path


def _vocab_size(model) -> int:
    head = model.get_output_embeddings()
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def _pending(data: Path, tokenizer, rank: int, world_size: int, done, max_length: Optional[int]):
    """Yield (index, ids, offsets, SourceText) of this rank's examples not yet stored."""
    for index, row in iter_rows(data):
        if index % world_size != rank or index in done:
            continue
        where = f"{data}, example {index}"
        source = render(row, tokenizer, where)
        ids, offsets = token_offsets(tokenizer, source.text, add_special_tokens=source.add_special_tokens,
                                     max_length=max_length)
        if len(ids) == 0:
            raise ValueError(f"{where} tokenizes to no tokens; remove empty rows from the data")
        yield index, ids, offsets, source


def _windows(items, size: int):
    window = []
    for item in items:
        window.append(item)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def capture(model, data, out, *, k: int, tokenizer=None, teacher: Optional[str] = None, batch_size: int = 8,
            dtype: str = "fp32", value_dtype: str = "fp16", temperature: float = 1.0, device="cpu",
            max_length: Optional[int] = None, shard_examples: int = 256, compression: str = "zstd",
            sort_window: int = 1024, rank: Optional[int] = None, world_size: Optional[int] = None,
            progress: bool = True) -> dict:
    """Run ``model`` over ``data`` and append its top-k records to the store ``out``.

    Args:
        model: a causal LM (path for ``AutoModelForCausalLM``, or a loaded model, which is moved to ``device`` and
            ``dtype``). tokenizer: path or tokenizer (default: the model's path).
        data: JSONL or Parquet rows, ``{"text", "response_start"?, "response_end"?}`` or ``{"messages"}``.
        out: the store directory. k: entries kept per position. teacher: its name (default the model path).
        batch_size: examples per forward; examples are sorted by length within windows of ``sort_window``.
        dtype: the model's compute dtype, ``"fp32" | "bf16" | "fp16"``. value_dtype: stored values, same names.
        temperature: of the stored logsumexp. device: e.g. ``"cpu"``, ``"cuda"`` (rank r uses ``cuda:LOCAL_RANK``).
        max_length: truncate longer examples to this many tokens.
        shard_examples, compression: of the store. rank, world_size: default ``RANK`` / ``WORLD_SIZE`` from the
            environment (torchrun); each rank writes its own shards and rank 0 merges the index at the end.
    Returns:
        ``{"examples", "tokens", "seconds"}`` of this rank's run.
    """
    check_choice(dtype, "dtype", MODEL_DTYPES)
    check_choice(value_dtype, "value_dtype", STORE_DTYPES)
    check_count(batch_size, "batch_size")
    check_count(sort_window, "sort_window")
    rank, world_size, group = _distributed(rank, world_size)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and world_size > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    model, tokenizer, model_path = _load(model, tokenizer, MODEL_DTYPES[dtype], device)
    data = Path(data)
    identity = tokenizer_identity(tokenizer)
    vocab = _vocab_size(model)
    metadata = StoreMetadata(
        teacher=teacher or model_path or type(model).__name__, tokenizer_name=identity["name"],
        tokenizer_hash=identity["hash"], vocab_size=vocab, k=k, temperature=float(temperature), kind="logits",
        value_dtype=STORE_DTYPES[value_dtype], compression=compression,
        source={"model": model_path, "data": str(data), "data_sha256": file_sha256(data), "dtype": dtype,
                "max_length": max_length})
    writer = StoreWriter(out, metadata, rank=rank, shard_examples=shard_examples)
    exit_after = int(os.environ.get("INFIGW_RECORDS_EXIT_AFTER", "0"))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(unit="ex", desc=f"capture rank {rank}" if world_size > 1 else "capture", position=rank)
    handed, tokens, began = 0, 0, time.perf_counter()
    with writer, torch.inference_mode():
        pending = _pending(data, tokenizer, rank, world_size, writer.done, max_length)
        for window in _windows(pending, sort_window):
            window.sort(key=lambda item: -len(item[1]))
            for first in range(0, len(window), batch_size):
                batch = window[first: first + batch_size]
                lengths = [len(ids) for _, ids, _, _ in batch]
                input_ids = torch.zeros(len(batch), max(lengths), dtype=torch.long)
                attention = torch.zeros_like(input_ids)
                for row, (_, ids, _, _) in enumerate(batch):
                    input_ids[row, : len(ids)] = torch.from_numpy(ids)
                    attention[row, : len(ids)] = 1
                logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                               use_cache=False).logits
                if logits.shape[-1] != vocab:
                    raise RuntimeError(f"the model returned logits of width {logits.shape[-1]}, its output layer "
                                       f"has {vocab} rows")
                for row, (index, ids, offsets, source) in enumerate(batch):
                    rows = logits[row, : len(ids) - 1]
                    values, top_ids = topk_records(rows, k)
                    logsumexp = logsumexp_(rows, temperature, values[:, :1])  # consumes this example's logits
                    writer.add(index, ids, offsets, values.cpu(), top_ids.cpu(), logsumexp.cpu(),
                               response_start=source.response_start, response_end=source.response_end)
                    handed += 1
                    if exit_after and handed >= exit_after:
                        os._exit(3)
                tokens += sum(lengths)
                if bar is not None:
                    bar.update(len(batch))
                    bar.set_postfix_str(f"{tokens / (time.perf_counter() - began):,.0f} tok/s")
    if bar is not None:
        bar.close()
    if group:
        torch.distributed.barrier()
    if rank == 0 and (group or world_size == 1):
        merge_index(out)
    if group:
        torch.distributed.destroy_process_group()
    return {"examples": handed, "tokens": tokens, "seconds": time.perf_counter() - began}
