"""Streaming merge over Hugging Face safetensors checkpoints.

Reads ``model.safetensors`` or ``model.safetensors.index.json`` + shards (safetensors format), one row chunk
of one tensor per model at a time (see :mod:`infigw.merge.engine`), and writes the merged tensors
chunk by chunk straight into pre-planned shards (the header of each shard is known before any data, so no
whole tensor and no whole shard is ever held in memory), plus ``model.safetensors.index.json``. Every other
top-level file of the base directory (config.json, tokenizer files, ...) is copied, except weight files.
The output is built in a hidden temporary sibling directory and renamed into place at the end; on any error
the temporary directory is removed, so a failed merge leaves no partial output.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from .engine import DEFAULT_CHUNK_ELEMS, TensorSource, merge_tensor, validate_metadata
from .methods import MergeMethod, get_method

__all__ = ["merge_safetensors", "parse_size", "SafetensorsCheckpoint", "INDEX_NAME", "SINGLE_NAME"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like ``"5GB"`` (10^9), ``"500MiB"`` (2^20) or ``"123456"``."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
        if not match:
            raise ValueError(f"shard size: expected bytes or a size like '5GB' / '500MiB', got {size!r}")
        unit = (match.group(2) or "B").upper()
        powers = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                  "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
        value = int(float(match.group(1)) * powers[unit])
    if value <= 0:
        raise ValueError(f"shard size must be positive, got {size!r}")
    return value


class _SafetensorsFile:
    """Header of one .safetensors file and positional reads of row ranges into fresh CPU tensors.

    Reads with ``os.preadv`` instead of ``safe_open``'s memory map: pages touched through a map stay counted in
    the process RSS for as long as the map lives, which would make the RSS of a merge grow to the size of all
    inputs; reading into small buffers keeps it at O(chunk).
    """

    def __init__(self, path: Path, label: str, stack: contextlib.ExitStack):
        self.path = path
        try:
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_len))
            file_size = path.stat().st_size
            self.data_start = 8 + header_len
            self.tensors: dict[str, tuple[tuple[int, ...], torch.dtype, int]] = {}
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in _DTYPES:
                    raise ValueError(f"tensor {name!r} has unsupported dtype {info['dtype']}")
                shape, dtype = tuple(info["shape"]), _DTYPES[info["dtype"]]
                begin, end = info["data_offsets"]
                if end - begin != _nbytes(shape, dtype) or self.data_start + end > file_size:
                    raise ValueError(f"tensor {name!r} has data offsets {[begin, end]} that do not fit its "
                                     f"shape {list(shape)} / dtype {info['dtype']} or the file size {file_size}")
                self.tensors[name] = (shape, dtype, begin)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, OverflowError, MemoryError) as err:
            raise ValueError(f"{label}: {str(path)!r} is not a valid safetensors file: {err}") from None
        self.fd = os.open(path, os.O_RDONLY)
        stack.callback(os.close, self.fd)

    def read(self, name: str, start: int | None, stop: int | None) -> torch.Tensor:
        shape, dtype, begin = self.tensors[name]
        if start is not None:
            row_bytes = _nbytes(shape[1:], dtype)
            begin += start * row_bytes
            shape = (stop - start, *shape[1:])
        out = torch.empty(_nbytes(shape, dtype), dtype=torch.uint8)
        view, done = memoryview(out.numpy()), 0
        while done < len(view):
            got = os.preadv(self.fd, [view[done:]], self.data_start + begin + done)
            if got == 0:
                raise ValueError(f"{str(self.path)!r} ended while reading tensor {name!r} (file truncated?)")
            done += got
        return out.view(dtype).reshape(shape)


class SafetensorsCheckpoint:
    """Tensor metadata and chunk readers of one HF safetensors checkpoint directory (files closed by ``stack``)."""

    def __init__(self, directory: str | os.PathLike, label: str, stack: contextlib.ExitStack):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"{label}: checkpoint directory {str(self.directory)!r} does not exist")
        index = self.directory / INDEX_NAME
        if index.is_file():
            try:
                weight_map = dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{label}: {index} is not a safetensors index with a 'weight_map': {err}") from None
        elif (self.directory / SINGLE_NAME).is_file():
            weight_map = None
        else:
            raise FileNotFoundError(
                f"{label}: {str(self.directory)!r} holds neither {SINGLE_NAME} nor {INDEX_NAME}"
            )
        files = {}
        for file in sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_NAME]:
            path = self.directory / file
            if not path.is_file():
                raise FileNotFoundError(f"{label}: shard {str(path)!r} listed in {INDEX_NAME} is missing")
            files[file] = _SafetensorsFile(path, label, stack)
        if weight_map is None:
            weight_map = {name: SINGLE_NAME for name in files[SINGLE_NAME].tensors}

        self.meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._files: dict[str, _SafetensorsFile] = {}
        for name in sorted(weight_map):
            file = files[weight_map[name]]
            if name not in file.tensors:
                raise ValueError(
                    f"{label}: tensor {name!r} is listed in {INDEX_NAME} but absent from {weight_map[name]}"
                )
            self.meta[name] = file.tensors[name][:2]
            self._files[name] = file

    def source(self, name: str) -> TensorSource:
        shape, dtype = self.meta[name]
        return TensorSource(shape, dtype, functools.partial(self._files[name].read, name))


def _nbytes(shape, dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _plan_shards(meta, max_shard_bytes: int) -> list[list[str]]:
    """Greedy packing in name order; a tensor larger than the limit gets a shard of its own."""
    shards, current, size = [], [], 0
    for name, (shape, dtype) in meta.items():
        nbytes = _nbytes(shape, dtype)
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current or not shards:
        shards.append(current)
    return shards


def _header(names, meta) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        shape, dtype = meta[name]
        nbytes = _nbytes(shape, dtype)
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
    return len(raw).to_bytes(8, "little") + raw


def _copy_non_weight_files(src: Path, dst: Path) -> None:
    for path in sorted(src.iterdir()):
        if path.is_file() and not path.name.startswith(".") and not path.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(path, dst / path.name)


def merge_safetensors(
    base: str | os.PathLike,
    models: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    method: str | MergeMethod = "rsaf",
    *,
    seed: int = 0,
    max_shard_size: int | str = "5GB",
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    progress: bool = False,
    **options,
) -> Path:
    """Merge K fine-tuned safetensors checkpoints of ``base`` into the new directory ``out``; return its path.

    Memory: O(K · chunk_elems) plus file handles, whatever the model size. Output: shards
    ``model-0000i-of-0000n.safetensors`` of at most ``max_shard_size`` bytes (one oversized tensor gets its own
    shard) + ``model.safetensors.index.json`` + the base's non-weight files. ``out`` must not exist.
    """
    method = get_method(method, **options)
    max_shard_bytes = parse_size(max_shard_size)
    if chunk_elems <= 0:
        raise ValueError(f"chunk_elems must be positive, got {chunk_elems}")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"out: {str(out)!r} already exists; choose a new directory")
    models = list(models)
    labels = [f"model {i} ({m})" for i, m in enumerate(models)]

    with contextlib.ExitStack() as stack:
        base_ckpt = SafetensorsCheckpoint(base, f"base ({base})", stack)
        model_ckpts = [SafetensorsCheckpoint(m, label, stack) for m, label in zip(models, labels)]
        validate_metadata(base_ckpt.meta, [c.meta for c in model_ckpts], labels)

        shards = _plan_shards(base_ckpt.meta, max_shard_bytes)
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        total = sum(_nbytes(*base_ckpt.meta[n]) for n in base_ckpt.meta)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        bar = None
        try:
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"merge ({method.name})")
            for file, names in zip(files, shards):
                with open(tmp / file, "wb") as f:
                    f.write(_header(names, base_ckpt.meta))
                    for name in names:
                        chunks = merge_tensor(
                            name, base_ckpt.source(name), [c.source(name) for c in model_ckpts], method,
                            seed=seed, labels=labels, chunk_elems=chunk_elems,
                        )
                        written = 0
                        for chunk in chunks:
                            data = chunk.contiguous().reshape(-1).view(torch.uint8).numpy()
                            f.write(data)
                            written += data.nbytes
                            if bar is not None:
                                bar.update(data.nbytes)
                        if written != _nbytes(*base_ckpt.meta[name]):
                            raise RuntimeError(f"internal error: wrote {written} bytes for tensor {name!r}")
            index = {"metadata": {"total_size": total},
                     "weight_map": {n: file for file, names in zip(files, shards) for n in names}}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            _copy_non_weight_files(Path(base), tmp)
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if bar is not None:
                bar.close()
    return out
