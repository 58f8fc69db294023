"""Importers: DistillKit's Parquet shards and vLLM ``prompt_logprobs`` into a record store (kind ``logprobs``).

Both formats hold, per example, the token ids and for every position after the first the top-k log-probabilities
over the full vocabulary (so the stored logsumexp is 0) of the token that position predicts; neither holds the
text. With a ``tokenizer`` the importers recover character spans by re-encoding the text (the given prompt, else
the decoded ids) and checking that it gives the same ids; ``offsets=False`` stores unknown spans (-1) instead,
and such records can only be paired by index.

Formats, as documented by their projects (read, not copied):

- DistillKit (``distillkit/sample_logits_vllm.py``, ``compression/``): Parquet rows ``input_ids``
  (list<uint64>), ``compressed_logprobs`` (list<list<uint8>>, one byte row per position 1..T-1) and
  ``bytepacked_indices`` (list<list<uint8>>), plus ``compression_config.yaml`` beside the shards. A byte row of
  log-probs (sorted descending) is: ``exact_k`` values in ``exact_dtype``; one coefficient per polynomial term in
  ``term_dtype``; per residual bin a scale in ``scale_dtype`` then ``num_elements`` integers of ``element_bits``
  bits, packed most significant bit first. The tail ``k - exact_k`` values are the polynomial (terms ``t**i``,
  ``sqrt(t)``, ``exp(t)`` over ``t = 0..n-1``, or ``linspace(0, 1, n)`` with ``normalize_t``) plus the
  dequantised residuals (``(q - 2**(b-1)) * scale``; ``(2q - 1) * scale`` for 1 bit), zero where the bins end;
  with ``delta_encoding`` the row holds the first value and successive differences. Ids are packed MSB first with
  ``ceil(log2(d))`` bits each. Decoded here in float64, then stored in ``value_dtype``.
- vLLM (``SamplingParams(prompt_logprobs=k)``): ``RequestOutput.prompt_logprobs`` is a list, one entry per prompt
  token: ``None`` for the first, then ``{token_id: Logprob(logprob, rank, decoded_token)}`` holding the top-k
  plus the actual prompt token when it ranks lower. In JSON (the OpenAI-compatible server's ``choices[i]`` of a
  completion, or the top level of a chat completion) the ids are string keys and each ``Logprob`` an object.
  The importer keeps the k entries with the largest log-probabilities (ties to the smaller id).
"""
import math
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from ..checks import check_count
from .store import StoreMetadata, StoreWriter, tokenizer_identity
from .text import token_offsets

_FLOAT_TYPES = {"float16": (np.float16, 2), "bfloat16": (None, 2), "float32": (np.float32, 4),
                "float64": (np.float64, 8)}


# ------------------------------------------------------------------------------------------------- shared
def _offsets_for(tokenizer, ids: np.ndarray, text: Optional[str], with_offsets: bool, where: str) -> np.ndarray:
    """Character spans of ``ids`` from re-encoding ``text`` (or the decoded ids); -1 when ``with_offsets`` is off."""
    if not with_offsets:
        return np.full((len(ids), 2), -1, dtype=np.int64)
    if text is not None:
        attempts = [(text, True), (text, False)]
    else:
        attempts = [(tokenizer.decode(ids.tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False),
                     False)]
    for candidate, special in attempts:
        encoded, offsets = token_offsets(tokenizer, candidate, add_special_tokens=special)
        if np.array_equal(encoded, ids):
            return offsets
    raise ValueError(f"{where}: the tokenizer does not re-encode the example's text to its token ids, so character "
                     f"offsets cannot be recovered; check the tokenizer, or import with offsets=False (the records "
                     f"can then only be paired by index)")


def _writer(out, tokenizer, *, teacher, vocab_size, k, temperature, value_dtype, compression, shard_examples,
            source) -> StoreWriter:
    identity = tokenizer_identity(tokenizer)
    metadata = StoreMetadata(teacher=teacher, tokenizer_name=identity["name"], tokenizer_hash=identity["hash"],
                             vocab_size=vocab_size, k=k, temperature=float(temperature), kind="logprobs",
                             value_dtype=value_dtype, compression=compression, source=source)
    return StoreWriter(out, metadata, shard_examples=shard_examples)


# ---------------------------------------------------------------------------------------------- DistillKit
def _unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """(rows, bytes) uint8, MSB-first -> (rows, count) uint64."""
    stream = np.unpackbits(packed, axis=-1)[:, : count * bits].reshape(len(packed), count, bits).astype(np.uint64)
    return (stream << np.arange(bits - 1, -1, -1, dtype=np.uint64)).sum(-1, dtype=np.uint64)


def _read_floats(raw: np.ndarray, dtype: str, count: int) -> np.ndarray:
    """(rows, count * size) little-endian bytes -> (rows, count) float64."""
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(raw).view("<u2").astype(np.uint32) << 16
        return bits.view(np.float32).astype(np.float64).reshape(len(raw), count)
    return np.ascontiguousarray(raw).view(np.dtype(_FLOAT_TYPES[dtype][0]).newbyteorder("<")).astype(
        np.float64).reshape(len(raw), count)


class DistillKitCodec:
    """Decoder of DistillKit's ``DistributionQuantizationConfig`` byte rows (see the module docstring)."""

    def __init__(self, config: dict):
        if not isinstance(config, dict):
            raise TypeError(f"the DistillKit compression config must be a mapping, got {type(config).__name__}")
        try:
            self.d, self.k, self.exact_k = int(config["d"]), int(config["k"]), int(config["exact_k"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"the DistillKit compression config needs integer d, k and exact_k ({error!r})") from None
        self.exact_dtype = str(config.get("exact_dtype", "float32"))
        self.term_dtype = str(config.get("term_dtype", "float32"))
        self.terms = list(config.get("polynomial_terms") or [])
        self.bins = [(str(b.get("scale_dtype")), int(b["element_bits"]), int(b["num_elements"]))
                     for b in config.get("residual_bins") or []]
        self.delta = bool(config.get("delta_encoding", True))
        self.normalize_t = bool(config.get("normalize_t", False))
        for name in [self.exact_dtype, self.term_dtype] + [b[0] for b in self.bins]:
            if name not in _FLOAT_TYPES:
                raise ValueError(f"DistillKit dtype {name!r} is not one of {tuple(_FLOAT_TYPES)}")
        for term in self.terms:
            if term not in ("sqrt", "exp") and (isinstance(term, bool) or not isinstance(term, int)):
                raise ValueError(f"DistillKit polynomial term {term!r} is neither an int power, 'sqrt' nor 'exp'")
        if not (1 <= self.d and 0 <= self.exact_k <= self.k <= self.d):
            raise ValueError(f"DistillKit config needs 0 <= exact_k <= k <= d, got d={self.d}, k={self.k}, "
                             f"exact_k={self.exact_k}")
        if any(not 1 <= bits <= 64 or n < 1 for _, bits, n in self.bins) or \
                sum(n for _, _, n in self.bins) > self.k - self.exact_k:
            raise ValueError("DistillKit residual bins need 1..64 bits, >= 1 element each, and at most k - exact_k "
                             "elements in all")
        self.index_bits = max(1, math.ceil(math.log2(self.d)))
        self.value_bytes = (self.exact_k * _FLOAT_TYPES[self.exact_dtype][1]
                            + len(self.terms) * _FLOAT_TYPES[self.term_dtype][1]
                            + sum(_FLOAT_TYPES[s][1] + (n * bits + 7) // 8 for s, bits, n in self.bins))
        self.index_bytes = (self.k * self.index_bits + 7) // 8

    def _tail_basis(self) -> np.ndarray:
        n = self.k - self.exact_k
        t = np.linspace(0.0, 1.0, n) if self.normalize_t else np.arange(n, dtype=np.float64)
        columns = [np.sqrt(t) if term == "sqrt" else np.exp(t) if term == "exp" else t ** term for term in self.terms]
        return np.stack(columns, -1) if columns else np.zeros((n, 0))

    def decode(self, logprob_bytes: np.ndarray, index_bytes: np.ndarray):
        """(P, value_bytes), (P, index_bytes) uint8 -> log-probs (P, k) float64 and ids (P, k) int64."""
        rows = len(logprob_bytes)
        if logprob_bytes.shape[1:] != (self.value_bytes,) or index_bytes.shape[1:] != (self.index_bytes,):
            raise ValueError(f"DistillKit rows have {logprob_bytes.shape[1:]} log-prob and {index_bytes.shape[1:]} "
                             f"index bytes; the compression config implies ({self.value_bytes},) and "
                             f"({self.index_bytes},): wrong compression_config.yaml?")
        cursor = 0

        def take(count):
            nonlocal cursor
            cursor += count
            return logprob_bytes[:, cursor - count: cursor]

        exact = _read_floats(take(self.exact_k * _FLOAT_TYPES[self.exact_dtype][1]), self.exact_dtype, self.exact_k)
        coefficients = _read_floats(take(len(self.terms) * _FLOAT_TYPES[self.term_dtype][1]), self.term_dtype,
                                    len(self.terms))
        residual = np.zeros((rows, self.k - self.exact_k))
        filled = 0
        for scale_dtype, bits, n in self.bins:
            scale = _read_floats(take(_FLOAT_TYPES[scale_dtype][1]), scale_dtype, 1)
            q = _unpack_bits(take((n * bits + 7) // 8), bits, n).astype(np.float64)
            residual[:, filled: filled + n] = (2 * q - 1 if bits == 1 else q - 2.0 ** (bits - 1)) * scale
            filled += n
        tail = coefficients @ self._tail_basis().T + residual
        values = np.concatenate([exact, tail], axis=-1)
        if self.delta:
            values = np.cumsum(values, axis=-1)
        ids = _unpack_bits(index_bytes, self.index_bits, self.k).astype(np.int64)
        return values, ids


def _load_config(config, path: Path) -> dict:
    if isinstance(config, dict):
        return config
    config_path = Path(config) if config is not None else (path if path.is_dir() else path.parent) / \
        "compression_config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"DistillKit compression config {config_path} not found; pass config=")
    import yaml

    return yaml.safe_load(config_path.read_text())


def _byte_rows(rows, width: int, where: str, column: str) -> np.ndarray:
    try:
        return np.array(rows, dtype=np.uint8).reshape(-1, width)
    except ValueError:
        raise ValueError(f"{where}: '{column}' rows are not all {width} bytes long") from None


def import_distillkit(path, out, *, tokenizer, teacher: str = "distillkit", config=None,
                      vocab_size: Optional[int] = None, value_dtype: str = "float32", compression: str = "zstd",
                      offsets: bool = True, shard_examples: int = 256) -> dict:
    """Import DistillKit Parquet shards (a file or a directory of ``*.parquet``, in name order) into a store.

    Args:
        path: the Parquet file or directory; example i is the i-th row over the files.
        out: the store directory (created, or resumed: examples already there are skipped).
        tokenizer: the teacher's tokenizer (its identity goes into the store; spans come from re-encoding).
        config: the compression config (a dict or a YAML path; default ``compression_config.yaml`` beside the data).
        vocab_size: the teacher's output width (default the config's ``d``).
        value_dtype, compression, shard_examples: as in :class:`~infigw.records.StoreMetadata` / the writer.
        offsets: recover character spans (default); ``False`` stores -1.
    Returns:
        ``{"examples": imported now, "tokens": their tokens}``.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"no DistillKit Parquet shards at {path}")
    settings = _load_config(config, path)
    codec = DistillKitCodec(settings)
    vocab_size = codec.d if vocab_size is None else check_count(vocab_size, "vocab_size")
    writer = _writer(out, tokenizer, teacher=teacher, vocab_size=vocab_size, k=codec.k, temperature=1.0,
                     value_dtype=value_dtype, compression=compression, shard_examples=shard_examples,
                     source={"importer": "distillkit", "path": str(path), "compression_config": settings})
    index, stats = 0, {"examples": 0, "tokens": 0}
    with writer:
        for file in files:
            columns = ("input_ids", "compressed_logprobs", "bytepacked_indices")
            missing = set(columns) - set(pq.read_schema(file).names)
            if missing:
                raise ValueError(f"{file} is not a DistillKit logit shard: no column(s) {sorted(missing)}")
            for batch in pq.ParquetFile(file).iter_batches(batch_size=256, columns=list(columns)):
                for row in batch.to_pylist():
                    if index not in writer.done:
                        where = f"{file.name}, example {index}"
                        ids = np.asarray(row["input_ids"], dtype=np.int64)
                        values, top_ids = codec.decode(
                            _byte_rows(row["compressed_logprobs"], codec.value_bytes, where, "compressed_logprobs"),
                            _byte_rows(row["bytepacked_indices"], codec.index_bytes, where, "bytepacked_indices"))
                        if len(values) != len(ids) - 1:
                            raise ValueError(f"{where}: {len(values)} log-prob rows for {len(ids)} input_ids; "
                                             f"expected one row per token after the first")
                        writer.add(index, ids, _offsets_for(tokenizer, ids, None, offsets, where), values, top_ids,
                                   np.zeros(len(values), np.float32))
                        stats["examples"] += 1
                        stats["tokens"] += len(ids)
                    index += 1
    return stats


# ---------------------------------------------------------------------------------------------------- vLLM
def _field(item, name: str):
    return item.get(name) if isinstance(item, dict) else getattr(item, name, None)


def _vllm_parts(item, where: str):
    """(prompt token ids, prompt_logprobs, prompt text or None) of a RequestOutput, or of a server response."""
    holder = item
    if isinstance(item, dict) and item.get("choices"):
        holder = item["choices"][0]
    ids = _field(holder, "prompt_token_ids") or _field(item, "prompt_token_ids")
    logprobs = _field(holder, "prompt_logprobs") or _field(item, "prompt_logprobs")
    if ids is None or logprobs is None:
        raise ValueError(f"{where} has no prompt_token_ids and prompt_logprobs (request prompt_logprobs=k, and "
                         f"the prompt's token ids)")
    text = _field(item, "prompt")
    return np.asarray(list(ids), dtype=np.int64), list(logprobs), text if isinstance(text, str) else None


def _logprob_value(entry, where: str) -> float:
    value = entry.get("logprob") if isinstance(entry, dict) else getattr(entry, "logprob", entry)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: a prompt_logprobs entry holds no log-probability ({entry!r})") from None
    if math.isnan(value):
        raise ValueError(f"{where}: a prompt_logprobs entry is NaN")
    return value


def _top_entries(position, k: int, where: str):
    """The k entries with the largest log-probs of one position's {id: Logprob}, ties to the smaller id."""
    if not position:
        raise ValueError(f"{where}: no log-probs at this position (request prompt_logprobs >= k)")
    ids = np.array([int(token) for token in position], dtype=np.int64)
    values = np.array([_logprob_value(entry, where) for entry in position.values()], dtype=np.float64)
    if len(ids) < k:
        raise ValueError(f"{where}: {len(ids)} log-probs at this position, fewer than k={k} (request "
                         f"prompt_logprobs >= k)")
    order = np.lexsort((ids, -values))[:k]
    return values[order], ids[order]


def import_vllm(outputs: Union[str, Path, Iterable[Any]], out, *, tokenizer, k: int,
                vocab_size: Optional[int] = None, teacher: str = "vllm", temperature: float = 1.0,
                value_dtype: str = "float32", compression: str = "zstd", offsets: bool = True,
                shard_examples: int = 256, texts: Optional[Sequence[str]] = None) -> dict:
    """Import vLLM ``prompt_logprobs`` into a store.

    Args:
        outputs: a JSONL file of server responses (or of ``{"prompt_token_ids", "prompt_logprobs"[, "prompt"]}``
            objects), or an iterable of ``vllm.RequestOutput`` (or such dicts); example i is the i-th one.
        out: the store directory (created, or resumed: examples already there are skipped).
        tokenizer: the teacher's tokenizer. k: entries kept per position (<= the prompt_logprobs requested).
        vocab_size: the teacher's output width (default the tokenizer's size).
        temperature: the temperature the log-probs were taken at (1 for vLLM's default ``raw_logprobs``).
        texts: optional prompt texts (one per output) for the character spans; a RequestOutput's ``prompt`` is
            used otherwise, else the decoded ids.
        value_dtype, compression, offsets, shard_examples: as in :func:`import_distillkit`.
    Returns:
        ``{"examples": imported now, "tokens": their tokens}``.
    """
    from .text import iter_rows

    k = check_count(k, "k")
    vocab_size = len(tokenizer) if vocab_size is None else check_count(vocab_size, "vocab_size")
    source_path = str(outputs) if isinstance(outputs, (str, Path)) else None
    items = (row for _, row in iter_rows(outputs)) if source_path is not None else iter(outputs)
    writer = _writer(out, tokenizer, teacher=teacher, vocab_size=vocab_size, k=k, temperature=temperature,
                     value_dtype=value_dtype, compression=compression, shard_examples=shard_examples,
                     source={"importer": "vllm", "path": source_path})
    stats = {"examples": 0, "tokens": 0}
    with writer:
        for index, item in enumerate(items):
            if index in writer.done:
                continue
            where = f"vLLM output {index}"
            ids, positions, text = _vllm_parts(item, where)
            if texts is not None:
                text = texts[index]
            if len(positions) != len(ids):
                raise ValueError(f"{where}: {len(positions)} prompt_logprobs entries for {len(ids)} prompt tokens")
            rows = [_top_entries(position, k, f"{where}, position {t}") for t, position in enumerate(positions[1:], 1)]
            values = np.stack([v for v, _ in rows]) if rows else np.zeros((0, k))
            top_ids = np.stack([i for _, i in rows]) if rows else np.zeros((0, k), np.int64)
            writer.add(index, ids, _offsets_for(tokenizer, ids, text, offsets, where), values, top_ids,
                       np.zeros(len(values), np.float32))
            stats["examples"] += 1
            stats["tokens"] += len(ids)
    return stats
