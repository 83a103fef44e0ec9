"""Slurm: render a batch script for a run, submit it, and requeue a preempted job.

Why hand-written: submitit and simple_slurm drive Slurm from Python objects, but neither
writes a plain, editable sbatch file that runs `accelerate launch` once per node, and the
parts that go wrong are shell details no library owns:
- the machine rank must be read in each srun task (`$SLURM_PROCID` single-quoted inside
  `bash -c`), not expanded once in the batch shell, or every node becomes rank 0;
- bash runs a trap only after its foreground child ends, so the batch shell must run srun in
  the background and `wait`, or `--signal=B:USR1@T` arrives after the job is killed;
- the requeue after a checkpoint is the trainer's job (`requeue_self`), since only it knows
  when the checkpoint is complete; and `scancel` sends the same TERM as a preemption, so only
  a job still RUNNING is requeued, or the cancel would be undone.

The template is slurm/job.sbatch.tmpl; `{{name}}` marks a variable. This module imports no
torch, so `launcher slurm render` is instant.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import field
from typing import Literal
from pathlib import Path

from pydantic import ConfigDict
from pydantic.dataclasses import dataclass

from launcher.errors import SlurmError
from launcher.rundir.paths import RunDir
from launcher.shipped import TEMPLATES

TEMPLATE_NAME = "job.sbatch.tmpl"
PORT_PROBE = "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])"



# A pydantic dataclass so that each field's docstring is its `--help` (use_attribute_docstrings).
@dataclass(config=ConfigDict(use_attribute_docstrings=True))
class SlurmJob:
    """What to ask Slurm for, and how to start the run on what it gives."""

    nodes: int = 1
    """Number of nodes; one `accelerate launch` (srun task) runs on each."""
    gpus_per_node: int = 1
    """GPUs per node, one training process each. 0: CPU only (see `processes_per_node`)."""
    processes_per_node: int | None = None
    """Training processes per node. Default: `gpus_per_node`, or 1 on CPU. On CPU, more than one
    runs gloo processes through `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu`."""
    tasks_per_node: int = 1
    """srun tasks (machines, to accelerate) per node. Leave at 1 except to imitate several
    machines on one host."""
    cpus_per_task: int | None = None
    """CPUs for each srun task (its training processes, data loading, tokenising). Default with
    `resources whole-nodes`: every CPU of the node, split between its tasks."""
    resources: Literal["whole-nodes", "as-given"] = "whole-nodes"
    """whole-nodes: ask for whole nodes (`--exclusive`, `--mem=0`) and give the srun tasks every CPU
    (without it, Slurm may give each node's GPU processes one core between them); an `exclusive` or
    `mem` in extra_sbatch replaces that part. as-given: only cpus_per_task and extra_sbatch."""
    partition: str | None = None
    """Slurm partition (queue)."""
    time: str | None = None
    """Time limit, as sbatch takes it: `HH:MM:SS`, `D-HH:MM`, minutes."""
    account: str | None = None
    """Account charged for the job."""
    qos: str | None = None
    """Quality of service."""
    extra_sbatch: list[str] = field(default_factory=list)
    """More sbatch options, such as `mem=0` or `exclusive` (the leading `--` may be left out)."""
    signal_grace: int = 120
    """Seconds before the time limit at which USR1 asks the trainer to checkpoint and requeue."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run first in the job: `module load ...`, `source venv/bin/activate`."""
    python: str = field(default_factory=lambda: sys.executable)
    """The Python that runs the launcher on the nodes (default: the one rendering)."""
    env: dict[str, str] = field(default_factory=dict)
    """Variables exported for the run (KEY=VALUE), after the automatic CPU ones."""
    job_name: str = "launcher"
    """Job name in squeue and in the log file's name."""
    port: int | None = None
    """Rendezvous port on the head node. Default: one found free when the job starts."""
    rdzv_timeout: int = 900
    """Seconds the nodes wait for each other at start (slow file systems, staggered starts)."""
    workdir: str | None = None
    """The job's working directory. Default: where sbatch runs."""
    program: list[str] | None = None
    """What accelerate (or python) runs. Default: `-m launcher train RECIPE`."""
    command: str | None = None
    """A whole per-task shell command instead of the launch (for tests and odd sites)."""
    template: str | None = None
    """Path of another template. Default: slurm/job.sbatch.tmpl."""

    def __post_init__(self) -> None:
        for name in ("nodes", "tasks_per_node", "signal_grace", "rdzv_timeout"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.gpus_per_node < 0:
            raise ValueError(f"gpus_per_node must be 0 or more, got {self.gpus_per_node}")
        for name in ("processes_per_node", "cpus_per_task"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.port is not None and not 1 <= self.port <= 65535:
            raise ValueError(f"port must be 1 to 65535, got {self.port}")
        for name in ("partition", "account", "qos", "time"):  # one word each on an #SBATCH line
            if getattr(self, name) is not None and not re.fullmatch(r"[\w.,:+-]+", getattr(self, name)):
                raise ValueError(f"{name} must be one word (letters, digits and ._,:+-), got {getattr(self, name)!r}")
        if self.time is not None and not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}|(?i:unlimited|infinite)", self.time):
            raise ValueError(f"time must be minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS, got {self.time!r}")
        if not re.fullmatch(r"[\w.+-]+", self.job_name):
            raise ValueError(f"job_name must be letters, digits and ._+-, got {self.job_name!r}")

    @property
    def machines(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def procs_per_machine(self) -> int:
        return self.processes_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.machines * self.procs_per_machine


def task_command(recipe_path: str | os.PathLike, spec: SlurmJob, overrides: Sequence[str] = ()) -> str:
    """The command each srun task runs, unquoted; `$SLURM_PROCID` in it is read per task."""
    hello = (f'trap "" USR1; echo "[launcher] task $SLURM_PROCID on $(hostname): machine rank $SLURM_PROCID of '
             f'{spec.machines}, {spec.procs_per_machine} process(es)"; ')
    if spec.command is not None:
        return hello + spec.command
    q = shlex.quote
    program = spec.program or ["-m", "launcher", "train", str(Path(recipe_path).resolve()), *overrides]
    if spec.world_size == 1:
        argv = [q(spec.python)]
    else:
        argv = [q(spec.python), "-m", "accelerate.commands.launch", "--multi_gpu",
                "--num_machines", str(spec.machines), "--num_processes", str(spec.world_size)]
        if spec.machines > 1:
            argv += ["--machine_rank", '"$SLURM_PROCID"', "--main_process_ip", '"$LAUNCHER_HEAD"']
        argv += ["--main_process_port", '"$LAUNCHER_PORT"', "--rdzv_conf", f"timeout={spec.rdzv_timeout}"]
    return hello + "exec " + " ".join(argv + [q(str(a)) for a in program])


def _sbatch_line(option: str) -> str:
    option = option.strip().removeprefix("#SBATCH").strip()
    if not option.startswith("-"):
        option = "--" + option
    return f"#SBATCH {option}"


def resource_requests(spec: SlurmJob) -> tuple[list[str], str | None]:
    """The sbatch options that ask for GPUs, CPUs and memory, and the CPUs each srun task gets (shell text).

    Asking only for GPUs leaves CPUs and memory to the site's defaults, often one CPU per task: a
    node's eight training processes would then share one core. Whole nodes are the default;
    options the user gave (cpus_per_task, `exclusive` or `mem...` in extra_sbatch) win."""
    given = {option.strip().removeprefix("#SBATCH").strip().lstrip("-").split("=")[0] for option in spec.extra_sbatch}
    options = [f"--gres=gpu:{spec.gpus_per_node}"] if spec.gpus_per_node else []
    if spec.cpus_per_task:
        options.append(f"--cpus-per-task={spec.cpus_per_task}")
    if spec.resources == "as-given":
        return options, str(spec.cpus_per_task) if spec.cpus_per_task else None
    if "exclusive" not in given:
        options.append("--exclusive")
    if not any(name.startswith("mem") for name in given):
        options.append("--mem=0")  # all of each node's memory
    if spec.cpus_per_task:
        return options, str(spec.cpus_per_task)
    split = spec.tasks_per_node
    on_node = f"${{SLURM_CPUS_ON_NODE:-{split}}}"
    return options, f'"{on_node}"' if split == 1 else f"$(( {on_node} / {split} ))"


def _template_text(spec: SlurmJob) -> str:
    # launcher/templates is a symlink to the repo's slurm/, packaged in wheels.
    path = Path(spec.template) if spec.template else TEMPLATES / TEMPLATE_NAME
    if not path.is_file():
        raise SlurmError(f"sbatch template not found: {path}")
    return path.read_text()


def sbatch_script(recipe_path: str | os.PathLike, run_dir: str | os.PathLike, spec: SlurmJob,
           overrides: Sequence[str] = ()) -> str:
    """The sbatch script for `recipe_path`, logging to `run_dir`/slurm/."""
    run_dir = Path(run_dir).resolve()
    if re.search(r"\s", str(run_dir)):
        raise SlurmError(f"run directory {run_dir} has white space, which #SBATCH --output cannot take")
    options, task_cpus = resource_requests(spec)
    for name in ("partition", "time", "account", "qos", "workdir"):
        value = getattr(spec, name)
        if value is not None:
            options.append(f"--{'chdir' if name == 'workdir' else name}={value}")
    options += spec.extra_sbatch
    env = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"} if not spec.gpus_per_node and spec.world_size > 1 else {}
    env.update(spec.env)
    srun = [f"--nodes={spec.nodes}", f"--ntasks-per-node={spec.tasks_per_node}", "--kill-on-bad-exit=1"]
    if spec.machines > 1:
        srun.append("--label")
    if task_cpus:  # srun stopped inheriting it from sbatch in Slurm 22.05
        srun.append(f"--cpus-per-task={task_cpus}")
    port = spec.port or f'$({shlex.quote(spec.python)} -c "{PORT_PROBE}")'
    values = {
        "header": f"launcher run of {Path(recipe_path).name!r}: {spec.nodes} node(s) x {spec.gpus_per_node} GPU(s), "
                  f"{spec.world_size} process(es)",
        "job_name": spec.job_name,
        "nodes": spec.nodes,
        "tasks_per_node": spec.tasks_per_node,
        "sbatch_options": "\n".join(map(_sbatch_line, options)) or "# (no other sbatch options)",
        "log_file": RunDir(run_dir).slurm_log(),  # Slurm fills in job name and id
        "signal_grace": spec.signal_grace,
        "setup": "\n".join(spec.setup) or "# (none)",
        "port": port,
        "launch_env": "\n".join(f"export {k}={shlex.quote(str(v))}" for k, v in env.items()),
        "srun_options": " ".join(srun),
        "task_command": shlex.quote(task_command(recipe_path, spec, overrides)),
    }

    def fill(match: re.Match) -> str:
        if match.group(1) not in values:
            raise SlurmError(f"template variable {{{{{match.group(1)}}}}} is unknown; known: {', '.join(values)}")
        return str(values[match.group(1)])

    return re.sub(r"\{\{\s*(\w+)\s*\}\}", fill, _template_text(spec))


def write_script(recipe_path: str | os.PathLike, run_dir: str | os.PathLike, spec: SlurmJob,
                 overrides: Sequence[str] = ()) -> Path:
    """Render into `run_dir`/slurm/job.sbatch (creating the folder Slurm logs into) and return it."""
    text = sbatch_script(recipe_path, run_dir, spec, overrides)
    path = RunDir(Path(run_dir).resolve()).job_script
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def log_path(run_dir: str | os.PathLike, spec: SlurmJob, job_id: str = "%j") -> Path:
    """Where the job's log goes (the `%j` pattern, or the file once the id is known)."""
    return RunDir(Path(run_dir).resolve()).slurm_log(spec.job_name, str(job_id))


def submit(script_path: str | os.PathLike, cwd: str | os.PathLike | None = None) -> str:
    """`sbatch --parsable` the script, from `cwd` (the job's default working directory); return the job id."""
    if shutil.which("sbatch") is None:
        raise SlurmError("sbatch is not on PATH: submit from a Slurm login node, or run "
                         "`launcher slurm render` and sbatch the script there")
    r = subprocess.run(["sbatch", "--parsable", str(script_path)], cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SlurmError(f"sbatch {script_path} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout.strip().split(";")[0]  # "id" or "id;cluster"


def restart_count() -> int:
    """How many times Slurm has requeued this job (0 on the first run or outside Slurm)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def requeue_self() -> bool:
    """Ask Slurm to requeue this job (call it once, after the checkpoint is complete).

    Returns True if Slurm accepted; Slurm then ends this run (TERM, then KILL) and starts the
    job again later, with SLURM_RESTART_COUNT one higher. Returns False outside Slurm, and, saying
    why on stderr, for a job no longer running or when scontrol fails (no --requeue, say).

    Only a RUNNING job is requeued: `scancel JOB` sends the same TERM, but the job is already
    COMPLETING then, and Slurm would requeue even that (seen on 22.05), undoing the cancel.
    """
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return False
    try:
        shown = _scontrol("show", "job", "-o", job_id)
        state = re.search(r"\bJobState=(\S+)", shown.stdout)
        if state is None or state.group(1) != "RUNNING":
            print(f"launcher: not requeueing job {job_id}: it is {state.group(1) if state else 'not known to scontrol'} "
                  "(cancelled or ending), not RUNNING", file=sys.stderr)
            return False
        r = _scontrol("requeue", job_id)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"launcher: scontrol for job {job_id} failed: {e}", file=sys.stderr)
        return False
    if r.returncode != 0:
        print(f"launcher: scontrol requeue {job_id} failed: {r.stderr.strip()}", file=sys.stderr)
        return False
    return True


def _scontrol(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60)
