"""Free space checked before each checkpoint and export, so a full disk never costs the last good one.

A checkpoint is written under a temporary name and older ones are pruned only after it is
complete (launcher/checkpoint.py), so refusing to start a write that cannot fit keeps every
checkpoint already on disk. The estimate is the newest complete checkpoint's size when there is
one (it measures the real layout), otherwise what the run holds: trainable weights and
optimiser state for a checkpoint, the weights and the tokenizer's files for an export. When the
filesystem still refuses a write midway (full, over quota or a size limit, read-only, no
permission), `refused_writes` turns whatever the writer raised into one line naming the path and
the bytes needed, and removes the partial save; the run's records (metrics.jsonl, logs, report.md,
loss.png) are written whole or not at all the same way (`append_line`, `replace_whole`).
"""
from __future__ import annotations

import errno
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from launcher.errors import UserError

MARGIN = 1.1  # a little over the estimate: file headers and the state files
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS)
# Writers in C++ or Rust lose the errno: safetensors keeps it in its message, torch's stream writer does not.
ERRNO_IN_MESSAGE = re.compile(r"\(os error (\d+)\)")
UNNUMBERED_WRITE_FAILURE = re.compile(r"file write failed|iostream error|unexpected pos \d+ vs \d+")
TOKENIZER_FILES = re.compile(r"(tokenizer.*|vocab\..*|merges\.txt|special_tokens_map\.json|.*\.model|chat_template\..*|added_tokens\.json)")


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def existing_ancestor(path: Path) -> Path:
    """The nearest folder that exists (the run directory may not have been created yet)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return path


def human(size: float) -> str:
    unit = "B"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024:
            break
        size /= 1024
    return f"{size:.1f} {unit}"


def check_free_space(target: Path, needed: int, what: str) -> None:
    """Raise UserError, before anything is written, when the filesystem holding `target` cannot take `needed` bytes."""
    where = existing_ancestor(target)
    free = shutil.disk_usage(where).free
    if free < needed * MARGIN:
        raise UserError(f"not enough disk space for the {what}: it needs about {human(needed * MARGIN)} in {where}, "
                        f"which has {human(free)} free. Nothing was overwritten: the last good checkpoint is kept. "
                        f"Free space there (or lower train.keep_last) and run the same command to resume")


def checkpoint_estimate(previous: Path | None, held_bytes: int) -> int:
    """Bytes the next checkpoint will take: the previous one's size, else what the run holds."""
    return folder_bytes(previous) if previous is not None else held_bytes


def run_bytes(params, full: bool, with_optimizer: bool) -> int:
    """What a run writes: all weights (full fine-tuning) or the fp32 trainable ones, and optionally the optimiser state."""
    weights = params.weight_bytes if full else 4 * params.trainable
    return weights + (params.optimizer_bytes if with_optimizer else 0)


def tokenizer_bytes(tokenizer) -> int:
    """What save_pretrained writes for the tokenizer, measured by the files it was loaded from."""
    source = Path(getattr(tokenizer, "name_or_path", "") or ".")
    if not source.is_dir():
        return 0
    return sum(path.stat().st_size for path in source.iterdir() if path.is_file() and TOKENIZER_FILES.fullmatch(path.name))


def write_errno(exc: BaseException) -> int | None:
    """The errno of a write that the filesystem refused (full, over quota or a size limit, not writable), found
    in the exception, its context or its message; 0 for a write failure that carries no number; None otherwise."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in WRITE_ERRNOS:
            return seen.errno
        numbered = ERRNO_IN_MESSAGE.search(str(seen))
        if numbered and int(numbered.group(1)) in WRITE_ERRNOS:
            return int(numbered.group(1))
        seen = seen.__cause__ or seen.__context__
    return 0 if UNNUMBERED_WRITE_FAILURE.search(str(exc)) else None


def failure_message(number: int, path: Path, needed: int, what: str) -> str:
    """One line: what failed, where, the bytes it needed, and what to do."""
    where = existing_ancestor(Path(path).parent)
    reason = os.strerror(number) if number else "the write failed"
    if number in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"make {where} writable (or move the run elsewhere)"
    elif number == errno.EFBIG:
        fix = "raise the file-size limit (ulimit -f) or free space there"
    else:
        fix = f"free space there{' (or lower train.keep_last)' if 'checkpoint' in what else ''}"
    return (f"{what}: writing {path} failed: {reason}; it needs about {human(needed * MARGIN)}, "
            f"{human(shutil.disk_usage(where).free)} are free in {where}. Nothing earlier was overwritten: the last good "
            f"checkpoint is kept. {fix[0].upper()}{fix[1:]} and run the same command to resume")


@contextmanager
def refused_writes(path: Path, needed: int, what: str, staging: Path | None = None):
    """A write the filesystem refuses, inside the block, becomes one UserError naming `path` and the bytes
    needed; the partial `staging` folder is removed so it holds no space."""
    try:
        yield
    except Exception as exc:
        number = write_errno(exc)
        if number is None:
            raise
        if staging is not None and staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
        elif staging is not None:
            staging.unlink(missing_ok=True)
        raise UserError(failure_message(number, Path(getattr(exc, "filename", None) or path), needed, what)) from None


def append_line(path: Path, line: str, what: str) -> None:
    """Append one line to `path` whole or not at all: a write the filesystem refuses truncates the file back to
    what it held and becomes one line (`refused_writes`); an unfinished last line (a writer killed mid-append) is
    dropped first, so the new line never continues it."""
    size = _complete_lines_size(path)
    with refused_writes(path, len(line.encode()), what):
        try:
            if path.exists() and path.stat().st_size != size:
                os.truncate(path, size)
            with path.open("a") as handle:
                handle.write(line if line.endswith("\n") else line + "\n")
        except OSError:
            if path.exists():
                os.truncate(path, size)
            raise


def _complete_lines_size(path: Path) -> int:
    """Bytes of `path` up to and including its last newline (all of it when it ends in one; 0 when absent)."""
    if not path.is_file() or path.stat().st_size == 0:
        return 0
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) == b"\n":
            return handle.tell()
        handle.seek(0)
        return handle.read().rfind(b"\n") + 1


def replace_whole(path: Path, staging: Path, write: Callable[[Path], None], needed: int, what: str) -> None:
    """`write` the file at `staging`, then rename it over `path`: a write the filesystem refuses leaves any
    earlier `path` as it was, removes the partial file and becomes one line (`refused_writes`)."""
    with refused_writes(path, needed, what, staging):
        write(staging)
        staging.replace(path)
