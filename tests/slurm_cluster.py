"""A real, throw-away Slurm cluster on this machine, for tests.

Debian's Slurm (slurmctld + slurmd on one node, munge auth) is installed with apt when
`sbatch` is missing, configured in a temporary folder and started by hand: there is no
systemd here. Each cluster gets its own ports, state, spool, pid and log files, so two test
sessions can run side by side. munged is shared (one per machine, /run/munge) and is left
running at teardown, because another session may be using it.

Mocking Slurm would test our idea of Slurm; the bugs this code guards against (a batch shell
that swallows signals, every node becoming rank 0, a requeue that never comes back) only show
on the real thing.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from support import free_port

APT_PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


class SlurmUnavailable(RuntimeError):
    """Slurm is missing and cannot be installed here (not root, no apt); tests skip with this.

    A cluster that is installed but fails to start raises RuntimeError instead: that is a
    failure, not a reason to skip."""


def ensure_installed() -> None:
    """Install Debian's Slurm and munge if `sbatch` or the daemons are missing."""
    if all(shutil.which(x) or Path(f"/usr/sbin/{x}").exists() for x in ("sbatch", "slurmctld", "slurmd", "munged")):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("Slurm is not installed and installing it needs root")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("Slurm is not installed and there is no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *APT_PACKAGES]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-500:]}")


def _munge_works() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if cred.returncode != 0:
            return False
        return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def ensure_munge() -> None:
    """Start the machine's munged (as the munge user) unless one already answers."""
    if _munge_works():
        return
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(os.urandom(1024))
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    run_dir = Path("/run/munge")
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.chown(run_dir, "munge", "munge")
    run_dir.chmod(0o755)
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True, capture_output=True, timeout=30)
    deadline = time.monotonic() + 10
    while not _munge_works():
        if time.monotonic() > deadline:
            raise RuntimeError("munged started but `munge -n | unmunge` still fails")
        time.sleep(0.1)


class SlurmCluster:
    """One slurmctld and one slurmd, configured and started in `root`."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.host = socket.gethostname()

    # -- lifecycle ---------------------------------------------------------------------------
    @classmethod
    def start(cls, root: Path, timeout: float = 120) -> "SlurmCluster":
        ensure_installed()
        ensure_munge()
        cluster = cls(root)
        cluster._write_conf()
        try:
            for daemon in ("slurmctld", "slurmd"):
                r = subprocess.run([f"/usr/sbin/{daemon}", "-f", str(cluster.conf)], env=cluster.env,
                                   capture_output=True, text=True, timeout=30)
                if r.returncode != 0:
                    raise RuntimeError(f"{daemon} failed to start: {r.stderr.strip()}\n{cluster.logs()}")
            cluster._wait_idle(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _write_conf(self) -> None:
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        probe = subprocess.run(["/usr/sbin/slurmd", "-C"], capture_output=True, text=True, timeout=30, check=True)
        node = probe.stdout.splitlines()[0]  # NodeName=vm CPUs=2 ... RealMemory=23980
        mem = int(re.search(r"RealMemory=(\d+)", node).group(1))
        node = re.sub(r"RealMemory=\d+", f"RealMemory={max(mem - 512, mem * 9 // 10)}", node)
        node = re.sub(r"NodeName=\S+", f"NodeName={self.host}", node)
        r = self.root
        self.conf.write_text(f"""\
ClusterName=launchertest
SlurmctldHost={self.host}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
MailProg=/bin/true
ReturnToService=2
MpiDefault=none
KillWait=5
InactiveLimit=0
MinJobAge=600
{node} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        out = ""
        while time.monotonic() < deadline:
            r = self.run("sinfo", "-h", "-N", "-o", "%t", check=False)
            out = r.stdout.strip()
            if out in ("idle", "mix", "alloc"):
                return
            time.sleep(0.2)
        raise RuntimeError(f"node not idle after {timeout}s (sinfo says {out!r})\n{self.logs()}")

    def stop(self) -> None:
        """Stop slurmd and slurmctld by their pid files (never by name: others may run their own)."""
        for name in ("slurmd", "slurmctld"):
            pid_file = self.root / f"{name}.pid"
            try:
                pid = int(pid_file.read_text().strip())
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError):
                continue
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.1)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            p = self.root / name
            if p.exists():
                parts.append(f"--- {name} (tail) ---\n" + "\n".join(p.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(parts)

    # -- commands ----------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, timeout: float = 120, cwd=None) -> subprocess.CompletedProcess:
        r = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def submit(self, script_path, cwd=None, *sbatch_args: str) -> str:
        """sbatch the script (from `cwd`, default its folder) and return the job id."""
        cwd = cwd or Path(script_path).parent
        out = self.run("sbatch", "--parsable", *sbatch_args, str(script_path), cwd=cwd).stdout.strip()
        return out.split(";")[0]

    def job_info(self, job_id: str) -> dict:
        """`scontrol show job -o` as a dict (JobState, Restarts, Reason, StartTime, ...)."""
        r = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout)) if r.returncode == 0 else {}

    def wait_state(self, job_id: str, states, timeout: float = 300, restarts: int | None = None) -> dict:
        """Poll until the job is in one of `states` (and, if given, has `restarts` restarts).

        Polls scontrol every 0.2 s: `sbatch --wait` polls slowly. Raises TimeoutError with the
        job's last info and the daemons' logs, or AssertionError if the job ended otherwise.
        """
        states = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        info: dict = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            state = info.get("JobState")
            if state in states and (restarts is None or int(info.get("Restarts", -1)) == restarts):
                return info
            if state in TERMINAL and state not in states:
                raise AssertionError(f"job {job_id} ended {state}, wanted {sorted(states)}: {info}")
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout}s: {info}\n{self.logs()}")

    def release(self, job_id: str, timeout: float = 300) -> None:
        """Start a requeued job now instead of after Slurm's ~2 minute requeue delay.

        Waits for the job to be pending again, then 1.5 s (bumping StartTime at once after a
        requeue was seen to fail), then sets StartTime=now.
        """
        self.wait_state(job_id, {"PENDING"}, timeout=timeout)
        time.sleep(1.5)
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    def requeue_now(self, job_id: str, timeout: float = 300) -> None:
        """`scontrol requeue` the job and bring it back at once."""
        self.run("scontrol", "requeue", str(job_id))
        self.release(job_id, timeout)

    def signal_batch(self, job_id: str, sig: str = "USR1") -> None:
        """Send `sig` to the batch shell only, as `--signal=B:SIG@T` does before the time limit."""
        self.run("scancel", f"--signal={sig}", "--batch", str(job_id))

    def cancel(self, job_id: str) -> None:
        self.run("scancel", str(job_id), check=False)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A started one-node cluster for the test module that imports this fixture; stopped after it."""
    try:
        cluster = SlurmCluster.start(tmp_path_factory.mktemp("slurm"))
    except SlurmUnavailable as e:
        pytest.skip(f"no local Slurm cluster: {e}")
    yield cluster
    cluster.stop()


def wait_for(path: Path, timeout: float, what: str, log: Path | None = None) -> None:
    """Poll until `path` exists; on timeout, say what was awaited and show the job log."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            tail = log.read_text() if log and log.exists() else "(no log)"
            raise TimeoutError(f"{what}: {path} did not appear in {timeout}s\njob log:\n{tail}")
        time.sleep(0.1)
