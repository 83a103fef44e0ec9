"""A run directory a crash cannot lock, and that two live runs never share.

Two locks with different jobs. The recipe lock (a different recipe may not continue a run) only
holds once the run has something to lose: a checkpoint, `final/` or `best/`. Before that, a
rerun with a corrected recipe clears what the failed attempt left and says so. The live lock
(`run.lock`: host, pid and start time of the process training there) keeps a second process out
while the first is alive; a lock whose process is gone from this host is taken over. Under
several processes only the main one takes it. Imports no torch.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from launcher.checkpoint import saves as ckpt
from launcher.data.fingerprint import changed, file_fingerprint
from launcher.errors import UserError

LOCK_FILE = "run.lock"
RESULTS = ("final", "best")  # exported folders: a run that has one has something to lose
RUN_FILES = ("checkpoints", "final", "best", "metrics.jsonl", "report.md", "loss.png", "recipe.yaml", "tb", "logs")  # what a run writes
# Keys of the recipe that may change between a run and its resumption (micro_batch_size and grad_accum only
# with their product times the process count unchanged: launcher/rescale.py checks that on resume).
RESUMABLE_CHANGES = {("train", "micro_batch_size"), ("train", "grad_accum"),
                     ("train", "max_steps"), ("train", "epochs"), ("train", "eval_every"), ("train", "save_every"),
                     ("distributed", "num_processes"), ("distributed", "replicate"), ("distributed", "shard"), ("train", "log_every"), ("train", "keep_last"), ("eval", "samples"), ("report", "tensorboard"),
                     ("train", "skip_nonfinite")}


@dataclass
class RunDirPlan:
    """How a run uses its output_dir: resume from a checkpoint, or start fresh (clearing `replaced` first)."""
    resume_from: Path | None
    replaced: list[str] = field(default_factory=list)
    reason: str = ""

    def message(self, run_dir: Path) -> str:
        return (f"output_dir {run_dir}: the earlier attempt there ({self.reason}) had no checkpoint yet; "
                f"starting fresh, replacing its {', '.join(self.replaced)}")


def has_something_to_lose(run_dir: Path) -> bool:
    return ckpt.last_checkpoint(run_dir) is not None or any((run_dir / name).is_dir() for name in RESULTS)


def _leftovers(run_dir: Path) -> list[str]:
    """The launcher's own files an earlier attempt wrote (clear_run_dir removes exactly these)."""
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def _changed_keys(old: dict, new: dict, prefix: tuple = ()) -> list[tuple]:
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, prefix + (key,))
        elif a != b:
            changed.append(prefix + (key,))
    return changed


def _holds_only_launch_files(run_dir: Path) -> bool:
    """True for what exists before a run's first recipe.yaml: the job script and Slurm log that
    `launcher slurm submit` writes to slurm/, and per-rank logs/."""
    for entry in run_dir.iterdir():
        if entry.name == "slurm" and (entry / "job.sbatch").is_file():
            continue
        if entry.name == "preprocessed" and (entry / "fingerprint.json").is_file():  # written by `launcher preprocess`
            continue
        if entry.name == "logs" and entry.is_dir() and all(f.name.startswith("rank-") for f in entry.iterdir()):
            continue
        return False
    return True


def clear_run_dir(run_dir: Path) -> None:
    """--overwrite: remove what a previous run wrote (only the launcher's own files, and never slurm/:
    the running job's script and log are there)."""
    for name in RUN_FILES:
        target = run_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def plan_run_dir(run_dir: Path, resolved: dict, overwrite: bool) -> RunDirPlan:
    """Resume, start fresh, or refuse (a different recipe over a run with something to lose); decided before any model loads."""
    if run_dir.is_dir():
        LiveLock(run_dir).refuse_if_held()  # a live run's folder is not this run's to judge or clear
        if {entry.name for entry in run_dir.iterdir()} <= {LOCK_FILE}:
            return RunDirPlan(None)
    if (overwrite and run_dir.exists()) or not run_dir.exists() or _holds_only_launch_files(run_dir):
        return RunDirPlan(None)
    previous = run_dir / "recipe.yaml"
    if not previous.is_file():
        raise UserError(f"output_dir {run_dir} exists and is not a launcher run; choose another output_dir or pass --overwrite")
    changed = [".".join(k) for k in _changed_keys(yaml.safe_load(previous.read_text()) or {}, resolved)
               if k not in RESUMABLE_CHANGES]
    if not has_something_to_lose(run_dir):
        return RunDirPlan(None, _leftovers(run_dir), f"{', '.join(changed[:5])} changed" if changed else "same recipe")
    if changed:
        raise UserError(f"output_dir {run_dir} holds a run with a different recipe ({', '.join(changed[:5])} changed); "
                        f"resume with the same recipe, choose another output_dir, or pass --overwrite to start fresh")
    return RunDirPlan(ckpt.last_checkpoint(run_dir))


# ---------------------------------------------------------------- the live-run lock

def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc), so a reused pid is not taken for the holder."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    started = _start_time(pid)
    return holder.get("started") is None or started is None or started == holder["started"]


class LiveLock:
    """`output_dir/run.lock`, created exclusively; released on exit, taken over when its process is gone."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False

    def me(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid()),
                "since": time.strftime("%Y-%m-%d %H:%M:%S"), "slurm_job": os.environ.get("SLURM_JOB_ID")}

    def acquire(self) -> LiveLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a lost race for a stale lock is retried, then decided by the exclusive create
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                self._refuse_or_clear()
                continue
            with os.fdopen(descriptor, "w") as handle:
                json.dump(self.me(), handle)
            self.held = True
            return self
        raise UserError(f"output_dir {self.path.parent}: could not take {self.path} (another process keeps taking it)")

    def live_holder(self) -> dict | None:
        """Who holds the lock, when that may be a live process (a dead one's lock, on this host, is not held)."""
        try:
            holder = json.loads(self.path.read_text() or "{}")
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return {}
        here = holder.get("host") == socket.gethostname()
        if here and (holder.get("pid") == os.getpid() or not _alive(holder)):  # ours (an in-process rerun), or stale
            return None
        if holder.get("slurm_job") and holder["slurm_job"] == os.environ.get("SLURM_JOB_ID"):
            return None  # this Slurm job's earlier run, killed before it could release, maybe on another node: a job runs once at a time
        return holder

    def refuse_if_held(self) -> None:
        holder = self.live_holder()
        if holder is None:
            return
        host = holder.get("host")
        where = f"host {host}, pid {holder.get('pid')}" if holder else "an unreadable lock"
        since = f" since {holder['since']}" if holder.get("since") else ""
        hint = ("" if host == socket.gethostname() else
                f"; if that process is gone (it ran on another host, which this one cannot check), delete {self.path}")
        raise UserError(f"output_dir {self.path.parent} is in use by a live run ({where}{since}); "
                        f"wait for it, stop it, or choose another output_dir{hint}")

    def _refuse_or_clear(self) -> None:
        self.refuse_if_held()
        try:
            old = json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            old = {}
        if old.get("pid") != os.getpid():
            print(f"taking over {self.path}: its process {old.get('pid')} on {old.get('host')} is gone")
        stale = self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
        try:
            os.rename(self.path, stale)  # atomic: of two processes taking over, one renames, the other retries
            stale.unlink()
        except FileNotFoundError:
            pass

    def release(self) -> None:
        if self.held:
            try:
                if json.loads(self.path.read_text()).get("pid") == os.getpid():
                    self.path.unlink()
            except (OSError, json.JSONDecodeError):
                pass
            self.held = False

    def __enter__(self) -> LiveLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def take_live_lock(run_dir: Path) -> LiveLock:
    """The main process's lock on output_dir, held until this process ends (released by atexit; a kill leaves a stale one)."""
    lock = LiveLock(run_dir).acquire()
    atexit.register(lock.release)
    return lock


def remove_results(run_dir: Path, name: str) -> None:
    shutil.rmtree(run_dir / name, ignore_errors=True)


# ---------------------------------------------------------------- data changed under a resumable run

def data_sources(recipe) -> dict[str, str]:
    """Recipe key -> local path of each data source the run reads (hub names are not files and are skipped)."""
    named = {}
    for which in ("train", "eval"):
        entries = recipe.data.entries(which)
        for index, entry in enumerate(entries):
            named[f"data.{which}" + (f"[{index}]" if len(entries) > 1 else "")] = entry.path
    return {key: path for key, path in named.items() if not path.startswith("hf:") and Path(path).exists()}


def checked_fingerprints(recipe, state: dict | None, allow_change: bool) -> dict:
    """Fingerprints of the data now; refuses (exit 2) when a source differs from the one the checkpoint recorded."""
    now = {key: file_fingerprint(path) for key, path in data_sources(recipe).items()}
    recorded = (state or {}).get("data") or {}
    for key, before in recorded.items():
        if key not in now:
            continue
        reason = changed(before, now[key])
        if reason is None:
            continue
        if allow_change:
            print(f"warning: {key} {now[key]['path']} changed since the checkpoint ({reason}); resuming anyway "
                  f"(--allow-data-change): the rows after the checkpoint's position are not the ones the run planned")
            continue
        raise UserError(f"{key}: {now[key]['path']} changed since the checkpoint this run would resume from ({reason}); "
                        f"restore the file, pass --allow-data-change to resume on the new data, "
                        f"or --overwrite to start fresh")
    return now
