"""launch/slurm.sbatch through the real sbatch, on a one-host SLURM cluster (munged, slurmctld and slurmd on this
machine, all their files in a temporary directory: launch/slurm-cluster.sh). Skipped where SLURM is not installed
(apt-get install --no-install-recommends slurmctld slurmd slurm-client munge) or the cluster does not start.
tests/test_multinode.py checks the same script with stubs for srun and scontrol, everywhere."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow

CLUSTER = ROOT / "launch" / "slurm-cluster.sh"
INSTALL = "apt-get install --no-install-recommends slurmctld slurmd slurm-client munge"
NEEDED = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo")
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
        "PREEMPTED"}
SMALL = ["--data.source=synthetic", "--data.subset=288", "--data.test_subset=60", "--model.depth=8",
         "--optim.batch_size=48", "--data.loader=gpu", "--run.device=cpu"]  # 6 steps an epoch


class Cluster:
    """A running one-host cluster: the environment its clients need and its node's name."""

    def __init__(self, folder: Path):
        self.folder = folder
        # an outer SLURM job's or the user's SLURM_*/SBATCH_* settings would steer this cluster's clients
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        self.env = {**clean, "SLURM_CONF": str(folder / "slurm.conf")}
        self.node = self.run("sinfo", "-h", "-o", "%N").stdout.strip()

    def run(self, *argv: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=30, check=True, **kw)

    def job(self, job_id: str) -> dict[str, str]:
        """scontrol's fields of a job (JobState, ExitCode, Restarts, ...)."""
        line = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def logs(self) -> str:
        return "\n".join(f"--- {f}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:])
                         for f in sorted((self.folder / "log").glob("*.log")))


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [c for c in NEEDED if shutil.which(c) is None]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} not on PATH): {INSTALL}")
    if os.geteuid() != 0:
        pytest.skip("a one-host SLURM cluster needs root (slurmd starts jobs as their user)")
    folder = tmp_path_factory.mktemp("slurm")
    try:
        start = subprocess.run(["bash", str(CLUSTER), "start", str(folder)], capture_output=True, text=True,
                               timeout=120)
        if start.returncode != 0:
            lines = start.stderr.strip().splitlines() or [f"exit {start.returncode}, no message"]
            pytest.skip(f"launch/slurm-cluster.sh start failed: {lines[-1]}")
        yield Cluster(folder)
    finally:  # the daemons and any job left running go, whatever happened
        if (folder / "slurm.conf").exists():
            subprocess.run(["bash", str(CLUSTER), "stop", str(folder)], capture_output=True, timeout=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def submit(slurm: Cluster, out: Path, *args: str) -> tuple[str, int]:
    """sbatch launch/slurm.sbatch from the repository root, as docs/multinode.md says; the job id, its rdzv port."""
    port = free_port()  # not torchrun's 29500: whatever else runs here keeps it
    env = {**slurm.env, "GPUS_PER_NODE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "RDZV_PORT": str(port), "LOGLEVEL": "INFO"}  # LOGLEVEL: torchrun logs its rendezvous
    proc = subprocess.run(["sbatch", "--parsable", "--nodes=1", f"--output={out}/job-%j.out", "launch/slurm.sbatch",
                           *SMALL, f"--run.out_dir={out}/run", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0], port


def wait_for(slurm: Cluster, job_id: str, out: Path, what: str, done: Callable[[dict[str, str]], bool],
             timeout: float = 150) -> dict[str, str]:
    """Poll the job until done(its fields) (sbatch --wait polls at 2, 10, 42 s: it would add ~20 s a job)."""
    deadline = time.monotonic() + timeout
    while True:
        job = slurm.job(job_id)
        if done(job):
            return job
        ended = job.get("JobState") in DONE
        if ended or time.monotonic() > deadline:
            output = next(out.glob("job-*.out"), None)
            pytest.fail(f"job {job_id}: {'ended' if ended else f'not there after {timeout:.0f} s'} before {what}: "
                        f"{job.get('JobState')} {job.get('Reason')} exit {job.get('ExitCode')}\n"
                        f"{output.read_text() if output else '(no output file)'}\n{slurm.logs()}")
        time.sleep(0.25)


def finished(job: dict[str, str]) -> bool:
    return job.get("JobState") in DONE


def test_sbatch_runs_one_torchrun_agent_that_meets_on_the_first_node(slurm, tmp_path):
    job_id, port = submit(slurm, tmp_path, "--run.epochs=2")
    job = wait_for(slurm, job_id, tmp_path, "the end", finished)
    output = (tmp_path / f"job-{job_id}.out").read_text()
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["world_size"], summary["steps"]) == (1, 12)
    assert re.search(rf"rdzv_endpoint\s*: {re.escape(slurm.node)}:{port}\n", output), output  # the job's node
    assert re.search(rf"run_id\s*: {job_id}\n", output) and "Rendezvous complete for workers" in output, output
    assert "fastres: done:" in output


def test_usr1_before_the_time_limit_checkpoints_requeues_and_the_requeued_job_resumes(slurm, tmp_path):
    """--signal=B:USR1@300 would come 5 min before the limit: scancel sends the batch shell the same signal now."""
    job_id, _ = submit(slurm, tmp_path, "--run.epochs=8")
    metrics = tmp_path / "run" / "metrics.jsonl"
    wait_for(slurm, job_id, tmp_path, "its first epoch", lambda _: metrics.exists() and metrics.stat().st_size > 0)
    slurm.run("scancel", "--signal=USR1", "--batch", job_id)
    job = wait_for(slurm, job_id, tmp_path, "the end of its second run", finished)
    output = (tmp_path / f"job-{job_id}.out").read_text()  # --open-mode=append: both runs
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), output
    first, second = output.split(f"fastres: SLURM time limit near: checkpointing and requeueing job {job_id}\n")
    assert "step 6/48" in first, output
    assert "fastres: interrupted at epoch" in second.split("DUE TO JOB REQUEUE")[0], output  # a clean checkpoint
    assert "fastres: resuming " in second and "fastres: done:" in second, output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["epochs_trained"], summary["steps"]) == (8, 48)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 9))  # one row an epoch: nothing lost or counted twice
