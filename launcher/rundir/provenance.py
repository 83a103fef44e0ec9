"""Where a result came from: provenance.json in the run directory.

Package versions, the project's git commit (when it runs from a checkout), the command line,
world size and device names: what someone comparing two runs needs, written once per (re)start
so a resumed run records every environment it ran in.
"""
from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from launcher.checkpoint.diskspace import replace_whole
from launcher.errors import UserError
from launcher.rundir.paths import RunDir
from launcher.shipped import PACKAGE


def versions() -> dict[str, str | None]:
    """The launcher's version and that of each package it requires (extras included; None: not installed)."""
    try:
        wanted = [re.split(r"[\s;<>=!~\[(]", line, maxsplit=1)[0] for line in metadata.requires("launcher") or []]
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        wanted = []
    found = {}
    for name in ["launcher", *dict.fromkeys(wanted)]:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_commit() -> str | None:
    """The commit of the checkout this package runs from (with -dirty when it has changes); None when installed."""
    root = PACKAGE.parent
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if commit.returncode:
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def devices(accelerator) -> list[str]:
    import torch
    if accelerator.device.type == "cuda":
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return [platform.processor() or platform.machine()]


def write_provenance(run_dir: Path, accelerator) -> dict:
    """Append this start's record to run_dir/provenance.json (a list: one entry per start, resumes included)."""
    record = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": sys.argv,
              "python": platform.python_version(), "packages": versions(), "git_commit": git_commit(),
              "world_size": accelerator.num_processes, "mixed_precision": str(accelerator.mixed_precision),
              "device_type": accelerator.device.type, "devices": devices(accelerator), "host": platform.node()}
    path = RunDir(run_dir).provenance
    try:
        earlier = json.loads(path.read_text()) if path.is_file() else []
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); repair it, or move it aside to start a new list of this run's "
                        "starts") from None
    text = json.dumps([*earlier, record], indent=1) + "\n"  # written whole: a kill mid-write leaves the old list
    replace_whole(path, RunDir.staging(path), lambda staging: staging.write_text(text), len(text), "provenance record")
    return record
