"""What a data source was when a run (or a preprocessing cache) read it.

One mechanism for two questions: has a data file changed under a resumable run, and is a
preprocessed dataset still valid for its inputs. A fingerprint records the size and mtime of a
file (or of every file in a folder) and a content hash when hashing is cheap; `changed` compares
two and says in words what differs. Imports no torch and no other launcher module.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

BLOCK = 2**20


def _digest(path: Path) -> str:
    """sha256 of every byte (some 1-2 GB/s: far less than reading the rows takes)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


WHOLE = 64 * 2**20   # files up to this size are hashed whole by `sampled_digest`
WINDOW = 16 * 2**10  # bytes read at each place a larger file is sampled


def _spans(handle, size: int, digest) -> list[tuple[int, int]]:
    """The byte ranges of a large file that `sampled_digest` samples: each tensor's data in a safetensors file
    (its header, which holds every tensor's name, dtype, shape and offsets, goes into `digest` whole), else 64
    equal parts of the file."""
    head = handle.read(8)
    length = int.from_bytes(head, "little") if len(head) == 8 else 0
    try:
        if not 2 <= length <= min(size - 8, 2**27):
            raise ValueError
        header = handle.read(length)
        tensors = [v["data_offsets"] for k, v in json.loads(header).items() if k != "__metadata__"]
        digest.update(header)
        return [(8 + length + int(start), 8 + length + int(end)) for start, end in tensors]
    except (ValueError, TypeError, KeyError, AttributeError):
        return [(size * i // 64, size * (i + 1) // 64) for i in range(64)]


def sampled_digest(path: Path) -> str:
    """sha256 of a checkpoint file's content, cheap for large ones: files up to WHOLE bytes whole; larger ones by
    their size, their safetensors header, and WINDOW bytes at the start, middle and end of every tensor (or of
    each 64th of a file that is not safetensors), so a copy gets the same digest and a trained weight another."""
    size = path.stat().st_size
    if size <= WHOLE:
        return _digest(path)
    digest = hashlib.sha256(f"{size}\0".encode())
    with path.open("rb") as handle:
        for start, end in _spans(handle, size, digest):
            for at in sorted({start, max(start, (start + end - WINDOW) // 2), max(start, end - WINDOW)}):
                handle.seek(at)
                digest.update(handle.read(min(WINDOW, end - at)))
    return digest.hexdigest()


def content_digest(path: str | Path) -> str:
    """sha256 of a file's content; of a folder, of every file's relative name and content."""
    path = Path(path)
    if not path.is_dir():
        return _digest(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path)}\0{_digest(file)}\0".encode())
    return digest.hexdigest()


def file_fingerprint(path: str | Path) -> dict:
    """{"path", "size", "mtime_ns", "sha256"} of a file; a folder gets one entry per file inside it."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return {"path": str(path), "files": {str(p.relative_to(path)): file_fingerprint(p) for p in files}}
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": _digest(path)}


def changed(old: dict, new: dict) -> str | None:
    """What differs between two fingerprints of one source, in words; None when the content is the same.

    A new mtime with the same hash (a file copied or touched) is not a change.
    """
    if "files" in old or "files" in new:
        before, after = old.get("files", {}), new.get("files", {})
        if set(before) != set(after):
            added, removed = sorted(set(after) - set(before)), sorted(set(before) - set(after))
            return "files " + ", ".join(filter(None, [f"added {added[:3]}" if added else "", f"removed {removed[:3]}" if removed else ""]))
        for name in sorted(before):
            reason = changed(before[name], after[name])
            if reason:
                return f"{name}: {reason}"
        return None
    if old.get("size") != new.get("size"):
        return f"size {old.get('size')} -> {new.get('size')} bytes"
    if old.get("sha256") != new.get("sha256"):
        return "content differs (same size, different sha256)"
    return None
