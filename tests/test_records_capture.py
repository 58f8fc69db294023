"""Capture with a tiny transformers Llama and a tokenizer built here: exact round trip, chat and Parquet input,
the loss from the store equal to the loss from dense teacher logits, kill-and-resume, and a 2-rank torchrun."""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("pyarrow")
pytest.importorskip("transformers")

import infigw.functional as F  # noqa: E402
from infigw.reference import row_logsumexp, select_topk  # noqa: E402
from infigw.records import RecordStoreError, open_store, token_offsets  # noqa: E402
from infigw.records.capture import capture, logsumexp_, topk_records  # noqa: E402

from .helpers import assert_close, tied_logits  # noqa: E402
from .records_helpers import rows, save_teacher, write_jsonl  # noqa: E402

K = 8
NUM_ROWS = 10


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    directory = tmp_path_factory.mktemp("teacher")
    model, tokenizer = save_teacher(directory)
    data = write_jsonl(directory / "data.jsonl", rows(NUM_ROWS))
    return directory, model, tokenizer, data


def model_records(model, token_ids, k):
    """The model's own top-k (library tie rule) and logsumexp (the reference's) of an unpadded example, rows
    0..T-2."""
    with torch.no_grad():
        logits = model(token_ids[None]).logits[0, :-1]
    values, ids = select_topk(logits, k)
    return values, ids, row_logsumexp(logits, 1.0)


def subprocess_env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)
    env.pop("INFIGW_RECORDS_EXIT_AFTER", None)
    env.update(extra)
    return env


def cli(teacher_dir, data, out, *extra):
    return [sys.executable, "-m", "infigw.records", "capture", "--model", str(teacher_dir), "--data", str(data),
            "--k", str(K), "--out", str(out), "--value-dtype", "fp32", "--no-progress", *extra]


def assert_same_records(store, reference, *, exact):
    assert store.indices.tolist() == reference.indices.tolist()
    for i in store.indices.tolist():
        got, want = store[i], reference[i]
        assert torch.equal(got.token_ids, want.token_ids) and torch.equal(got.offsets, want.offsets)
        assert torch.equal(got.indices, want.indices), f"example {i}"
        if exact:
            assert torch.equal(got.values, want.values) and torch.equal(got.logsumexp, want.logsumexp)
        else:
            assert_close(got.values, want.values, atol=1e-5, name=f"values of example {i}")
            assert_close(got.logsumexp, want.logsumexp, atol=1e-5, name=f"logsumexp of example {i}")


@pytest.mark.parametrize("k", [1, 3, 10])
def test_topk_records_follow_the_reference_tie_rule(k):
    g = torch.Generator().manual_seed(k)
    cases = [tied_logits(40, 10, levels=3, generator=g), torch.randn(40, 10, generator=g)]
    with_nan = torch.randn(5, 10, generator=g)
    with_nan[1, 3] = float("nan")
    with_nan[2, :] = float("-inf")
    inner_ties = torch.tensor([[1.0, 5, 0, 5, 5, 2, 4, 4, 3, 1]]).repeat(3, 1)  # ties inside the kept set
    cases += [with_nan, tied_logits(40, 10, levels=3, generator=g).bfloat16(), inner_ties]
    for logits in cases:
        values, ids = topk_records(logits, k)
        expected_values, expected_ids = select_topk(logits, k)
        assert torch.equal(ids, expected_ids)
        assert torch.equal(values, expected_values) or torch.equal(values.isnan(), expected_values.isnan())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_capture_logsumexp_matches_the_reference(dtype, temperature):
    logits = (torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 8).to(dtype)
    logits[1] = float("-inf")
    logits[2, 7] = float("nan")
    logits[3, :40] = float("-inf")
    logits[4] += 150  # beyond the range summed without the shift
    expected = row_logsumexp(logits, temperature)
    top = topk_records(logits, 1)[0]
    for row_max in (None, top):  # found by the function, or the records' top-1 value
        torch.testing.assert_close(logsumexp_(logits.clone(), temperature, row_max), expected, atol=1e-5,
                                   rtol=1e-6, equal_nan=True)  # also -inf where the reference has -inf


def test_round_trip_is_exact(teacher, tmp_path):
    directory, model, tokenizer, data = teacher
    capture(directory, data, tmp_path / "store", k=K, batch_size=1, value_dtype="fp32", shard_examples=3,
            progress=False)
    store = open_store(tmp_path / "store", tokenizer=tokenizer)
    assert len(store) == NUM_ROWS and [p.name for p in (tmp_path / "store").glob("manifest*")] == ["manifest.json"]
    meta = store.metadata
    assert (meta.k, meta.kind, meta.vocab_size, meta.value_dtype, meta.convention) == \
        (K, "logits", len(tokenizer), "float32", "next-token")
    for i, row in enumerate(rows(NUM_ROWS)):
        example = store[i]
        values, ids, lse = model_records(model, example.token_ids, K)
        assert torch.equal(example.values, values) and torch.equal(example.indices, ids.int())
        assert_close(example.logsumexp, lse, atol=1e-5, rtol=1e-6, name=f"logsumexp of example {i}")
        if "text" in row:
            expected_ids, expected_offsets = token_offsets(tokenizer, row["text"])
            assert (example.response_start, example.response_end) == (row["response_start"], None)
        else:
            text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
            expected_ids, expected_offsets = token_offsets(tokenizer, text, add_special_tokens=False)
            answer = row["messages"][-1]["content"]
            assert text[example.response_start: example.response_end] == answer
        assert example.token_ids.tolist() == expected_ids.tolist()
        assert example.offsets.tolist() == expected_offsets.tolist()


def test_batched_fp16_capture_is_within_fp16_rounding(teacher, tmp_path):
    directory, model, _, data = teacher
    capture(directory, data, tmp_path / "store", k=K, batch_size=4, value_dtype="fp16", progress=False)
    store = open_store(tmp_path / "store")
    for i in store.indices.tolist():
        example = store[i]
        values, ids, lse = model_records(model, example.token_ids, K)
        assert example.values.dtype == torch.float16 and torch.equal(example.indices, ids.int())
        assert_close(example.values.float(), values, atol=1e-3, rtol=2 ** -11, name=f"values of example {i}")
        assert_close(example.logsumexp, lse, atol=1e-5, name=f"logsumexp of example {i}")


def test_parquet_input_gives_the_same_store(teacher, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory, _, _, data = teacher
    columns = ("text", "response_start", "messages")  # a Parquet table has every column, null where unused
    table = pa.Table.from_pylist([{name: row.get(name) for name in columns} for row in rows(NUM_ROWS)])
    pq.write_table(table, tmp_path / "data.parquet")
    capture(directory, data, tmp_path / "jsonl", k=K, batch_size=1, value_dtype="fp32", progress=False)
    capture(directory, tmp_path / "data.parquet", tmp_path / "parquet", k=K, batch_size=1, value_dtype="fp32",
            progress=False)
    assert_same_records(open_store(tmp_path / "parquet"), open_store(tmp_path / "jsonl"), exact=True)


@pytest.mark.parametrize("value_dtype", ["fp32", "fp16"])
def test_losses_from_the_store_equal_losses_from_dense_logits(teacher, tmp_path, value_dtype):
    """capture -> store -> collate -> loss: GLD and top-k ULD from the records equal those from the teacher's
    dense logits on the same batch (same tokenizer, so positions pair by index); fp16 values within fp16
    rounding."""
    directory, model, tokenizer, data = teacher
    capture(directory, data, tmp_path / "store", k=K, batch_size=3, value_dtype=value_dtype, progress=False)
    tolerance = 1e-5 if value_dtype == "fp32" else 2e-3
    store = open_store(tmp_path / "store")
    order = [4, 0, 7, 2]
    length = max(len(store[i].token_ids) for i in order)
    batch = store.collate(order, pad_to=length - 1)
    input_ids = torch.zeros(len(order), length, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, i in enumerate(order):
        input_ids[row, : len(store[i].token_ids)] = store[i].token_ids
        attention[row, : len(store[i].token_ids)] = 1
    with torch.no_grad():
        dense = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1]
    student = torch.randn(len(order), length - 1, len(tokenizer), generator=torch.Generator().manual_seed(0))
    labels = batch.labels
    assert torch.equal(labels, torch.where(batch.valid, input_ids[:, 1:], -100))
    for values in ("logits", "probs", "topk_probs"):
        from_store = F.gld_loss(student, batch.record, labels, teacher_labels=labels, k=K, values=values)
        from_dense = F.gld_loss(student, dense, labels, teacher_labels=labels, k=K, values=values)
        assert_close(from_store, from_dense, atol=tolerance, rtol=tolerance, name=f"GLD values={values}")
    from_store = F.uld_loss(student, batch.record, labels, teacher_labels=labels, top_k=K)
    from_dense = F.uld_loss(student, dense, labels, teacher_labels=labels, top_k=K)
    assert_close(from_store, from_dense, atol=tolerance / 10, rtol=tolerance, name="ULD top_k")


def test_resume_refuses_other_data(teacher, tmp_path):
    directory, _, _, data = teacher
    capture(directory, data, tmp_path / "store", k=K, progress=False)
    other = write_jsonl(tmp_path / "other.jsonl", rows(3))
    with pytest.raises(RecordStoreError, match="another configuration.*data_sha256"):
        capture(directory, other, tmp_path / "store", k=K, progress=False)


def test_bad_rows_are_named(teacher, tmp_path):
    directory, _, _, _ = teacher
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"prompt": "no text"}])
    with pytest.raises(ValueError, match=r"bad.jsonl, example 1 must have a string 'text' or a list 'messages'"):
        capture(directory, bad, tmp_path / "store", k=K, progress=False)
    span = write_jsonl(tmp_path / "span.jsonl", [{"text": "short", "response_start": 99}])
    with pytest.raises(ValueError, match=r"response_start must be an int in \[0, len\(text\)=5\]"):
        capture(directory, span, tmp_path / "store2", k=K, progress=False)
    with pytest.raises(ValueError, match="value_dtype must be one of"):
        capture(directory, span, tmp_path / "store3", k=K, value_dtype="fp8", progress=False)


def test_kill_and_resume_loses_and_duplicates_nothing(teacher, tmp_path):
    directory, _, _, data = teacher
    out = tmp_path / "store"
    killed = subprocess.run(cli(directory, data, out, "--batch-size", "2", "--shard-examples", "2"),
                            env=subprocess_env(INFIGW_RECORDS_EXIT_AFTER="5"), capture_output=True, text=True,
                            timeout=120)
    assert killed.returncode == 3, killed.stderr[-2000:]
    partial = open_store(out)
    assert len(partial) == 4  # two committed shards; the fifth example was still buffered
    capture(directory, data, out, k=K, batch_size=2, shard_examples=2, value_dtype="fp32", progress=False)
    capture(directory, data, tmp_path / "whole", k=K, batch_size=2, value_dtype="fp32", progress=False)
    resumed = open_store(out)
    assert resumed.indices.tolist() == list(range(NUM_ROWS))  # every example exactly once (duplicates raise)
    assert_same_records(resumed, open_store(tmp_path / "whole"), exact=False)


def test_two_ranks_under_torchrun_give_one_index(teacher, tmp_path):
    directory, _, _, data = teacher
    out = tmp_path / "store"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "infigw.records", *cli(directory, data, out, "--batch-size", "2", "--shard-examples", "2")[3:]]
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in out.glob("manifest*")] == ["manifest.json"]
    shards = sorted(p.name[:6] for p in (out / "shards").iterdir())
    assert set(shards) == {"r00000", "r00001"}
    capture(directory, data, tmp_path / "single", k=K, batch_size=2, value_dtype="fp32", progress=False)
    assert_same_records(open_store(out), open_store(tmp_path / "single"), exact=False)
