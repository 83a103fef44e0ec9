"""A run directory a crash cannot lock, and that two live runs never share.

Two locks with different jobs. The recipe lock (a different recipe may not continue a run) only
holds once the run has something to lose: a checkpoint, `final/` or `best/`. Before that, a
rerun with a corrected recipe clears what the failed attempt left and says so. The live lock
(`run.lock`: host, pid and start time of the process training there) keeps a second process out
while the first is alive; a lock whose process is gone from this host is taken over. Under
several processes only the main one takes it. Which files are the launcher's, and so what
`--overwrite` removes, is `RunDir`'s rule (launcher/rundir/paths.py). Imports no torch.
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
from launcher.recipe.reference import fields
from launcher.recipe.schema import applicable
from launcher.report.records import read_metrics
from launcher.rundir.paths import EXPORTS, RunDir

FOREIGN_SHOWN = 3  # foreign entries named in a refusal


def resumable_keys() -> set[str]:
    """Recipe keys a resumed run may change: the schema fields marked `resumable` (micro_batch_size and
    grad_accum only with the global batch unchanged: launcher/training/rescale.py checks that on resume)."""
    return {key for key, found in fields() if (found.json_schema_extra or {}).get("resumable")}


@dataclass
class RunDirPlan:
    """How a run uses its output_dir: resume from a checkpoint, or start fresh (clearing `replaced` first)."""
    resume_from: Path | None
    replaced: list[str] = field(default_factory=list)
    reason: str = ""
    passed_over: list[tuple[Path, str]] = field(default_factory=list)  # newer, damaged checkpoints, with why

    def damage_lines(self) -> list[str]:
        """One line per damaged checkpoint passed over: which, why, and which one the run resumes from instead."""
        return [f"warning: {folder} is damaged ({reason}); resuming from {self.resume_from.name}, "
                f"the newest intact checkpoint, instead (the damaged one is replaced when training reaches its step)"
                for folder, reason in self.passed_over]

    def message(self, run_dir: Path) -> str:
        return (f"output_dir {run_dir}: the earlier attempt there ({self.reason}) had no checkpoint yet; "
                f"starting fresh, replacing its {', '.join(self.replaced)}")

    def clear_earlier(self, run_dir: Path, overwrite: bool) -> None:
        """Starting fresh: remove the launcher's files of an earlier attempt (under --overwrite, or the
        `replaced` ones), and say what was replaced."""
        if overwrite or self.replaced:
            RunDir(run_dir).clear()
        if self.replaced:
            print(self.message(run_dir))


def has_something_to_lose(run_dir: Path) -> bool:
    run = RunDir(run_dir)
    return bool(run.step_folders()) or any(run.export(name).is_dir() for name in EXPORTS)


def _changed_keys(old: dict, new: dict, prefix: tuple = ()) -> list[tuple]:
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, prefix + (key,))
        elif a != b:
            changed.append(prefix + (key,))
    return changed


def _refuse_foreign(run: RunDir) -> None:
    """A folder that is not a run and holds files the launcher did not write is never used: --overwrite
    removes only the launcher's files, so it could not make the folder a clean run."""
    foreign = [str(path.relative_to(run.root)) for path in run.foreign()]
    if foreign:
        shown = ", ".join(foreign[:FOREIGN_SHOWN]) + (f" and {len(foreign) - FOREIGN_SHOWN} more" if len(foreign) > FOREIGN_SHOWN else "")
        raise UserError(f"output_dir {run.root} exists and is not a launcher run (it holds {shown}, which the launcher "
                        f"did not write and never deletes, --overwrite or not); choose another output_dir")


def _leftover_names(run: RunDir) -> list[str]:
    return [str(path.relative_to(run.root)) for path in run.leftovers()]


def plan_run_dir(run_dir: Path, resolved: dict, overwrite: bool) -> RunDirPlan:
    """Resume, start fresh, or refuse (a different recipe over a run with something to lose, a folder that is
    not a run); decided before any model loads. Starting fresh, the caller clears the launcher's files
    (`RunDir.clear`) under --overwrite or when `replaced` names some."""
    run = RunDir(run_dir)
    if not run.root.exists():
        return RunDirPlan(None)
    LiveLock(run_dir).refuse_if_held()  # a live run's folder is not this run's to judge or clear
    if not run.is_run():
        _refuse_foreign(run)
        if has_something_to_lose(run_dir) and not overwrite:
            raise UserError(f"output_dir {run_dir} holds a run's checkpoints or exports but no {run.recipe.name} to compare with; "
                            f"choose another output_dir, or pass --overwrite to start fresh")
        return RunDirPlan(None, [] if overwrite else _leftover_names(run), f"no {run.recipe.name}")
    if overwrite:
        return RunDirPlan(None)
    allowed = resumable_keys()
    # sections the method does not read are not part of a run's identity (recipe.yaml leaves them out)
    changed = [".".join(k) for k in _changed_keys(applicable(_run_recipe(run)), applicable(resolved)) if ".".join(k) not in allowed]
    if not has_something_to_lose(run_dir):
        return RunDirPlan(None, _leftover_names(run), f"{', '.join(changed[:5])} changed" if changed else "same recipe")
    if changed:
        raise UserError(f"output_dir {run_dir} holds a run with a different recipe ({', '.join(changed[:5])} changed); "
                        f"resume with the same recipe, choose another output_dir, or pass --overwrite to start fresh")
    return _resume_plan(run_dir)


def _run_recipe(run: RunDir) -> dict:
    """The recipe a run wrote (RUN/recipe.yaml), as a dict; one line when it was damaged since."""
    try:
        found = yaml.safe_load(run.recipe.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        found = f"not valid YAML ({str(exc).splitlines()[0]})"
    if not isinstance(found, dict):
        raise UserError(f"output_dir {run.root}: its {run.recipe.name} is {found if isinstance(found, str) else 'not a mapping'}, "
                        f"so what the run trained is unknown; restore it, or pass --overwrite to start fresh")
    return found


def _resume_plan(run_dir: Path) -> RunDirPlan:
    """Resume from the newest checkpoint whose files are those saved; refuse, deleting nothing, when none is."""
    read_metrics(RunDir(run_dir).metrics)  # a damaged line would otherwise be found by the final report, after training
    intact, passed_over = ckpt.newest_intact(run_dir)
    if intact is None and passed_over:
        named = "; ".join(f"{folder.name}: {reason}" for folder, reason in passed_over[:3])
        raise UserError(f"output_dir {run_dir}: no intact checkpoint to resume from ({named}"
                        f"{' ...' if len(passed_over) > 3 else ''}); nothing was deleted. Restore the damaged files, "
                        f"or pass --overwrite to start fresh")
    return RunDirPlan(intact, passed_over=passed_over)


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
        self.run = RunDir(run_dir)
        self.path = self.run.lock
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
        stale = self.run.stale_lock(os.getpid())
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


HELD_LOCKS: list[LiveLock] = []  # this process's run locks, released when its run ends or, failing that, at exit


def take_live_lock(run_dir: Path) -> LiveLock:
    """The main process's lock on output_dir, held until the run ends (`release_live_locks`) or the process
    does (atexit: an exception on the way out); a kill leaves a stale one, which the next run takes over."""
    lock = LiveLock(run_dir).acquire()
    HELD_LOCKS.append(lock)
    atexit.register(lock.release)
    return lock


def release_live_locks() -> None:
    """End of a run: its output_dir is free again, also while the process goes on (the launcher called as a library)."""
    while HELD_LOCKS:
        HELD_LOCKS.pop().release()


def remove_results(run_dir: Path, name: str) -> None:
    """Drop an export (best/ once final/ is the best)."""
    shutil.rmtree(RunDir(run_dir).export(name), ignore_errors=True)


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
