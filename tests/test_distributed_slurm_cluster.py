"""launcher.slurm: the rendered script, then real jobs on a throw-away local Slurm cluster.

The cluster tests (marked `slurm`) install Debian's Slurm when it is missing and skip, with the
reason, where that is impossible (not root, no apt). No training loop is involved: the jobs run
small probe programs in place of `launcher train`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher import cli
from launcher.rundir.directory import plan_run_dir
from launcher.rundir.paths import RunDir
from launcher.errors import UserError
from launcher.distributed.slurm import SlurmJob, log_path, requeue_self, sbatch_script, submit, task_command, write_script
from launcher.errors import SlurmError

sys.path.insert(0, str(Path(__file__).parent))
from slurm_cluster import slurm_cluster, wait_for  # noqa: E402,F401 (slurm_cluster is a fixture)
from support import tiny_recipe, write_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
BUSY = 300  # seconds a job step may take before the test calls it hung: generous, as the machine may be busy


# -- rendering, no Slurm needed ------------------------------------------------------------

FAKE_SRUN = """#!/bin/bash
# Fake srun: skip options, run the command once per node with that node's SLURM_PROCID.
while [[ "$1" == -* ]]; do shift; done
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_PROCID=$i "$@" & done
wait
"""
FAKE_SCONTROL = """#!/bin/bash
[[ "$1 $2" == "show hostnames" ]] && printf 'node-a\\nnode-b\\n'
"""
FAKE_PYTHON = f"""#!{PY}
# Fake python: a port probe (-c) runs for real; a launch records what it was given.
import json, os, sys
if sys.argv[1] == "-c":
    os.execv({PY!r}, [{PY!r}, *sys.argv[1:]])
with open(os.path.join(os.environ["FAKE_OUT"], "task-" + os.environ["SLURM_PROCID"] + ".json"), "w") as f:
    json.dump({{"argv": sys.argv[1:], "env": dict(os.environ)}}, f)
"""


def test_render_two_nodes_eight_gpus_ranks_evaluated_per_task(tmp_path, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("python", FAKE_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    recipe = tmp_path / "my recipe's.yaml"  # a space and a quote: the quoting must hold
    write_recipe(tiny_recipe("org/some-model", tmp_path / "run"), recipe)
    status = cli.main(["slurm", "render", str(recipe), "--nodes", "2", "--gpus-per-node", "8", "--cpus-per-task", "16",
                       "--partition", "gpu", "--time", "2:00:00", "--setup", "export SETUP_RAN=yes",
                       "--python", str(bin_dir / "python"), "train.lr=1e-4"])  # an override after the options
    script = capsys.readouterr().out
    assert status == 0 and script.startswith("#!/bin/bash")

    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@120", "#SBATCH --nodes=2",
                 "#SBATCH --ntasks-per-node=1", "#SBATCH --gres=gpu:8", "#SBATCH --partition=gpu",
                 f"#SBATCH --output={tmp_path / 'run' / 'slurm'}/%x-%j.out", "#SBATCH --open-mode=append"):
        assert line in script.splitlines(), line
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "bash -c 'trap" in srun and "--machine_rank \"$SLURM_PROCID\"" in srun  # single-quoted: read per task

    # Run the script as the batch shell would, with SLURM_PROCID=0 there: if the rank were
    # expanded in the batch shell, both nodes would say machine rank 0.
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_OUT=str(out), SLURM_JOB_ID="42",
               SLURM_NNODES="2", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="node-[a-b]", SLURM_PROCID="0")
    r = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=BUSY)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "machine rank 0 of 2, 8 process(es)" in r.stdout and "machine rank 1 of 2" in r.stdout, r.stdout
    tasks = [json.loads((out / f"task-{i}.json").read_text()) for i in range(2)]
    ports = set()
    for rank, task in enumerate(tasks):
        argv = task["argv"]
        opt = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
        assert argv[:3] == ["-m", "accelerate.commands.launch", "--multi_gpu"]
        assert opt["--machine_rank"] == str(rank)
        assert opt["--num_machines"] == "2" and opt["--num_processes"] == "16"
        assert opt["--main_process_ip"] == "node-a"
        assert opt["--rdzv_conf"] == "timeout=900"
        assert argv[-5:] == ["-m", "launcher", "train", str(recipe.resolve()), "train.lr=1e-4"]
        assert task["env"]["SETUP_RAN"] == "yes" and task["env"]["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "120"
        assert "ACCELERATE_USE_CPU" not in task["env"]
        ports.add(opt["--main_process_port"])
    assert len(ports) == 1 and 0 < int(ports.pop()) < 65536


def test_cpu_launch_commands(tmp_path):
    one = task_command("r.yaml", SlurmJob(gpus_per_node=0, python="py"))
    assert one.endswith(f"exec py -m launcher train {Path('r.yaml').resolve()}")
    two = SlurmJob(gpus_per_node=0, processes_per_node=2, python="py")
    assert "--multi_gpu --num_machines 1 --num_processes 2" in task_command("r.yaml", two)
    script = sbatch_script("r.yaml", tmp_path, two)
    assert "export ACCELERATE_USE_CPU=1" in script and "export OMP_NUM_THREADS=1" in script
    assert "--gres" not in script
    with pytest.raises(ValueError, match="nodes"):
        SlurmJob(nodes=0)


def test_write_script_submit_errors_and_requeue_outside_slurm(tmp_path, monkeypatch):
    path = write_script(tmp_path / "r.yaml", tmp_path / "run", SlurmJob(gpus_per_node=0))
    assert path == tmp_path / "run" / "slurm" / "job.sbatch" and path.parent.is_dir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(SlurmError, match="sbatch is not on PATH"):
        submit(path)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert requeue_self() is False


def test_run_dir_holding_only_the_job_script_is_fresh_and_overwrite_keeps_it(tmp_path):
    run = tmp_path / "run"
    write_script(tmp_path / "r.yaml", run, SlurmJob(gpus_per_node=0))  # what `launcher slurm submit` leaves
    (run / "slurm" / "launcher-7.out").write_text("log\n")
    (run / "logs").mkdir()
    (run / "logs" / "rank-1.jsonl").write_text("{}\n")
    assert plan_run_dir(run, {}, overwrite=False).resume_from is None
    (run / "notes.txt").write_text("not ours")
    with pytest.raises(UserError, match="not a launcher run"):
        plan_run_dir(run, {}, overwrite=False)
    (run / "recipe.yaml").write_text("{}\n")
    RunDir(run).clear()  # --overwrite inside the job must keep the job's own script and log
    assert sorted(p.name for p in (run / "slurm").iterdir()) == ["job.sbatch", "launcher-7.out"]
    assert not (run / "recipe.yaml").exists() and not (run / "logs").exists()


# -- on a real Slurm -------------------------------------------------------------------------

PROBE = """\
import os, sys
print(f"probe rank={os.environ['SLURM_PROCID']} arg={sys.argv[1]} host={os.environ['LAUNCHER_HEAD']}", flush=True)
"""


@pytest.mark.slurm
def test_one_task_per_machine_gets_its_own_rank(slurm_cluster, tmp_path, monkeypatch):
    (tmp_path / "probe.py").write_text(PROBE)
    spec = SlurmJob(nodes=1, tasks_per_node=2, gpus_per_node=0, python=PY,
                    command=f'{PY} {tmp_path / "probe.py"} "$SLURM_PROCID"')
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
    job = submit(write_script(tmp_path / "r.yaml", tmp_path, spec), cwd=tmp_path)  # the real submit
    slurm_cluster.wait_state(job, "COMPLETED", timeout=BUSY)
    log = log_path(tmp_path, spec, job).read_text()
    ranks = sorted(line.split("rank=")[1].split()[0] for line in log.splitlines() if "probe rank=" in line)
    assert ranks == ["0", "1"], log
    assert "arg=0" in log and "arg=1" in log, log  # "$SLURM_PROCID" expanded per task


WAITER = """\
import os, signal, sys, time
from pathlib import Path
from launcher.distributed.slurm import requeue_self, restart_count
out = Path(sys.argv[1])
if restart_count() >= 1:
    (out / "second-run").write_text(os.environ["SLURM_RESTART_COUNT"])
    sys.exit(0)
got = []
signal.signal(signal.SIGUSR1, lambda sig, frame: got.append(sig))
(out / "ready").touch()
deadline = time.monotonic() + 300
while not got and time.monotonic() < deadline:
    time.sleep(0.05)
(out / "got-usr1").write_text(str(bool(got)))
(out / "requeued").write_text(str(requeue_self()))
time.sleep(60)  # Slurm ends this run once the requeue is taken
"""


def submit_program(slurm_cluster, folder, source: str):
    """Submit a one-task job whose task runs `source` (given the folder as argv[1]); returns (job id, log path)."""
    (folder / "program.py").write_text(source)
    spec = SlurmJob(gpus_per_node=0, python=PY, env={"PYTHONPATH": str(ROOT)},
                    command=f"exec {PY} {folder / 'program.py'} {folder}")
    job = slurm_cluster.submit(write_script(folder / "r.yaml", folder, spec), cwd=folder)
    return job, log_path(folder, spec, job)


@pytest.mark.slurm
def test_usr1_reaches_the_task_which_requeues_itself(slurm_cluster, tmp_path):
    job, log = submit_program(slurm_cluster, tmp_path, WAITER)
    wait_for(tmp_path / "ready", BUSY, "first run", log)
    slurm_cluster.signal_batch(job, "USR1")  # what --signal=B:USR1@120 does before the time limit
    wait_for(tmp_path / "requeued", BUSY, "signal forwarded", log)
    assert (tmp_path / "got-usr1").read_text() == "True"
    assert (tmp_path / "requeued").read_text() == "True"
    slurm_cluster.release(job)
    slurm_cluster.wait_state(job, "COMPLETED", timeout=BUSY, restarts=1)
    assert (tmp_path / "second-run").read_text() == "1"
    text = log.read_text()
    assert "batch shell got SIGUSR1" in text and "restart 0" in text and "restart 1" in text, text


ON_TERM_REQUEUE = """\
import signal, sys, time
from pathlib import Path
from launcher.distributed.slurm import requeue_self
out = Path(sys.argv[1])
def stop(sig, frame):
    (out / "requeued").write_text(str(requeue_self()))
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
(out / "ready").touch()
time.sleep(60)
"""


@pytest.mark.slurm
def test_scancel_is_final_even_though_the_trainer_requeues_on_term(slurm_cluster, tmp_path):
    """scancel sends TERM, which the trainer treats as preemption; requeueing then would undo the cancel."""
    job, log = submit_program(slurm_cluster, tmp_path, ON_TERM_REQUEUE)
    wait_for(tmp_path / "ready", BUSY, "job start", log)
    slurm_cluster.cancel(job)
    wait_for(tmp_path / "requeued", BUSY, "TERM handler", log)
    assert (tmp_path / "requeued").read_text() == "False", log.read_text()
    time.sleep(2)  # a requeue would show as PENDING with Restarts=1 by now
    info = slurm_cluster.job_info(job)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", info


DIST_WAITER = """\
import os, signal, sys, time
from pathlib import Path
out, rank = Path(sys.argv[1]), os.environ["RANK"]
got = []
signal.signal(signal.SIGUSR1, lambda sig, frame: got.append(sig))
(out / f"ready-{rank}").write_text(os.environ["WORLD_SIZE"])
deadline = time.monotonic() + 300
while not got and time.monotonic() < deadline:
    time.sleep(0.05)
(out / f"got-{rank}").write_text(str(bool(got)))
"""


@pytest.mark.slurm
def test_usr1_reaches_accelerate_workers_and_launcher_survives(slurm_cluster, tmp_path):
    """The real launch path on CPU: accelerate starts 2 gloo-capable workers; USR1 must reach
    both, and accelerate's launcher must not die of it (it would orphan them)."""
    (tmp_path / "w.py").write_text(DIST_WAITER)
    spec = SlurmJob(gpus_per_node=0, processes_per_node=2, python=PY,
                    program=[str(tmp_path / "w.py"), str(tmp_path)])
    job = slurm_cluster.submit(write_script(tmp_path / "r.yaml", tmp_path, spec), cwd=tmp_path)
    log = log_path(tmp_path, spec, job)
    for rank in (0, 1):
        wait_for(tmp_path / f"ready-{rank}", BUSY, "accelerate workers", log)
        assert (tmp_path / f"ready-{rank}").read_text() == "2"
    slurm_cluster.signal_batch(job, "USR1")
    info = slurm_cluster.wait_state(job, "COMPLETED", timeout=BUSY)
    assert info["ExitCode"] == "0:0", log.read_text()
    assert [(tmp_path / f"got-{r}").read_text() for r in (0, 1)] == ["True", "True"], log.read_text()


ALL_REDUCE = """\
import json, os, sys
import torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.tensor([dist.get_rank() + 1.0])
dist.all_reduce(t)
keys = ("RANK", "WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
with open(os.path.join(sys.argv[1], f"rank-{dist.get_rank()}.json"), "w") as f:
    json.dump({"sum": t.item(), **{k: os.environ[k] for k in keys}}, f)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slurm
def test_two_machines_rendezvous_through_accelerate(slurm_cluster, tmp_path):
    """The multi-node launch for real, with 2 srun tasks on one host standing in for 2 nodes:
    machine rank from $SLURM_PROCID, head host and port from the batch shell, a gloo all-reduce."""
    (tmp_path / "ar.py").write_text(ALL_REDUCE)
    spec = SlurmJob(nodes=1, tasks_per_node=2, gpus_per_node=0, python=PY,
                    program=[str(tmp_path / "ar.py"), str(tmp_path)])
    job = slurm_cluster.submit(write_script(tmp_path / "r.yaml", tmp_path, spec), cwd=tmp_path)
    info = slurm_cluster.wait_state(job, "COMPLETED", timeout=BUSY)
    log = log_path(tmp_path, spec, job).read_text()
    assert info["ExitCode"] == "0:0", log
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["sum"] for r in ranks] == [3.0, 3.0], log
    assert [(r["RANK"], r["GROUP_RANK"], r["WORLD_SIZE"]) for r in ranks] == [("0", "0", "2"), ("1", "1", "2")]
    assert ranks[0]["MASTER_ADDR"] == slurm_cluster.host and ranks[0]["MASTER_PORT"] == ranks[1]["MASTER_PORT"]
