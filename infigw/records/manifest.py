"""The store's index and crash-safe writes: manifests, the shards they list, orphan adoption, writer locks.

A shard is written under a temporary name, fsynced and renamed; then the writer's manifest part is replaced
atomically. A shard renamed just before a kill (not yet in a manifest) is adopted by the next writer of its rank
or by :func:`merge_index`; one whose examples are already indexed is removed.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Dict, List, Optional

from ..durable import atomic_write, fsync_dir

SHARD_FILE = re.compile(r"^r(\d{5})-(\d{6})\.arrow(\.tmp)?$")

class RecordStoreError(RuntimeError):
    """A store that cannot be read or written as asked: missing, corrupt, inconsistent or incompatible."""



def import_pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401  (submodule used through the package)
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("infigw.records needs pyarrow: pip install 'infigw[records]'") from error
    return pyarrow


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise RecordStoreError(f"cannot read {path}: {error}") from error


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_paths(root: Path) -> List[Path]:
    return sorted(root.glob("manifest*.json"))


def load_index(root: Path) -> Dict[str, dict]:
    """Union of every manifest's shard entries, keyed by shard file name (an entry in two manifests must agree)."""
    shards: Dict[str, dict] = {}
    for path in manifest_paths(root):
        content = read_json(path)
        entries = content.get("shards") if isinstance(content, dict) else None
        if not isinstance(entries, list):
            raise RecordStoreError(f"{path} is not a manifest (no 'shards' list)")
        for entry in entries:
            if not isinstance(entry, dict) or not {"file", "bytes", "sha256", "examples", "rows"} <= set(entry):
                raise RecordStoreError(f"{path} has a malformed shard entry: {str(entry)[:200]}")
            known = shards.get(entry["file"])
            if known is not None and known != entry:
                raise RecordStoreError(f"shard {entry.get('file')!r} is listed differently in two manifests")
            shards[entry["file"]] = entry
    return shards


def indexed_examples(shards: Dict[str, dict]):
    """(example -> (file, position, rows)) of a shard index; duplicates are an error."""
    where: Dict[int, tuple] = {}
    for name, entry in shards.items():
        for position, (example, rows) in enumerate(zip(entry["examples"], entry["rows"])):
            if example in where:
                raise RecordStoreError(f"example {example} is stored twice: in {where[example][0]!r} and {name!r}")
            where[example] = (name, position, rows)
    return where


def read_shard_entry(path: Path) -> dict:
    """A manifest entry from a complete shard file (used to adopt shards written just before a kill)."""
    pa = import_pyarrow()
    examples, rows = [], []
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            batch, custom = reader.get_batch_with_custom_metadata(i)
            examples.append(int(custom[b"example"]))
            rows.append(batch.num_rows)
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path), "examples": examples,
            "rows": rows}


def adopt_orphans(root: Path, shards: Dict[str, dict], rank: Optional[int]) -> List[dict]:
    """Entries for complete shards no manifest lists (of one rank, or all); remove those already indexed or
    unreadable, and leftover temporary files."""
    indexed = set(indexed_examples(shards))
    adopted = []
    shard_dir = root / "shards"
    for path in sorted(shard_dir.iterdir()) if shard_dir.exists() else []:
        match = SHARD_FILE.match(path.name)
        if match is None or (rank is not None and int(match[1]) != rank):
            continue
        if match[3]:
            path.unlink()  # a shard that was never completed
            continue
        if path.name in shards:
            continue
        try:
            entry = read_shard_entry(path)
        except (OSError, KeyError, TypeError, ValueError, import_pyarrow().ArrowException):
            path.unlink()  # renamed only after fsync, so this is foreign or damaged: its examples are redone
            continue
        if indexed.isdisjoint(entry["examples"]):
            adopted.append(entry)
            indexed.update(entry["examples"])
        else:
            path.unlink()
    return adopted


def merge_index(path) -> dict:
    """Merge every manifest part (and any complete shard no manifest lists) into one ``manifest.json``.

    Refused while a writer is active (``capture`` merges on rank 0 after all ranks finished). Returns
    ``{"examples": n, "shards": m, "tokens": t}``. Raises :class:`RecordStoreError` if an example is stored twice.
    """
    root = Path(path)
    if not (root / "meta.json").exists():
        raise RecordStoreError(f"{root} is not a record store (no meta.json)")
    locks = [lock_rank(root, int(p.name[len(".lock-r"):])) for p in sorted(root.glob(".lock-r*"))]
    try:  # holding every rank's lock: no writer can commit meanwhile
        shards = load_index(root)
        for entry in adopt_orphans(root, shards, rank=None):
            shards[entry["file"]] = entry
        examples = indexed_examples(shards)
        parts = [p for p in manifest_paths(root) if p.name != "manifest.json"]
        atomic_write(root / "manifest.json", json.dumps({"shards": [shards[n] for n in sorted(shards)]}).encode())
        for part in parts:  # a kill here only leaves redundant entries, which readers merge
            part.unlink()
        fsync_dir(root)
    finally:
        for lock in locks:
            lock.close()
    return {"examples": len(examples), "shards": len(shards),
            "tokens": sum(rows + 1 for _, _, rows in examples.values())}


def lock_rank(root: Path, rank: int):
    """Hold an exclusive lock for the writer of ``rank`` (released when the file closes or the process dies):
    two writers of one rank would overwrite each other's manifest."""
    handle = open(root / f".lock-r{rank:05d}", "w")
    try:
        import fcntl

        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # pragma: no cover - no POSIX locks (Windows): one writer per rank is up to the caller
        pass
    except OSError:
        handle.close()
        raise RecordStoreError(f"another writer of rank {rank} has {root} open; wait for it, or use another rank")
    return handle
