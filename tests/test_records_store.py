"""The record store: round trips per value dtype / id width / compression, crash safety, clear errors, collate."""
import json
import os

import pytest
import torch

pytest.importorskip("pyarrow")

from infigw import TopKRecord  # noqa: E402
from infigw.records import (Example, RecordStoreError, StoreMetadata, StoreWriter, TokenizerMismatchError,  # noqa: E402
                            collate, merge_index, open_store, tokenizer_identity)
from infigw.records import store as store_module  # noqa: E402

HASH = "ab" * 32


def metadata(**overrides):
    options = dict(teacher="teacher", tokenizer_name="tok", tokenizer_hash=HASH, vocab_size=1000, k=4)
    options.update(overrides)
    return StoreMetadata(**options)


def make_example(index, length, meta, seed=None):
    """Random example arrays (token_ids (T,), offsets (T, 2), values/indices (T-1, k), logsumexp (T-1,))."""
    g = torch.Generator().manual_seed(index if seed is None else seed)
    k, vocab = meta.k, meta.vocab_size
    token_ids = torch.randint(0, vocab, (length,), generator=g)
    starts = torch.cumsum(torch.randint(0, 4, (length,), generator=g), 0)
    offsets = torch.stack([starts, starts + torch.randint(1, 5, (length,), generator=g)], -1)
    values = torch.randn(length - 1, k, generator=g).sort(-1, descending=True).values * 4
    indices = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(length - 1)]) if length > 1 \
        else torch.zeros(0, k, dtype=torch.long)
    logsumexp = torch.randn(length - 1, generator=g) + 10
    return token_ids, offsets, values, indices, logsumexp


def fill(path, meta, lengths, *, rank=0, shard_examples=2, first=0):
    examples = {}
    with StoreWriter(path, meta, rank=rank, shard_examples=shard_examples) as writer:
        for i, length in enumerate(lengths, first):
            examples[i] = make_example(i, length, meta)
            writer.add(i, *examples[i], response_start=i if i % 2 else None)
    return examples


@pytest.mark.parametrize("value_dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("vocab_size", [1000, 70000])
@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_round_trip(tmp_path, value_dtype, vocab_size, compression):
    meta = metadata(value_dtype=value_dtype, vocab_size=vocab_size, compression=compression)
    written = fill(tmp_path, meta, [5, 1, 9, 3, 2])
    store = open_store(tmp_path)
    assert len(store) == 5 and store.indices.tolist() == [0, 1, 2, 3, 4]
    assert store.metadata == meta
    assert store.num_tokens == 5 + 1 + 9 + 3 + 2
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[value_dtype]
    for i, (token_ids, offsets, values, indices, lse) in written.items():
        example = store[i]
        assert example.index == i and example.metadata == meta
        assert torch.equal(example.token_ids, token_ids) and torch.equal(example.offsets, offsets)
        assert example.values.dtype == dtype and torch.equal(example.values, values.to(dtype))
        assert example.indices.dtype == torch.int32 and torch.equal(example.indices, indices.int())
        assert torch.equal(example.logsumexp, lse.float())
        assert example.response_start == (i if i % 2 else None) and example.response_end is None
        assert torch.equal(example.target_ids, token_ids[1:])


def test_metadata_validation():
    with pytest.raises(ValueError, match="k must be"):
        metadata(k=0)
    with pytest.raises(ValueError, match="tokenizer_hash"):
        metadata(tokenizer_hash="xyz")
    with pytest.raises(ValueError, match="kind must be one of"):
        metadata(kind="probs")
    with pytest.raises(ValueError, match="vocab_size"):
        metadata(vocab_size=1 << 25)
    with pytest.raises(ValueError, match="temperature"):
        metadata(temperature=0.0)


def test_writer_rejects_bad_examples(tmp_path):
    meta = metadata()
    with StoreWriter(tmp_path, meta) as writer:
        token_ids, offsets, values, indices, lse = make_example(0, 4, meta)
        with pytest.raises(ValueError, match=r"values/indices must have shape \(T - 1, k\) = \(3, 4\)"):
            writer.add(0, token_ids, offsets, values[:2], indices[:2], lse[:2])
        with pytest.raises(ValueError, match=r"indices must lie in \[0, vocab_size=1000\)"):
            writer.add(0, token_ids, offsets, values, indices + 1000, lse)
        with pytest.raises(ValueError, match=r"offsets must have shape"):
            writer.add(0, token_ids, offsets[:2], values, indices, lse)
        writer.add(0, token_ids, offsets, values, indices, lse)
        with pytest.raises(RecordStoreError, match="example 0 is already in the store"):
            writer.add(0, token_ids, offsets, values, indices, lse)


def test_resume_refuses_other_configuration(tmp_path):
    fill(tmp_path, metadata(), [3])
    with pytest.raises(RecordStoreError, match=r"another configuration.*k: 4 != 8"):
        StoreWriter(tmp_path, metadata(k=8))
    with StoreWriter(tmp_path, metadata()) as writer:
        assert writer.done == {0}
        with pytest.raises(RecordStoreError, match="another writer of rank 0 has .* open"):
            StoreWriter(tmp_path, metadata())
    StoreWriter(tmp_path, metadata()).close()  # free again once the first is closed


def test_ranks_write_apart_and_merge_into_one_index(tmp_path):
    meta = metadata()
    fill(tmp_path, meta, [3, 4], rank=0)
    fill(tmp_path, meta, [2, 5, 6], rank=1, first=2)
    assert sorted(p.name for p in tmp_path.glob("manifest*")) == ["manifest-r00000.json", "manifest-r00001.json"]
    assert open_store(tmp_path).indices.tolist() == [0, 1, 2, 3, 4]
    with StoreWriter(tmp_path, meta, rank=1):
        with pytest.raises(RecordStoreError, match="another writer of rank 1"):
            merge_index(tmp_path)
    assert merge_index(tmp_path) == {"examples": 5, "shards": 3, "tokens": 3 + 4 + 2 + 5 + 6}
    assert [p.name for p in tmp_path.glob("manifest*")] == ["manifest.json"]
    assert open_store(tmp_path).indices.tolist() == [0, 1, 2, 3, 4]
    # A later writer continues after the merged index, without reusing shard names.
    fill(tmp_path, meta, [3], rank=1, first=5)
    assert len(open_store(tmp_path)) == 6 and len(list((tmp_path / "shards").iterdir())) == 4


def test_duplicate_example_across_ranks_is_an_error(tmp_path):
    meta = metadata()
    late = StoreWriter(tmp_path, meta, rank=1)  # opened before rank 0 committed: it cannot know
    fill(tmp_path, meta, [3], rank=0)
    with late:
        late.add(0, *make_example(0, 3, meta))
    with pytest.raises(RecordStoreError, match="example 0 is stored twice"):
        open_store(tmp_path)


def test_kill_before_manifest_update_adopts_the_shard(tmp_path, monkeypatch):
    """A shard renamed into place just before a kill (manifest not yet updated) is adopted, not duplicated."""
    meta = metadata()
    fill(tmp_path, meta, [3, 4])  # one committed shard
    writer = StoreWriter(tmp_path, meta, shard_examples=2)
    monkeypatch.setattr(StoreWriter, "_write_part", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        for i in (2, 3):
            writer.add(i, *make_example(i, 3, meta))
    monkeypatch.undo()
    del writer  # the killed process: its lock goes with it
    (tmp_path / "shards" / "r00000-000009.arrow.tmp").write_bytes(b"half a shard")  # killed mid-write
    assert open_store(tmp_path).indices.tolist() == [0, 1]  # readers only see manifest-listed shards
    resumed = StoreWriter(tmp_path, meta)
    assert resumed.done == {0, 1, 2, 3}
    assert not list((tmp_path / "shards").glob("*.tmp"))
    assert open_store(tmp_path).indices.tolist() == [0, 1, 2, 3]


def test_orphan_duplicate_is_removed(tmp_path):
    meta = metadata()
    fill(tmp_path, meta, [3, 4])
    shards = tmp_path / "shards"
    (shards / "r00000-000005.arrow").write_bytes((shards / "r00000-000000.arrow").read_bytes())
    assert merge_index(tmp_path)["examples"] == 2
    assert [p.name for p in shards.iterdir()] == ["r00000-000000.arrow"]


def test_missing_truncated_and_corrupt_shards(tmp_path):
    meta = metadata()
    fill(tmp_path, meta, [3, 4, 5, 6], shard_examples=2)
    first, second = sorted((tmp_path / "shards").iterdir())
    saved = first.read_bytes()
    first.unlink()
    store = open_store(tmp_path)
    with pytest.raises(RecordStoreError, match="r00000-000000.arrow' listed in the manifest .* is missing"):
        store[0]
    data = bytearray(second.read_bytes())
    second.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(RecordStoreError, match="r00000-000001.arrow' .* has .* bytes, the manifest says"):
        open_store(tmp_path)[2]
    data[len(data) // 2] ^= 0xFF  # same size, flipped bits inside a compressed buffer
    second.write_bytes(bytes(data))
    first.write_bytes(saved)
    with pytest.raises(RecordStoreError, match="corrupt: its sha256 differs"):
        open_store(tmp_path).verify()
    with pytest.raises(KeyError, match="example 7 is not in the store"):
        open_store(tmp_path)[7]


def test_garbage_shard_is_reported_corrupt(tmp_path):
    fill(tmp_path, metadata(), [3, 4])
    shard = next((tmp_path / "shards").iterdir())
    shard.write_bytes(b"\0" * shard.stat().st_size)
    with pytest.raises(RecordStoreError, match="r00000-000000.arrow' of .* is corrupt"):
        open_store(tmp_path)[0]


def test_not_a_store(tmp_path):
    with pytest.raises(RecordStoreError, match="is not a record store"):
        open_store(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(RecordStoreError, match="not a valid infigw.records metadata"):
        open_store(tmp_path)


def test_tokenizer_identity_is_checked(tmp_path):
    from .records_helpers import bpe_tokenizer, wordpiece_tokenizer

    bpe, wordpiece = bpe_tokenizer(), wordpiece_tokenizer()
    identity = tokenizer_identity(bpe)
    assert identity == tokenizer_identity(bpe_tokenizer()) and identity["hash"] != tokenizer_identity(wordpiece)["hash"]
    fill(tmp_path, metadata(tokenizer_hash=identity["hash"]), [3])
    assert len(open_store(tmp_path, tokenizer=bpe)) == 1
    assert len(open_store(tmp_path, expected_tokenizer_hash=identity["hash"])) == 1
    with pytest.raises(TokenizerMismatchError, match="written with tokenizer 'tok'.*would index another vocabulary"):
        open_store(tmp_path, tokenizer=wordpiece)
    with pytest.raises(TokenizerMismatchError, match="expected_tokenizer_hash"):
        open_store(tmp_path, expected_tokenizer_hash="0" * 64)


def test_collate_pads_right_and_matches_examples(tmp_path):
    meta = metadata(value_dtype="float32", temperature=2.0, kind="logits")
    written = fill(tmp_path, meta, [4, 1, 6])
    store = open_store(tmp_path)
    batch = collate([store[2], store[0], store[1]])
    assert isinstance(batch.record, TopKRecord)
    assert batch.record.values.shape == (3, 5, 4) and batch.record.indices.dtype == torch.int64
    assert batch.record.vocab_size == 1000 and batch.record.temperature == 2.0 and batch.record.kind == "logits"
    assert batch.valid.sum(1).tolist() == [5, 3, 0] and batch.examples.tolist() == [2, 0, 1]
    token_ids, offsets, values, indices, lse = written[0]
    assert torch.equal(batch.record.values[1, :3], values) and torch.equal(batch.record.indices[1, :3], indices)
    assert torch.equal(batch.record.logsumexp[1, :3], lse) and torch.equal(batch.labels[1, :3], token_ids[1:])
    assert torch.equal(batch.offsets[1, :3], offsets[1:])
    assert (batch.labels[1, 3:] == -100).all() and (batch.offsets[1, 3:] == -1).all()
    assert not batch.record.values[1, 3:].any()
    assert batch.response_start.tolist() == [-1, -1, 1]
    log_probs = metadata(value_dtype="float32", temperature=2.0, kind="logprobs")
    fill(tmp_path / "logprobs", log_probs, [2])
    as_logprobs = collate([open_store(tmp_path / "logprobs")[0]]).record
    assert as_logprobs.kind == "logprobs" and as_logprobs.logsumexp is None  # normalised: no logsumexp to carry
    padded = store.collate([0, 1], pad_to=8, index_dtype=torch.int32)
    assert padded.record.values.shape == (2, 8, 4) and padded.record.indices.dtype == torch.int32
    with pytest.raises(ValueError, match="pad_to must be an int >= the longest example's 5"):
        store.collate([2], pad_to=3)
    with pytest.raises(ValueError, match="non-empty list"):
        collate([])
    other = Example(**{**store[0].__dict__, "metadata": metadata(k=4, teacher="other")})
    with pytest.raises(ValueError, match="comes from another store"):
        collate([store[0], other])


def test_collate_response_mask(tmp_path):
    meta = metadata()
    with StoreWriter(tmp_path, meta) as writer:
        token_ids, _, values, indices, lse = make_example(0, 5, meta)
        offsets = torch.tensor([[0, 4], [4, 9], [9, 10], [10, 15], [15, 20]])
        writer.add(0, token_ids, offsets, values, indices, lse, response_start=10, response_end=15)
    batch = open_store(tmp_path).collate([0], pad_to=6)
    assert batch.response_mask().tolist() == [[False, False, True, False, False, False]]


def test_store_pickles_for_dataloader_workers(tmp_path):
    import pickle

    written = fill(tmp_path, metadata(), [3, 4])
    store = open_store(tmp_path)
    store[0]  # opens a shard reader, which cannot be pickled
    copy = pickle.loads(pickle.dumps(store))
    assert torch.equal(copy[1].token_ids, written[1][0])


def test_uncompressed_reads_are_memory_mapped(tmp_path, monkeypatch):
    """Reading one example maps the shard instead of reading it into memory."""
    import pyarrow

    fill(tmp_path, metadata(compression="none"), [3, 4])
    opened = []
    real = pyarrow.memory_map
    monkeypatch.setattr(pyarrow, "memory_map", lambda *a, **kw: opened.append(a[0]) or real(*a, **kw))
    open_store(tmp_path)[1]
    assert len(opened) == 1 and opened[0].endswith("r00000-000000.arrow")


def test_manifest_is_replaced_atomically(tmp_path):
    fill(tmp_path, metadata(), [3, 4, 5], shard_examples=1)
    part = json.loads((tmp_path / "manifest-r00000.json").read_text())
    assert [s["examples"] for s in part["shards"]] == [[0], [1], [2]]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert store_module.FORMAT_VERSION == json.loads((tmp_path / "meta.json").read_text())["format_version"]


def test_command_line_info_and_merge(tmp_path, capsys):
    from infigw.records.__main__ import main

    fill(tmp_path, metadata(), [3, 4], rank=2)
    assert main(["merge-index", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out) == {"examples": 2, "shards": 1, "tokens": 7}
    assert main(["info", str(tmp_path), "--verify"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["examples"], info["tokens"], info["verified_shards"]) == (2, 7, 1)
    assert info["metadata"]["k"] == 4 and info["bytes_per_token"] > 0
