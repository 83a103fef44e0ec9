"""Every name inside an output_dir, and which of its files are the launcher's.

Modules that write into a run ask `RunDir` for the path instead of joining names themselves, so the
list of what a run writes cannot drift from what `--overwrite` removes.

The rule for `--overwrite` (and for an earlier attempt replaced without it): only the launcher's own
files go. Each top-level name the launcher writes is listed in `OWN` with what inside it is ours:
`None` for a folder the launcher makes and fills alone (final/, tb/, ...), removed whole; a pattern
for a folder a user may also use (logs/, checkpoints/), where only the entries matching it are
removed and the folder itself only once that leaves it empty. Anything else (a user's notes beside
the run or inside logs/) is foreign and kept. The launch files (`KEPT`: the Slurm script and log of
the job now running, `launcher preprocess` output, the live lock) are written for the run about to
start and survive it. A folder is a run when it holds the launcher's recipe.yaml; a folder that is
not a run and holds anything foreign is never used, with or without `--overwrite`. Imports no torch.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from launcher.recipe.files import RESOLVED_RECIPE

STAGING = ".tmp"  # a save is written under name + STAGING and renamed once complete
EXPORTS = ("final", "best")  # exported models: a run that has one has something to lose
OWN: dict[str, str | None] = {
    re.escape(RESOLVED_RECIPE): None, "metrics.jsonl": None, "report.md": None, "loss.png": None, "provenance.json": None,
    r"(report\.md|loss\.png|provenance\.json)\.tmp": None,
    "eval.json": None, "run.lock": None, r"run\.lock\.stale-\d+": None,
    "final": None, "best": None, "merged": None, r"(final|best|merged)\.tmp": None, "adapter-init": None,
    "tb": None, "mlruns": None, "wandb": None, "preprocessed": None, r"preprocessed\.tmp": None,
    "checkpoints": r"step-\d+(\.tmp)?",
    "logs": r"rank-\d+\.jsonl",
    "slurm": r"job\.sbatch|.+-(\d+|%j)\.out",
}
KEPT = ("slurm", "preprocessed", "run.lock")  # launch files: written for the run about to start


def _own_pattern(name: str) -> tuple[bool, str | None]:
    """(whether a top-level name is the launcher's, the pattern of its own entries inside when it is a shared folder)."""
    for pattern, inside in OWN.items():
        if re.fullmatch(pattern, name):
            return True, inside
    return False, None


class RunDir:
    """The paths of one run directory (output_dir); names are decided here and nowhere else."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # ------------------------------------------------------------ files and folders a run writes

    recipe = property(lambda self: self.root / RESOLVED_RECIPE, doc="the resolved recipe; its presence makes a folder a run")
    metrics = property(lambda self: self.root / "metrics.jsonl", doc="one JSON line per train step, eval and memory record")
    report = property(lambda self: self.root / "report.md")
    loss_plot = property(lambda self: self.root / "loss.png")
    provenance = property(lambda self: self.root / "provenance.json", doc="versions, commit and devices of each (re)start")
    eval_results = property(lambda self: self.root / "eval.json", doc="what `launcher eval` scored")
    lock = property(lambda self: self.root / "run.lock", doc="host, pid and start time of the live run")
    checkpoints = property(lambda self: self.root / "checkpoints")
    merged = property(lambda self: self.root / "merged", doc="`launcher merge` output: the adapter folded into its base")
    adapter_init = property(lambda self: self.root / "adapter-init", doc="a PiSSA/OLoRA adapter before training")
    logs = property(lambda self: self.root / "logs", doc="per-rank logs; a folder users may share")
    tensorboard = property(lambda self: self.root / "tb")
    mlflow = property(lambda self: self.root / "mlruns", doc="MLflow's local file store (no MLFLOW_TRACKING_URI)")
    wandb = property(lambda self: self.root / "wandb", doc="W&B's offline files: wandb adds this name to the dir it is given")
    slurm = property(lambda self: self.root / "slurm", doc="`launcher slurm submit`: the job script and Slurm's log")
    job_script = property(lambda self: self.slurm / "job.sbatch")
    preprocessed = property(lambda self: self.root / "preprocessed", doc="`launcher preprocess` output when data.preprocessed_dir is unset")

    def finished(self) -> bool:
        """Whether the run wrote its last results: the exported model and the report."""
        return self.export("final").is_dir() and self.report.is_file()

    def export(self, name: str) -> Path:
        """final/ (the model at the end) or best/ (the best eval so far)."""
        if name not in EXPORTS:
            raise ValueError(f"export {name!r}: one of {', '.join(EXPORTS)}")
        return self.root / name

    def step_folder(self, step: int) -> Path:
        return self.checkpoints / f"step-{step}"

    def step_folders(self) -> list[tuple[int, Path]]:
        """(step, folder) of every checkpoints/step-N, complete or not, oldest first."""
        found = [(int(path.name.removeprefix("step-")), path) for path in self.checkpoints.glob("step-*")
                 if re.fullmatch(r"step-\d+", path.name)]
        return sorted(found)

    def rank_log(self, rank: int) -> Path:
        return self.logs / f"rank-{rank}.jsonl"

    def slurm_log(self, job_name: str = "%x", job_id: str = "%j") -> Path:
        """The job's Slurm log: sbatch's `%x-%j` pattern, or the file once name and id are known."""
        return self.slurm / f"{job_name}-{job_id}.out"

    def stale_lock(self, pid: int) -> Path:
        """Where a process taking over a dead run's lock moves it first (an atomic rename decides the race)."""
        return self.lock.with_name(f"{self.lock.name}.stale-{pid}")

    @staticmethod
    def staging(target: Path) -> Path:
        """Where a save to `target` is written before it is renamed into place."""
        return target.with_name(target.name + STAGING)

    # ------------------------------------------------------------ whose files

    def is_run(self) -> bool:
        return self.recipe.is_file()

    def _entries(self) -> list[tuple[Path, bool]]:
        """(path, is the launcher's) of each top-level entry, and of each entry inside a shared folder."""
        found = []
        for entry in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            own, inside = _own_pattern(entry.name)
            if inside is None:
                found.append((entry, own))
            elif entry.is_dir() and not entry.is_symlink():
                found += [(child, bool(re.fullmatch(inside, child.name))) for child in sorted(entry.iterdir())]
            else:
                found.append((entry, False))  # a file (or link) under a shared folder's name is not ours
        return found

    def foreign(self) -> list[Path]:
        """What the launcher did not write: the user's, never removed."""
        return [path for path, own in self._entries() if not own]

    def leftovers(self) -> list[Path]:
        """The launcher's files of an earlier attempt: what `clear` removes (launch files stay)."""
        return [path for path, own in self._entries()
                if own and path.relative_to(self.root).parts[0] not in KEPT]

    def clear(self) -> list[Path]:
        """Remove `leftovers()`, then each shared folder they leave empty; returns what was removed."""
        removed = self.leftovers()
        for path in removed:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        for name, inside in OWN.items():
            folder = self.root / name
            if inside is not None and name not in KEPT and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        return removed
