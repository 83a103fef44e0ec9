"""Training on a real local Slurm through `launcher slurm submit`: one task, two machines on CPU,
preemption with requeue; and the same signals outside Slurm.

Every preemption test compares per-step losses with one uninterrupted run, `reference`, which
is itself the single-task job (so it is trained once). A step's loss depends only on its index
(StepPlan is deterministic and resume restores the RNG, LoRA dropout included), so an
interrupted and resumed run must match it bitwise, each step trained exactly once.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import slurm_cluster, wait_for  # noqa: F401 (slurm_cluster is a fixture)
from support import REPO, build_tiny_llama, launch, rank_record, tiny_recipe, train_losses, write_recipe

pytestmark = pytest.mark.slurm
STEPS = 30  # ~0.35 s each here: long enough to be signalled mid-run
JOB_TIMEOUT = 240  # each launcher process spends 10-30 s importing on a busy 2-core machine


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """Larger than conftest's tiny model, so that a run lasts long enough to be interrupted."""
    return build_tiny_llama(tmp_path_factory.mktemp("llama-128"), hidden=128, layers=2)


def long_recipe(model: Path, run_dir: Path, folder: Path) -> Path:
    recipe = tiny_recipe(model, run_dir, train={"max_steps": STEPS, "save_every": 5}, data={"eval": None})
    return write_recipe(recipe, folder / "recipe.yaml")


def submit(cluster, recipe: Path, *options: str) -> tuple[str, Path]:
    """`launcher slurm submit` as a user runs it; returns the job id and the log file it names."""
    result = launch(["slurm", "submit", recipe, "--gpus-per-node", "0", *options], env={"SLURM_CONF": str(cluster.conf)},
                    timeout=120)
    assert result.returncode == 0, result.stderr + result.stdout
    job = re.search(r"submitted job (\d+)", result.stdout).group(1)
    return job, Path(re.search(r"^log: (\S+)", result.stdout, re.M).group(1))


def train_steps(run_dir: Path) -> list[int]:
    """Every logged training step in order, repeats included (a step trained twice shows twice)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r.get("kind") == "train"]


def completed(cluster, job: str, log: Path, restarts: int = 0) -> str:
    info = cluster.wait_state(job, "COMPLETED", timeout=JOB_TIMEOUT, restarts=restarts)
    text = log.read_text()
    assert info["ExitCode"] == "0:0", text
    return text


@pytest.fixture(scope="module")
def reference(slurm_cluster, model, tmp_path_factory):
    """The uninterrupted run: a single-task job sent by `launcher slurm submit`."""
    folder = tmp_path_factory.mktemp("reference")
    job, log = submit(slurm_cluster, long_recipe(model, folder / "run", folder))
    return folder / "run", completed(slurm_cluster, job, log)


def test_single_task_job_trains_and_leaves_a_final_model(reference):
    run, log = reference
    assert (run / "final" / "adapter_model.safetensors").is_file(), log
    assert train_steps(run) == list(range(1, STEPS + 1))
    assert (run / "slurm" / "job.sbatch").is_file()
    assert "machine rank 0 of 1" in log and "srun exited with status 0" in log, log


def test_two_machines_on_cpu_each_task_has_its_own_rank(slurm_cluster, tiny_model, tmp_path):
    """The multi-node path: 2 srun tasks on one host stand in for 2 machines (gloo), one process each."""
    recipe = write_recipe(tiny_recipe(tiny_model, tmp_path / "run", train={"max_steps": 3}, data={"eval": None}),
                          tmp_path / "recipe.yaml")
    job, log = submit(slurm_cluster, recipe, "--tasks-per-node", "2")
    text = completed(slurm_cluster, job, log)
    for rank in (0, 1):  # srun --label puts the task id first; the task says the rank it passes to accelerate
        assert re.search(rf"^{rank}: \[launcher\] task {rank} on \S+: machine rank {rank} of 2, 1 process", text, re.M), text
    ranks = sorted((tmp_path / "run" / "logs").glob("rank-*.jsonl"))
    assert [p.name for p in ranks] == ["rank-0.jsonl", "rank-1.jsonl"], text
    assert all(rank_record(tmp_path / "run", rank, "world_size")["world_size"] == 2 for rank in (0, 1))
    assert train_steps(tmp_path / "run") == [1, 2, 3]
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()


def test_usr1_checkpoints_requeues_and_the_job_resumes_exactly(slurm_cluster, model, reference, tmp_path):
    run = tmp_path / "run"
    job, log = submit(slurm_cluster, long_recipe(model, run, tmp_path))
    wait_for(run / "checkpoints" / "step-5" / "trainer_state.json", JOB_TIMEOUT, "first checkpoint", log)
    slurm_cluster.signal_batch(job, "USR1")  # what --signal=B:USR1@T does before the time limit
    slurm_cluster.release(job, timeout=60)  # pending again after the trainer's requeue; start it now
    text = completed(slurm_cluster, job, log, restarts=1)

    stopped = int(re.search(r"stopped by SIGUSR1 after step (\d+)/", text).group(1))
    assert 5 <= stopped < STEPS, text
    assert "requeued this Slurm job" in text and f"step-{stopped} at step {stopped}" in text, text
    assert "batch shell got SIGUSR1" in text and "restart 1" in text, text
    assert train_steps(run) == list(range(1, STEPS + 1)), "every step trained once, none past the end"
    expected, resumed = train_losses(reference[0]), train_losses(run)
    assert [resumed[s] for s in expected] == list(expected.values())  # bitwise
    assert (run / "final" / "adapter_model.safetensors").is_file()


def test_sigterm_outside_slurm_checkpoints_and_a_rerun_resumes_exactly(model, reference, tmp_path):
    run = tmp_path / "run"
    recipe = long_recipe(model, run, tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # even when pytest runs in a job
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    with open(tmp_path / "first.log", "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "launcher", str(recipe)], cwd=REPO, env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + JOB_TIMEOUT
            metrics = run / "metrics.jsonl"
            while not metrics.exists() or '"kind": "train"' not in metrics.read_text():
                assert process.poll() is None and time.monotonic() < deadline, "the run never logged a step"
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=120) == 0
        finally:
            process.kill()
    first = (tmp_path / "first.log").read_text()
    stopped = int(re.search(r"stopped by SIGTERM after step (\d+)/", first).group(1))
    assert stopped < STEPS and "run the same command again to resume" in first, first
    assert (run / "checkpoints" / f"step-{stopped}" / "trainer_state.json").is_file()
    assert not (run / "final").exists()

    again = launch([recipe], timeout=JOB_TIMEOUT)
    assert again.returncode == 0, again.stderr
    assert f"step-{stopped} at step {stopped}" in again.stdout
    assert train_steps(run) == list(range(1, STEPS + 1))
    expected, resumed = train_losses(reference[0]), train_losses(run)
    assert [resumed[s] for s in expected] == list(expected.values())  # bitwise
