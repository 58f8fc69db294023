"""The record store: a directory of Arrow IPC shards with random access by example index.

Layout of a store directory::

    meta.json                  StoreMetadata (teacher, tokenizer identity, vocabulary size, k, ...)
    manifest.json              the merged index: shards and the example indices each holds
    manifest-r00003.json       the index part of writer rank 3 (until merged into manifest.json)
    shards/r00003-000012.arrow shard 12 of rank 3: one Arrow record batch per example

One row of a shard is one *record position* t of an example (the next-token convention): the teacher's top-k
at input position t, which predicts token t+1, together with that target token's id and character span. An
example of T tokens has T - 1 rows; its first token (id and span) is kept in the batch's metadata.

Writes are append-only and crash-safe: a shard is written under a temporary name, fsynced and renamed; then the
writer's manifest part is replaced atomically (temporary file + ``os.replace``). A reader only sees shards a
manifest lists, so a kill at any moment leaves a readable store without partial or duplicated examples. A shard
renamed just before a kill (not yet in a manifest) is adopted by the next writer of that rank or by
:func:`merge_index`; one whose examples are already indexed is removed (:mod:`infigw.records.manifest`).
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np
import torch

from .. import __version__
from ..checks import check_count
from ..durable import atomic_write
from .manifest import (SHARD_FILE, RecordStoreError, adopt_orphans, file_sha256, import_pyarrow,
                       indexed_examples, load_index, lock_rank, read_json)

FORMAT_VERSION = 1
KINDS = ("logits", "logprobs")
VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
COMPRESSIONS = ("zstd", "none")
#: The position convention every store follows (kept in meta.json so a reader can check it).
CONVENTION = "next-token"
#: Largest vocabulary the id encoding holds: 16 low bits in a uint16 plane plus 8 high bits in a uint8 plane.
MAX_VOCAB = 1 << 24
_MAX_OPEN_SHARDS = 64



class TokenizerMismatchError(ValueError):
    """The store was written with another tokenizer than the one the caller declares."""



# ------------------------------------------------------------------------------------------------ metadata
@dataclass(frozen=True)
class StoreMetadata:
    """What every record of a store shares.

    Attributes:
        teacher: the teacher's name (e.g. its model path or hub name).
        tokenizer_name: the teacher tokenizer's name (informative).
        tokenizer_hash: sha256 of the tokenizer's vocabulary (see :func:`tokenizer_identity`): its identity.
        vocab_size: width V of the teacher's output (may exceed the tokenizer's size when the vocabulary is padded).
        k: entries kept per position.
        temperature: the temperature T of the stored logsumexp, ``logsumexp(logits / T)``.
        kind: ``"logits"`` (raw logits) or ``"logprobs"`` (log-probabilities over the full vocabulary).
        value_dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"``.
        compression: ``"zstd"`` (Arrow IPC buffer compression) or ``"none"`` (zero-copy memory-mapped reads).
        source: provenance (model and data paths, data sha256, importer, ...); part of a store's identity on resume.
        infigw_version: the version that created the store (informative).
        convention: always ``"next-token"``: row t holds the distribution at position t, predicting token t+1.
        format_version: the on-disk format version.
    """

    teacher: str
    tokenizer_name: str
    tokenizer_hash: str
    vocab_size: int
    k: int
    temperature: float = 1.0
    kind: str = "logits"
    value_dtype: str = "float16"
    compression: str = "zstd"
    source: Dict[str, Any] = field(default_factory=dict)
    infigw_version: str = __version__
    convention: str = CONVENTION
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if not isinstance(self.teacher, str) or not self.teacher:
            raise ValueError(f"teacher must be a non-empty string, got {self.teacher!r}")
        if not isinstance(self.tokenizer_hash, str) or not re.fullmatch(r"[0-9a-f]{64}", self.tokenizer_hash):
            raise ValueError(f"tokenizer_hash must be a sha256 hex digest, got {self.tokenizer_hash!r}")
        vocab = self.vocab_size
        if isinstance(vocab, bool) or not isinstance(vocab, int) or not 1 <= vocab <= MAX_VOCAB:
            raise ValueError(f"vocab_size must be an int in [1, {MAX_VOCAB}], got {self.vocab_size!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= self.vocab_size:
            raise ValueError(f"k must be an int in [1, vocab_size={self.vocab_size}], got {self.k!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        for name, value, choices in (("kind", self.kind, KINDS), ("value_dtype", self.value_dtype, VALUE_DTYPES),
                                     ("compression", self.compression, COMPRESSIONS)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
        if self.convention != CONVENTION:
            raise RecordStoreError(f"unknown position convention {self.convention!r} "
                                   f"(this infigw reads {CONVENTION!r})")
        if self.format_version != FORMAT_VERSION:
            raise RecordStoreError(f"store format version {self.format_version} is not supported "
                                   f"(this infigw reads version {FORMAT_VERSION})")

    @property
    def wide_ids(self) -> bool:
        """Whether ids need the high (bits 16-23) plane."""
        return self.vocab_size > (1 << 16)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "meta.json") -> "StoreMetadata":
        try:
            fields = json.loads(text)
            return cls(**fields)
        except (json.JSONDecodeError, TypeError) as error:
            raise RecordStoreError(f"{where} is not a valid infigw.records metadata file: {error}") from error

    def differences(self, other: "StoreMetadata") -> List[str]:
        """The fields (but the informative infigw_version) in which two metadata differ, as 'name: a != b'."""
        mine, theirs = dataclasses.asdict(self), dataclasses.asdict(other)
        return [f"{name}: {mine[name]!r} != {theirs[name]!r}" for name in mine
                if name != "infigw_version" and mine[name] != theirs[name]]


def tokenizer_identity(tokenizer) -> Dict[str, Any]:
    """``{"name", "hash", "size"}`` of a tokenizer: its name, the sha256 of its sorted token -> id map (added
    tokens included) and its size. Two tokenizers with the same hash map every token string to the same id."""
    vocab = tokenizer.get_vocab()
    canonical = json.dumps(sorted(vocab.items()), ensure_ascii=False, separators=(",", ":"))
    return {"name": str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
            "hash": hashlib.sha256(canonical.encode("utf-8")).hexdigest(), "size": len(vocab)}


def check_tokenizer(metadata: StoreMetadata, tokenizer=None, expected_tokenizer_hash: Optional[str] = None,
                    where: str = "store"):
    """Refuse a store whose tokenizer identity differs from the declared one (a tokenizer or a hash)."""
    declared = []
    if tokenizer is not None:
        identity = tokenizer_identity(tokenizer)
        declared.append((f"tokenizer {identity['name']!r}", identity["hash"]))
    if expected_tokenizer_hash is not None:
        declared.append(("expected_tokenizer_hash", str(expected_tokenizer_hash)))
    for what, digest in declared:
        if digest != metadata.tokenizer_hash:
            raise TokenizerMismatchError(
                f"{where} was written with tokenizer {metadata.tokenizer_name!r} (vocabulary sha256 "
                f"{metadata.tokenizer_hash[:16]}...), but {what} has vocabulary sha256 {digest[:16]}...: the records' "
                f"token ids would index another vocabulary")


# ---------------------------------------------------------------------------------------------- file helpers
# --------------------------------------------------------------------------------------------- id planes
def _split_ids(ids: np.ndarray, wide: bool):
    """int ids -> (uint16 low plane, uint8 high plane or None)."""
    ids = ids.astype(np.int64, copy=False)
    return (ids & 0xFFFF).astype(np.uint16), ((ids >> 16) & 0xFF).astype(np.uint8) if wide else None


def _join_ids(low: np.ndarray, high: Optional[np.ndarray]) -> np.ndarray:
    ids = low.astype(np.int32)
    if high is not None:
        ids |= high.astype(np.int32) << 16
    return ids


# ------------------------------------------------------------------------------------------------ examples
@dataclass(frozen=True, eq=False)
class Example:
    """One example's records, read from a store (tensors on the CPU).

    Attributes:
        index: the example's index in the source data.
        token_ids: (T,) int64 the teacher's tokens of the example.
        offsets: (T, 2) int64 each token's character span [start, end) in the text the teacher tokenized
            (-1 where unknown, e.g. records imported without a tokenizer).
        values: (T - 1, k) in the store's value dtype: row t holds the top-k at position t, predicting token t+1,
            in rank order (value descending, ties to the smaller id).
        indices: (T - 1, k) int32 their vocabulary ids.
        logsumexp: (T - 1,) float32 logsumexp over the full vocabulary of logits / temperature (0 for log-probs).
        response_start, response_end: the response's character span in the text (None: not marked).
        metadata: the store's :class:`StoreMetadata`.
    """

    index: int
    token_ids: torch.Tensor
    offsets: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor
    logsumexp: torch.Tensor
    response_start: Optional[int]
    response_end: Optional[int]
    metadata: StoreMetadata = field(repr=False)

    @property
    def num_positions(self) -> int:
        """Record rows T - 1."""
        return int(self.values.shape[0])

    @property
    def target_ids(self) -> torch.Tensor:
        """(T - 1,) the token each row predicts."""
        return self.token_ids[1:]

    @property
    def target_offsets(self) -> torch.Tensor:
        """(T - 1, 2) the character spans of the tokens the rows predict (the offsets alignment uses)."""
        return self.offsets[1:]


def _as_numpy(x, dtype=None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.float()
        x = x.numpy()
    x = np.asarray(x)
    return x.astype(dtype, copy=False) if dtype is not None else x


def _values_to_bits(values, value_dtype: str) -> np.ndarray:
    """Values (rows, k) -> the stored array: float16 / float32, or the bfloat16 bit pattern as uint16."""
    if value_dtype == "bfloat16":
        tensor = values if isinstance(values, torch.Tensor) else torch.from_numpy(np.asarray(values, np.float32))
        return tensor.detach().cpu().to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return _as_numpy(values, np.float16 if value_dtype == "float16" else np.float32)


def _bits_to_values(array: np.ndarray, value_dtype: str) -> torch.Tensor:
    if value_dtype == "bfloat16":
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


# --------------------------------------------------------------------------------------------- shard schema
def _schema(metadata: StoreMetadata):
    pa = import_pyarrow()
    k = metadata.k
    value_type = {"float16": pa.float16(), "float32": pa.float32(), "bfloat16": pa.uint16()}[metadata.value_dtype]
    fields = [pa.field("target", pa.uint16()), pa.field("start", pa.int32()), pa.field("end", pa.int32()),
              pa.field("values", pa.list_(value_type, k)), pa.field("ids", pa.list_(pa.uint16(), k)),
              pa.field("logsumexp", pa.float32())]
    if metadata.wide_ids:
        fields += [pa.field("target_hi", pa.uint8()), pa.field("ids_hi", pa.list_(pa.uint8(), k))]
    return pa.schema(fields, metadata={"infigw.records.format_version": str(FORMAT_VERSION)})


def _fixed_list(array: np.ndarray, k: int):
    pa = import_pyarrow()
    flat = np.ascontiguousarray(array).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), k)


def _span(value) -> str:
    return "" if value is None else str(int(value))


def _example_batch(metadata: StoreMetadata, schema, index: int, token_ids, offsets, values, indices, logsumexp,
                   response_start, response_end):
    """Validate one example and turn it into (record batch, custom metadata)."""
    pa = import_pyarrow()
    k, vocab = metadata.k, metadata.vocab_size
    token_ids = _as_numpy(token_ids, np.int64).reshape(-1)
    offsets = _as_numpy(offsets, np.int64)
    rows = token_ids.shape[0] - 1
    if rows < 0:
        raise ValueError(f"example {index}: token_ids must hold at least one token")
    if offsets.shape != (rows + 1, 2):
        raise ValueError(f"example {index}: offsets must have shape (T, 2) = ({rows + 1}, 2), got {offsets.shape}")
    indices = _as_numpy(indices, np.int64)
    lse = _as_numpy(logsumexp, np.float32)
    value_shape = tuple(values.shape)
    if value_shape != (rows, k) or indices.shape != (rows, k) or lse.shape != (rows,):
        raise ValueError(f"example {index}: values/indices must have shape (T - 1, k) = ({rows}, {k}) and "
                         f"logsumexp ({rows},), got {value_shape}, {indices.shape}, {lse.shape}")
    for name, ids in (("token_ids", token_ids), ("indices", indices)):
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"example {index}: {name} must lie in [0, vocab_size={vocab}), "
                             f"got range [{ids.min()}, {ids.max()}]")
    targets, targets_hi = _split_ids(token_ids[1:], metadata.wide_ids)
    ids, ids_hi = _split_ids(indices, metadata.wide_ids)
    columns = [pa.array(targets), pa.array(offsets[1:, 0].astype(np.int32)), pa.array(offsets[1:, 1].astype(np.int32)),
               _fixed_list(_values_to_bits(values, metadata.value_dtype), k), _fixed_list(ids, k), pa.array(lse)]
    if metadata.wide_ids:
        columns += [pa.array(targets_hi), _fixed_list(ids_hi, k)]
    custom = {"example": str(int(index)), "first_token": str(int(token_ids[0])),
              "first_start": str(int(offsets[0, 0])), "first_end": str(int(offsets[0, 1])),
              "response_start": _span(response_start), "response_end": _span(response_end)}
    return pa.RecordBatch.from_arrays(columns, schema=schema), custom


def _column(batch, name: str, k: Optional[int] = None) -> np.ndarray:
    column = batch.column(name)
    if k is not None:
        return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, k)
    return column.to_numpy(zero_copy_only=False)


def _decode_example(batch, custom, metadata: StoreMetadata, where: str) -> Example:
    k, wide = metadata.k, metadata.wide_ids
    try:
        meta = {key.decode(): value.decode() for key, value in custom.items()}
        first = int(meta["first_token"]), int(meta["first_start"]), int(meta["first_end"])
        index = int(meta["example"])
        spans = [int(meta[name]) if meta[name] else None for name in ("response_start", "response_end")]
    except (AttributeError, KeyError, ValueError) as error:
        raise RecordStoreError(f"{where}: record batch metadata is missing or malformed ({error!r})") from error
    targets = _join_ids(_column(batch, "target"), _column(batch, "target_hi") if wide else None)
    token_ids = np.concatenate([[first[0]], targets]).astype(np.int64)
    offsets = np.empty((len(token_ids), 2), np.int64)
    offsets[0] = first[1:]
    offsets[1:, 0] = _column(batch, "start")
    offsets[1:, 1] = _column(batch, "end")
    ids = _join_ids(_column(batch, "ids", k), _column(batch, "ids_hi", k) if wide else None)
    return Example(index=index, token_ids=torch.from_numpy(token_ids), offsets=torch.from_numpy(offsets),
                   values=_bits_to_values(_column(batch, "values", k), metadata.value_dtype),
                   indices=torch.from_numpy(ids), logsumexp=torch.from_numpy(_column(batch, "logsumexp").copy()),
                   response_start=spans[0], response_end=spans[1], metadata=metadata)


# ---------------------------------------------------------------------------------------------- manifests
# ------------------------------------------------------------------------------------------------- writer
class StoreWriter:
    """Append examples to a store; one writer per rank, any number of ranks at once.

    Creates the store (``meta.json``) or resumes it: the metadata must then equal the stored one (else
    :class:`RecordStoreError` lists the differences). ``done`` holds the example indices already stored by any
    rank. Examples are buffered and committed as one shard every ``shard_examples`` examples and at
    :meth:`close`; a kill loses at most the uncommitted buffer, never a committed example.
    """

    def __init__(self, path, metadata: StoreMetadata, *, rank: int = 0, shard_examples: int = 256):
        import_pyarrow()
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < 100000:
            raise ValueError(f"rank must be an int in [0, 100000), got {rank!r}")
        check_count(shard_examples, "shard_examples")
        self.root = Path(path)
        self.metadata = metadata
        self.rank = rank
        self.shard_examples = shard_examples
        (self.root / "shards").mkdir(parents=True, exist_ok=True)
        self._lock = lock_rank(self.root, rank)
        meta_path = self.root / "meta.json"
        if meta_path.exists():
            stored = StoreMetadata.from_json(meta_path.read_text(), str(meta_path))
            diff = stored.differences(metadata)
            if diff:
                raise RecordStoreError(f"{self.root} holds records of another configuration; stored != asked: "
                                       + "; ".join(diff))
        else:
            atomic_write(meta_path, metadata.to_json().encode())
        self._part_path = self.root / f"manifest-r{rank:05d}.json"
        index = load_index(self.root)
        own = read_json(self._part_path)["shards"] if self._part_path.exists() else []
        adopted = adopt_orphans(self.root, index, rank)
        self._entries: List[dict] = own + adopted
        if adopted:
            self._write_part()
        self.done = set(indexed_examples(index)) | {e for entry in adopted for e in entry["examples"]}
        names = (SHARD_FILE.match(p.name) for p in (self.root / "shards").iterdir())
        self._next_seq = 1 + max([int(m[2]) for m in names if m and int(m[1]) == rank], default=-1)
        self._schema = _schema(metadata)
        self._pending: List[tuple] = []
        self._pending_examples = set()

    def add(self, index: int, token_ids, offsets, values, indices, logsumexp, *, response_start=None,
            response_end=None):
        """Buffer one example: token_ids (T,), offsets (T, 2), values and indices (T - 1, k), logsumexp (T - 1,)."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"index must be an int >= 0, got {index!r}")
        index = int(index)
        if index in self.done or index in self._pending_examples:
            raise RecordStoreError(f"example {index} is already in the store {self.root}")
        self._pending.append(_example_batch(self.metadata, self._schema, index, token_ids, offsets, values,
                                            indices, logsumexp, response_start, response_end))
        self._pending_examples.add(index)
        if len(self._pending) >= self.shard_examples:
            self.flush()

    def flush(self):
        """Commit the buffered examples as one shard (no-op when nothing is buffered)."""
        if not self._pending:
            return
        pa = import_pyarrow()
        name = f"r{self.rank:05d}-{self._next_seq:06d}.arrow"
        options = pa.ipc.IpcWriteOptions(compression=None if self.metadata.compression == "none" else "zstd")
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, self._schema, options=options) as writer:
            for batch, custom in self._pending:
                writer.write_batch(batch, custom_metadata=custom)
        data = sink.getvalue().to_pybytes()
        atomic_write(self.root / "shards" / name, data, tmp_name=name + ".tmp")  # a leftover .tmp is removed later
        self._entries.append({"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                              "examples": [int(c["example"]) for _, c in self._pending],
                              "rows": [b.num_rows for b, _ in self._pending]})
        self._write_part()
        self.done |= self._pending_examples
        self._pending, self._pending_examples = [], set()
        self._next_seq += 1

    def _write_part(self):
        atomic_write(self._part_path, json.dumps({"shards": self._entries}).encode())

    def close(self):
        """Commit what is buffered and let another writer of this rank open the store."""
        self.flush()
        self._lock.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()  # the buffer holds only complete, validated examples
        return False


# ------------------------------------------------------------------------------------------------- reader
class RecordStore(Sequence):
    """A store opened for reading: ``store[i]`` is the :class:`Example` with source index ``i``.

    ``len(store)`` counts the stored examples; ``store.indices`` lists their source indices in ascending order
    (iteration follows it). Shards are memory-mapped; with ``compression="zstd"`` only the buffers of the
    example read are decompressed, with ``"none"`` nothing is.
    """

    def __init__(self, path, *, tokenizer=None, expected_tokenizer_hash: Optional[str] = None):
        import_pyarrow()
        self.root = Path(path)
        meta_path = self.root / "meta.json"
        if not meta_path.exists():
            raise RecordStoreError(f"{self.root} is not a record store (no meta.json)")
        self.metadata = StoreMetadata.from_json(meta_path.read_text(), str(meta_path))
        check_tokenizer(self.metadata, tokenizer, expected_tokenizer_hash, where=f"record store {self.root}")
        self._shards = load_index(self.root)
        self._where = indexed_examples(self._shards)
        self.indices = np.array(sorted(self._where), dtype=np.int64)
        self._readers: "collections.OrderedDict[str, Any]" = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self):
        """Picklable (DataLoader workers): open shard readers are not carried over, each process maps its own."""
        state = self.__dict__.copy()
        state["_readers"] = collections.OrderedDict()
        return state

    @property
    def num_tokens(self) -> int:
        """Tokens over all stored examples (rows + 1 each)."""
        return sum(rows + 1 for _, _, rows in self._where.values())

    @property
    def num_bytes(self) -> int:
        """Bytes of all shards."""
        return sum(entry["bytes"] for entry in self._shards.values())

    def __contains__(self, index) -> bool:
        return int(index) in self._where

    def __iter__(self) -> Iterator[Example]:
        for index in self.indices:
            yield self[int(index)]

    def __getitem__(self, index) -> Example:
        if isinstance(index, slice):
            return [self[int(i)] for i in self.indices[index]]
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"a record store is indexed by example index (int), got {type(index).__name__}")
        try:
            name, position, rows = self._where[int(index)]
        except KeyError:
            raise KeyError(f"example {index} is not in the store {self.root} ({len(self)} examples stored)") from None
        where = f"shard {name!r} of {self.root}"
        reader = self._reader(name)
        try:
            batch, custom = reader.get_batch_with_custom_metadata(position)
            example = _decode_example(batch, custom, self.metadata, where)
        except import_pyarrow().ArrowException as error:
            raise RecordStoreError(f"{where} is corrupt: cannot decode example {index}: {error}") from error
        if example.index != int(index) or example.num_positions != rows:
            raise RecordStoreError(f"{where} disagrees with the manifest at position {position}: holds example "
                                   f"{example.index} with {example.num_positions} rows, manifest says {index} "
                                   f"with {rows}")
        return example

    def _reader(self, name: str):
        reader = self._readers.get(name)
        if reader is not None:
            self._readers.move_to_end(name)
            return reader
        pa = import_pyarrow()
        path = self.root / "shards" / name
        entry = self._shards[name]
        if not path.exists():
            raise RecordStoreError(f"shard {name!r} listed in the manifest of {self.root} is missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise RecordStoreError(f"shard {name!r} of {self.root} has {size} bytes, the manifest says "
                                   f"{entry['bytes']}: the file is truncated or was replaced")
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(path)))
        except (pa.ArrowException, OSError) as error:
            raise RecordStoreError(f"shard {name!r} of {self.root} is corrupt: {error}") from error
        if reader.num_record_batches != len(entry["examples"]):
            raise RecordStoreError(f"shard {name!r} of {self.root} holds {reader.num_record_batches} examples, the "
                                   f"manifest lists {len(entry['examples'])}")
        if not reader.schema.equals(_schema(self.metadata)):
            raise RecordStoreError(f"shard {name!r} of {self.root} does not have the schema its metadata implies")
        self._readers[name] = reader
        if len(self._readers) > _MAX_OPEN_SHARDS:
            self._readers.popitem(last=False)
        return reader

    def verify(self) -> int:
        """Check every shard against the sha256 in the manifest; returns the number of shards checked."""
        for name, entry in sorted(self._shards.items()):
            path = self.root / "shards" / name
            if not path.exists():
                raise RecordStoreError(f"shard {name!r} listed in the manifest of {self.root} is missing")
            if file_sha256(path) != entry["sha256"]:
                raise RecordStoreError(f"shard {name!r} of {self.root} is corrupt: its sha256 differs from the "
                                       f"manifest's")
        return len(self._shards)

    def collate(self, indices: Iterable[int], **options):
        """``collate([store[i] for i in indices], **options)``."""
        from .collate import collate

        return collate([self[int(i)] for i in indices], **options)


def open_store(path, *, tokenizer=None, expected_tokenizer_hash: Optional[str] = None) -> RecordStore:
    """Open a record store for reading (see :class:`RecordStore`).

    ``tokenizer`` (a transformers tokenizer) or ``expected_tokenizer_hash`` declares the teacher's tokenizer;
    a store written with another vocabulary is refused with :class:`TokenizerMismatchError`.
    """
    return RecordStore(path, tokenizer=tokenizer, expected_tokenizer_hash=expected_tokenizer_hash)
