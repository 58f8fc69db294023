"""Streaming merge over Hugging Face safetensors checkpoints, written safely.

Reads ``model.safetensors`` or ``model.safetensors.index.json`` + shards, one row chunk of one tensor per model
at a time (see :mod:`infigw.merge.engine`), and writes the merged tensors chunk by chunk straight into
pre-planned shards (the header of each shard is known before any data). The output folder holds
``model.safetensors`` (one shard, like ``save_pretrained``) or numbered shards + ``model.safetensors.index.json``,
the base's other top-level files (config, tokenizer, …), a model card ``README.md`` and the config that ran
(``mergekit_config.yml``).

Fault handling: the output is built in a hidden sibling ``.OUT.tmp-XXXX`` holding a lock file whose ``flock``
the merging process keeps until the end; it is renamed into place only if ``OUT`` still does not exist. Any
error, Ctrl-C or SIGTERM removes it. A merge killed by SIGKILL or a power cut leaves it behind: the next merge
into the same ``OUT`` (or :func:`remove_dead_merges`) removes every such folder whose lock nobody holds — never
the one of a live merge. Folders and files get the permissions the umask gives (like ``mkdir``), not 0700.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import glob
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path
from typing import Sequence

import torch

from ..durable import fsync_dir, fsync_file
from .card import config_yaml, model_card
from .engine import (
    DEFAULT_CHUNK_ELEMS,
    TensorSource,
    check_chunk_elems,
    check_seed,
    merge_tensor,
    resolve_device,
    resolve_dtype,
    validate_metadata,
)
from .methods import MergeMethod, get_method

__all__ = ["merge_safetensors", "parse_size", "remove_dead_merges", "SafetensorsCheckpoint", "INDEX_NAME",
           "SINGLE_NAME", "MergeTerminated"]

log = logging.getLogger("infigw.merge")

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
LOCK_NAME = ".infigw-merge.lock"
CARD_NAME, CONFIG_NAME = "README.md", "mergekit_config.yml"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
_TOKENIZER_FILES = re.compile(r"(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*|merges\.txt|"
                              r"spiece\.model|chat_template\..*)")

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class MergeTerminated(KeyboardInterrupt):
    """SIGTERM arrived during a merge; handled like Ctrl-C (nothing is left behind)."""


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
    """Greedy packing in name order (mergekit's writer rule); a tensor larger than the limit gets its own shard."""
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


def _umask() -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------------- temporary folder


def _temporaries(out: Path) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(str(out.parent / f".{glob.escape(out.name)}.tmp-*")))


def remove_dead_merges(out: str | os.PathLike) -> list[Path]:
    """Remove the hidden ``.OUT.tmp-*`` folders that merges into ``out`` left when they died; return them.

    A folder is removed only when it holds infigw's lock file and no process holds that file's ``flock``
    (the kernel releases it when its merge dies, even by SIGKILL): a live merge's folder is never touched, and
    neither is anything that is not a merge folder.
    """
    removed = []
    for folder in _temporaries(Path(out)):
        lock = folder / LOCK_NAME
        if folder.is_symlink() or not folder.is_dir():
            continue
        try:
            fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue  # no lock: not ours, or a merge between creating its folder and its lock
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live merge holds it
        finally:
            os.close(fd)
        _discard(folder)
        log.warning("removed %s, left by a merge that died", folder)
        removed.append(folder)
    return removed


def _discard(folder: Path) -> None:
    """Remove a temporary folder, its lock file last (an interrupted removal stays recognisable as dead)."""
    for path in folder.iterdir() if folder.is_dir() else ():
        if path.name != LOCK_NAME:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (folder / LOCK_NAME).unlink()
    shutil.rmtree(folder, ignore_errors=True)


def _claim_temporary(out: Path) -> tuple[Path, int]:
    """Create ``.OUT.tmp-XXXX`` (mode from the umask) holding a lock file locked by this process."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        fd = os.open(tmp / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"infigw.merge pid {os.getpid()} on {socket.gethostname()} merging into {out}\n".encode())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp, fd


def _rename_no_replace(src: Path, dst: Path) -> None:
    """Atomic rename that fails with EEXIST when ``dst`` exists (``renameat2(RENAME_NOREPLACE)`` on Linux)."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is not None:
        at_fdcwd, rename_noreplace = -100, 1
        if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL):  # EINVAL: the filesystem lacks RENAME_NOREPLACE
            raise OSError(code, os.strerror(code), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """While merging in the main thread with SIGTERM's default action, turn SIGTERM into :class:`MergeTerminated`
    so the cleanup runs (schedulers stop jobs with SIGTERM)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
        raise MergeTerminated("terminated by SIGTERM")

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# ------------------------------------------------------------------------------------------- output files


def _copy_base_files(src: Path, dst: Path, copy_tokenizer: bool) -> None:
    """The base's top-level non-weight files (config, tokenizer, …), except its model card and merge config."""
    for path in sorted(src.iterdir()):
        name = path.name
        if (not path.is_file() or name.startswith(".") or name.endswith(_WEIGHT_SUFFIXES)
                or name in (CARD_NAME, CONFIG_NAME) or (not copy_tokenizer and _TOKENIZER_FILES.fullmatch(name))):
            continue
        shutil.copyfile(path, dst / name)  # copyfile, not copy2: new files get the umask's mode


def _record_dtype(config_path: Path, dtype: torch.dtype) -> None:
    """Set the dtype recorded in a copied config.json (``dtype`` / ``torch_dtype``) to the merged one."""
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return
    keys = [k for k in ("dtype", "torch_dtype") if isinstance(config, dict) and k in config]
    if keys:
        for key in keys:
            config[key] = str(dtype).removeprefix("torch.")
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


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
    dtype: torch.dtype | str | None = torch.float32,
    out_dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    copy_tokenizer: bool = True,
    config_text: str | None = None,
    **options,
) -> Path:
    """Merge K fine-tuned safetensors checkpoints of ``base`` into the new directory ``out``; return its path.

    Memory: O(K · chunk_elems) plus file handles, whatever the model size. ``dtype``/``out_dtype``/``seed``/
    ``device`` as in :func:`~infigw.merge.merge_state_dicts` (bit-identical results). Output: one
    ``model.safetensors``, or shards of at most ``max_shard_size`` bytes + index, the base's non-weight files
    (tokenizer files only with ``copy_tokenizer``), ``README.md`` (model card) and ``mergekit_config.yml``
    (``config_text``, else a config generated from the method). ``out`` must not exist. Raises ``OSError``
    naming the path on I/O failures and :class:`MergeTerminated` on SIGTERM; nothing is left behind then.
    """
    method = get_method(method, **options)
    max_shard_bytes = parse_size(max_shard_size)
    chunk_elems = check_chunk_elems(chunk_elems)
    dtype, out_dtype = resolve_dtype(dtype, "dtype"), resolve_dtype(out_dtype, "out_dtype")
    device, seed = resolve_device(device), check_seed(seed)
    out, base, models = Path(out), Path(base), [Path(m) for m in models]
    if out.exists():
        raise FileExistsError(errno.EEXIST, "the output directory already exists; choose a new one", str(out))
    labels = [f"model {i} ({m})" for i, m in enumerate(models)]

    with contextlib.ExitStack() as stack:
        base_ckpt = SafetensorsCheckpoint(base, f"base ({base})", stack)
        model_ckpts = [SafetensorsCheckpoint(m, label, stack) for m, label in zip(models, labels)]
        validate_metadata(base_ckpt.meta, [c.meta for c in model_ckpts], labels)
        out_meta = {n: (shape, (out_dtype or dt) if dt.is_floating_point else dt)
                    for n, (shape, dt) in base_ckpt.meta.items()}
        float_dtypes = {dt for n, (_, dt) in out_meta.items() if base_ckpt.meta[n][1].is_floating_point}
        shards = _plan_shards(out_meta, max_shard_bytes)
        files = ([SINGLE_NAME] if len(shards) == 1
                 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        # the recorded out_dtype makes the config reproduce this output under mergekit's rule (None: working dtype)
        recorded_out = out_dtype or (next(iter(float_dtypes)) if len(float_dtypes) == 1 and dtype else None)
        note = ""
        if recorded_out is None and dtype is not None:
            note = (f"the merged tensors kept their base dtypes {sorted(str(d) for d in float_dtypes)}; under this "
                    f"config (no out_dtype) they are written in {dtype}")
        config_text = config_text or config_yaml(method, base, models, dtype, recorded_out, seed, note)
        card = model_card(out.name, method, base, models, seed=seed, dtype=dtype, out_dtype=out_dtype,
                          config_text=config_text)
        total = sum(_nbytes(*out_meta[n]) for n in out_meta)
        generator = torch.Generator().manual_seed(seed)

        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            remove_dead_merges(out)
            tmp, lock_fd = _claim_temporary(out)
        except OSError as err:
            raise OSError(err.errno, f"cannot create the output next to {str(out)!r}: {err.strerror}",
                          err.filename or str(out.parent)) from None
        stack.callback(os.close, lock_fd)
        bar = None
        current = tmp
        try:
            with _sigterm_as_interrupt():
                if progress:
                    from tqdm import tqdm

                    bar = stack.enter_context(tqdm(total=total, unit="B", unit_scale=True,
                                                   desc=f"merge ({method.name})"))
                for file, names in zip(files, shards):
                    current = tmp / file
                    with open(current, "wb") as f:
                        f.write(_header(names, out_meta))
                        for name in names:
                            chunks = merge_tensor(
                                name, base_ckpt.source(name), [c.source(name) for c in model_ckpts], method,
                                generator=generator, labels=labels, chunk_elems=chunk_elems, dtype=dtype,
                                out_dtype=out_dtype, device=device,
                            )
                            for chunk in chunks:
                                data = chunk.contiguous().reshape(-1).view(torch.uint8).numpy()
                                f.write(data)
                                if bar is not None:
                                    bar.update(data.nbytes)
                        f.flush()
                        os.fsync(f.fileno())
                if len(shards) > 1:
                    current = tmp / INDEX_NAME
                    index = {"metadata": {"total_size": total},
                             "weight_map": {n: file for file, names in zip(files, shards) for n in names}}
                    current.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
                current = tmp
                _copy_base_files(base, tmp, copy_tokenizer)
                if len(float_dtypes) == 1 and (tmp / "config.json").is_file():
                    _record_dtype(tmp / "config.json", next(iter(float_dtypes)))
                (tmp / CARD_NAME).write_text(card)
                (tmp / CONFIG_NAME).write_text(config_text)
                for path in tmp.iterdir():  # the shards are fsynced already; the small files and the folder now
                    if path.is_file() and path.name not in files and path.name != LOCK_NAME:
                        fsync_file(path)
                (tmp / LOCK_NAME).unlink()  # still locked through lock_fd until the rename is done
                fsync_dir(tmp)
                current = out
                try:
                    _rename_no_replace(tmp, out)
                except FileExistsError:
                    raise FileExistsError(errno.EEXIST, "the output directory appeared during the merge (another "
                                          "process?); this merge was discarded", str(out)) from None
        except OSError as err:
            _discard(tmp)
            if isinstance(err, FileExistsError) and err.filename == str(out):
                raise
            raise OSError(err.errno, f"{err.strerror or err}; the merge into {str(out)!r} was discarded",
                          err.filename or str(current)) from None
        except BaseException:
            _discard(tmp)
            raise
    with contextlib.suppress(OSError):  # durability of the rename; the merge itself is complete
        fsync_dir(out.parent)
    return out
