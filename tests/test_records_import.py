"""Importers, on files written here to the documented schemas: DistillKit's compressed Parquet shards (exact
values, polynomial tail, quantised residual bins, delta encoding, bit-packed ids) and vLLM prompt_logprobs
(RequestOutput objects and the OpenAI-compatible server's JSON)."""
import json
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
import torch

pytest.importorskip("pyarrow")
pytest.importorskip("transformers")

from infigw.records import import_distillkit, import_vllm, open_store, token_offsets  # noqa: E402
from infigw.records.__main__ import main  # noqa: E402

from .records_helpers import CORPUS, bpe_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


# --------------------------------------------------------------------------------------------- DistillKit
def pack_msb(values: np.ndarray, bits: int) -> np.ndarray:
    """(rows, n) unsigned ints -> (rows, ceil(n * bits / 8)) bytes, most significant bit first."""
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    stream = ((values.astype(np.uint64)[..., None] >> shifts) & 1).astype(np.uint8).reshape(len(values), -1)
    return np.packbits(stream, axis=-1)


def float_bytes(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        bits = torch.from_numpy(values.astype(np.float32)).bfloat16().view(torch.int16).numpy()
        return bits.view(np.uint8).reshape(len(values), -1)
    return values.astype({"float16": "<f2", "float32": "<f4"}[dtype]).view(np.uint8).reshape(len(values), -1)


def encode_distillkit(rows: int, config: dict, rng) -> tuple:
    """Byte rows in DistillKit's layout for random exact values, coefficients and quantised residuals; returns
    (log-prob bytes, the values they decode to, float64)."""
    k, exact_k = config["k"], config["exact_k"]
    tail = k - exact_k
    exact = -np.sort(rng.random((rows, exact_k)) * 3, axis=-1)
    exact = torch.from_numpy(exact).to({"bfloat16": torch.bfloat16, "float32": torch.float32}[
        config["exact_dtype"]]).double().numpy()  # representable in the stored dtype
    parts = [float_bytes(exact, config["exact_dtype"])]
    terms = config.get("polynomial_terms") or []
    coefficients = (rng.standard_normal((rows, len(terms))) * 0.1).astype(np.float32).astype(np.float64)
    parts.append(float_bytes(coefficients, config["term_dtype"]))
    t = np.linspace(0, 1, tail) if config.get("normalize_t") else np.arange(tail, dtype=np.float64)
    basis = np.stack([np.sqrt(t) if term == "sqrt" else t ** term for term in terms], -1) if terms \
        else np.zeros((tail, 0))
    approx = coefficients @ basis.T
    filled = 0
    for residual_bin in config["residual_bins"]:
        bits, n = residual_bin["element_bits"], residual_bin["num_elements"]
        scale = np.float16(rng.random() * 0.05 + 0.01)
        q = rng.integers(0, 2 ** bits, size=(rows, n))
        parts.append(float_bytes(np.full((rows, 1), scale), residual_bin["scale_dtype"]))
        parts.append(pack_msb(q, bits))
        level = 2 * q - 1 if bits == 1 else q - 2 ** (bits - 1)
        approx[:, filled: filled + n] += level * float(scale)
        filled += n
    decoded = np.concatenate([exact, approx], axis=-1)
    if config["delta_encoding"]:
        decoded = np.cumsum(decoded, axis=-1)
    return np.concatenate(parts, axis=-1), decoded


CONFIGS = {
    "exact-only, delta": dict(d=300, k=6, exact_k=6, exact_dtype="float32", polynomial_terms=None,
                              term_dtype="float32", residual_bins=[], delta_encoding=True, error_diffusion=False),
    "bf16 + polynomial + bins": dict(d=300, k=12, exact_k=3, exact_dtype="bfloat16",
                                     polynomial_terms=[0, 1, 2, "sqrt"], term_dtype="float32",
                                     residual_bins=[dict(scale_dtype="float16", element_bits=3, num_elements=5),
                                                    dict(scale_dtype="float16", element_bits=1, num_elements=2)],
                                     delta_encoding=False, error_diffusion=False, normalize_t=True),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_distillkit_import(tokenizer, tmp_path, name):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    config = CONFIGS[name]
    rng = np.random.default_rng(0)
    bits = math.ceil(math.log2(config["d"]))
    data = tmp_path / "logits"
    data.mkdir()
    (data / "compression_config.yaml").write_text(yaml.safe_dump(config))
    expected = []
    for shard, texts in enumerate([CORPUS[:2], CORPUS[2:]]):
        table_rows = []
        for text in texts:
            ids, _ = token_offsets(tokenizer, text)
            logprob_bytes, values = encode_distillkit(len(ids) - 1, config, rng)
            top_ids = np.stack([rng.permutation(config["d"])[: config["k"]] for _ in range(len(ids) - 1)])
            table_rows.append({"input_ids": ids.tolist(), "compressed_logprobs": logprob_bytes.tolist(),
                               "bytepacked_indices": pack_msb(top_ids, bits).tolist()})
            expected.append((ids, values, top_ids, text))
        schema = pa.schema([("input_ids", pa.list_(pa.uint64())),
                            ("compressed_logprobs", pa.list_(pa.list_(pa.uint8()))),
                            ("bytepacked_indices", pa.list_(pa.list_(pa.uint8())))])
        pq.write_table(pa.Table.from_pylist(table_rows, schema=schema), data / f"data_{shard}.parquet")
    stats = import_distillkit(data, tmp_path / "store", tokenizer=tokenizer, teacher="dk-teacher")
    assert stats["examples"] == len(CORPUS)
    store = open_store(tmp_path / "store", tokenizer=tokenizer)
    meta = store.metadata
    assert (meta.kind, meta.k, meta.vocab_size, meta.teacher) == ("logprobs", config["k"], config["d"], "dk-teacher")
    for i, (ids, values, top_ids, text) in enumerate(expected):
        example = store[i]
        assert example.token_ids.tolist() == ids.tolist()
        assert example.indices.tolist() == top_ids.tolist()
        torch.testing.assert_close(example.values.double(), torch.from_numpy(values), atol=1e-6, rtol=1e-6)
        assert not example.logsumexp.any()
        assert example.offsets.tolist() == token_offsets(tokenizer, text)[1].tolist()
    assert import_distillkit(data, tmp_path / "store", tokenizer=tokenizer, teacher="dk-teacher")["examples"] == 0
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    assert main(["import-distillkit", str(data), "--tokenizer", str(tmp_path / "tokenizer"), "--out",
                 str(tmp_path / "cli")]) == 0
    from_cli = open_store(tmp_path / "cli", tokenizer=tokenizer)
    assert all(torch.equal(from_cli[i].values, store[i].values) for i in range(len(CORPUS)))


def test_distillkit_errors(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    config = CONFIGS["exact-only, delta"]
    pq.write_table(pa.Table.from_pylist([{"input_ids": [1, 2, 3], "logits": [0.0]}]), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="is not a DistillKit logit shard: no column"):
        import_distillkit(tmp_path / "x.parquet", tmp_path / "s1", tokenizer=tokenizer, config=config)
    pq.write_table(pa.Table.from_pylist([{"input_ids": [1, 2, 3], "compressed_logprobs": [[0] * 5, [0] * 5],
                                          "bytepacked_indices": [[0] * 7, [0] * 7]}]), tmp_path / "y.parquet")
    with pytest.raises(ValueError, match="'compressed_logprobs' rows are not all 24 bytes long"):
        import_distillkit(tmp_path / "y.parquet", tmp_path / "s2", tokenizer=tokenizer, config=config)
    with pytest.raises(FileNotFoundError, match="compression config .* not found"):
        import_distillkit(tmp_path / "y.parquet", tmp_path / "s3", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="polynomial term"):
        import_distillkit(tmp_path / "y.parquet", tmp_path / "s4", tokenizer=tokenizer,
                          config={**config, "polynomial_terms": ["cube"]})


# ---------------------------------------------------------------------------------------------------- vLLM
@dataclass
class Logprob:  # vllm.logprobs.Logprob's fields
    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


@dataclass
class RequestOutput:  # the fields of vllm.RequestOutput the importer reads
    prompt: Optional[str]
    prompt_token_ids: list
    prompt_logprobs: list


def vllm_positions(ids, vocab, k, rng):
    """prompt_logprobs as vLLM returns them: None first, then the top-k with ranks 1..k plus the actual token
    with its own rank when it is not among them; log-probs of a random full distribution."""
    positions, expected = [None], []
    for actual in ids[1:]:
        logits = rng.standard_normal(vocab) * 3
        logprobs = logits - np.log(np.exp(logits).sum())
        order = np.argsort(-logprobs, kind="stable")
        entry = {int(v): Logprob(float(logprobs[v]), rank + 1) for rank, v in enumerate(order[:k])}
        if int(actual) not in entry:
            entry[int(actual)] = Logprob(float(logprobs[actual]), int(np.nonzero(order == actual)[0][0]) + 1)
        positions.append(dict(reversed(list(entry.items()))))  # order inside a position must not matter
        expected.append((logprobs[order[:k]], order[:k]))
    return positions, expected


def test_vllm_import_objects_and_server_json(tokenizer, tmp_path):
    rng = np.random.default_rng(1)
    k, vocab = 5, len(tokenizer)
    outputs, expected = [], []
    for text in CORPUS:
        ids, offsets = token_offsets(tokenizer, text)
        positions, rows = vllm_positions(ids, vocab, k, rng)
        outputs.append(RequestOutput(text, ids.tolist(), positions))
        expected.append((ids, offsets, rows))
    import_vllm(outputs, tmp_path / "objects", tokenizer=tokenizer, k=k, teacher="served")
    # The same outputs as the OpenAI-compatible server writes them (completion choices; ids as string keys).
    with open(tmp_path / "responses.jsonl", "w") as f:
        for output in outputs:
            positions = [None if p is None else {str(t): vars(lp) for t, lp in p.items()}
                         for p in output.prompt_logprobs]
            f.write(json.dumps({"id": "cmpl-1", "choices": [{"index": 0, "text": "", "prompt_logprobs": positions,
                                                             "prompt_token_ids": output.prompt_token_ids}]}) + "\n")
    import_vllm(tmp_path / "responses.jsonl", tmp_path / "json", tokenizer=tokenizer, k=k, teacher="served")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    assert main(["import-vllm", str(tmp_path / "responses.jsonl"), "--tokenizer", str(tmp_path / "tokenizer"),
                 "--k", str(k), "--out", str(tmp_path / "cli")]) == 0
    stores = [open_store(tmp_path / name, tokenizer=tokenizer) for name in ("objects", "json", "cli")]
    for store in stores:
        assert store.metadata.kind == "logprobs" and store.metadata.vocab_size == vocab
        for i, (ids, offsets, rows) in enumerate(expected):
            example = store[i]
            assert example.token_ids.tolist() == ids.tolist() and example.offsets.tolist() == offsets.tolist()
            assert example.indices.tolist() == [r[1].tolist() for r in rows]
            torch.testing.assert_close(example.values, torch.tensor(np.stack([r[0] for r in rows]),
                                                                    dtype=torch.float32))


def test_vllm_import_errors(tokenizer, tmp_path):
    ids = token_offsets(tokenizer, CORPUS[0])[0].tolist()
    positions, _ = vllm_positions(ids, len(tokenizer), 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="fewer than k=4"):
        import_vllm([{"prompt_token_ids": ids, "prompt_logprobs": positions}], tmp_path / "a", tokenizer=tokenizer,
                    k=4)
    with pytest.raises(ValueError, match="prompt_logprobs entries for"):
        import_vllm([{"prompt_token_ids": ids, "prompt_logprobs": positions[:-1]}], tmp_path / "b",
                    tokenizer=tokenizer, k=3)
    with pytest.raises(ValueError, match="has no prompt_token_ids and prompt_logprobs"):
        import_vllm([{"choices": [{"text": "x"}]}], tmp_path / "c", tokenizer=tokenizer, k=3)
    shuffled = ids[1:] + ids[:1]  # not what the text encodes to
    with pytest.raises(ValueError, match="does not re-encode the example's text to its token ids"):
        import_vllm([{"prompt": CORPUS[0], "prompt_token_ids": shuffled, "prompt_logprobs": positions}],
                    tmp_path / "d", tokenizer=tokenizer, k=3)
    import_vllm([{"prompt": CORPUS[0], "prompt_token_ids": shuffled, "prompt_logprobs": positions}],
                tmp_path / "e", tokenizer=tokenizer, k=3, offsets=False)
    assert (open_store(tmp_path / "e")[0].offsets == -1).all()
