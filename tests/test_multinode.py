"""Beyond one machine: nodes made of network namespaces (tests/netns.py), one torchrun agent each, c10d rendezvous.

Two and three nodes train what one node with as many processes trains, bit for bit; a node killed mid-epoch is
survived (the survivor resumes at world 1 from the checkpoint) and a node that comes back joins at the next
restart; a rank that stops answering fails the others within run.collective_timeout_s; a run directory another
node cannot see fails at start; launch/slurm.sbatch turns SLURM's variables into the torchrun command.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import netns
import pytest
import torch

from fastres import checkpoint, config, distributed, rng
from fastres.config import ConfigError
from fastres.errors import UserError
from fastres.log import TIMING_FIELDS, read_metrics

from conftest import ROOT

NO_NETNS = netns.unavailable()
needs_netns = pytest.mark.skipif(NO_NETNS is not None, reason=f"cannot make hosts here: {NO_NETNS}")
PORT = 29400  # the rendezvous port on node 0: inside the test's namespaces, so no other test run shares it
# A node that joins a running group waits forever for the first round's MASTER_ADDR when the agents share their
# rendezvous store with the workers (torch caches it across rounds: pytorch/pytorch#135712): give each round its own.
ELASTIC = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
TIMING = TIMING_FIELDS  # a metrics row's fields that measure time, not training
# 288 images, global batch 48: 6 steps an epoch, 24 images a rank on 2 nodes, 16 on 3
SMALL = ["--data.source=synthetic", "--data.subset=288", "--data.test_subset=60", "--model.depth=8",
         "--optim.batch_size=48", "--data.loader=gpu", "--run.device=cpu", "--run.epochs=2"]


def env() -> dict[str, str]:
    """The agents' environment: this checkout's fastres, one thread a process, gloo on the node's interface, and
    torchrun's per-round rendezvous store (docs/multinode.md)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "GLOO_SOCKET_IFNAME": netns.IFNAME, **ELASTIC}


def agent(hosts: netns.Hosts, i: int, nnodes: str, args: list[str], restarts: int = 0) -> list[str]:
    """torchrun on node ``i`` of ``hosts``, rendezvous at node 0 (which hosts the c10d store)."""
    rdzv = f"is_host={str(i == 0).lower()},last_call_timeout=2"  # a re-formed group waits 2 s for more nodes
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", "--nproc_per_node=1",
            "--rdzv_backend=c10d", f"--rdzv_endpoint={hosts.addr(0)}:{PORT}", "--rdzv_id=fastres-test",
            f"--rdzv_conf={rdzv}", f"--local_addr={hosts.addr(i)}", f"--max-restarts={restarts}",
            "-m", "fastres.train", *args]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(out / checkpoint.NAME)["model"]


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def logs_text(logs: list[Path]) -> str:
    return "\n".join(log.read_text() for log in logs if log.exists())


@pytest.fixture
def hosts_of(request):
    """``hosts_of(n)``: n nodes, deleted (with everything running in them) when the test ends, passed or not."""
    made: list[netns.Hosts] = []

    def make(n: int) -> netns.Hosts:
        made.append(netns.Hosts(n).__enter__())
        return made[-1]
    yield make
    for h in made:
        h.close()


# ------------------------------------------------------------------------------------------- n nodes == 1 x n

@pytest.mark.slow
@needs_netns
@pytest.mark.parametrize("nodes", [2, 3])
def test_nodes_train_what_one_node_with_as_many_processes_trains(tmp_path, hosts_of, nodes):
    """n nodes x 1 process == 1 node x n processes: the final weights bit for bit, the metrics rows but for timing."""
    ref = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nodes}",
                            "-m", "fastres.train", *SMALL, f"--run.out_dir={tmp_path / 'one'}"], cwd=ROOT, env=env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    hosts = hosts_of(nodes)
    logs = [tmp_path / f"node{i}.log" for i in range(nodes)]
    agents = [hosts.start(i, agent(hosts, i, str(nodes), [*SMALL, f"--run.out_dir={tmp_path / 'nodes'}"]), logs[i],
                          env(), cwd=ROOT) for i in range(nodes)]
    codes = [a.wait(timeout=300) for a in agents]
    _, err = ref.communicate(timeout=300)
    assert codes == [0] * nodes, logs_text(logs)[-4000:]
    assert ref.returncode == 0, err[-3000:]
    a, b = weights(tmp_path / "nodes"), weights(tmp_path / "one")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    rows_n, rows_1 = read_metrics(tmp_path / "nodes"), read_metrics(tmp_path / "one")
    assert [r["epoch"] for r in rows_n] == [1, 2] and untimed(rows_n) == untimed(rows_1)
    summary = json.loads((tmp_path / "nodes" / "summary.json").read_text())
    assert summary["world_size"] == nodes and summary["steps"] == 2 * 6


# ------------------------------------------------------------------------------------------- a lost node

LOSS = ["--data.source=synthetic", "--data.subset=320", "--data.test_subset=60", "--model.depth=8",
        "--optim.batch_size=32", "--data.loader=gpu", "--run.device=cpu", "--run.epochs=10", "--run.eval_every=5",
        "--run.target_acc=0.01", "--run.checkpoint_every_s=1e-9", "--log.every_steps=1"]
STEPS = 320 // 32  # an epoch's steps; at world 2 the ranks agree on checkpoints every 16 (train.CHECK_EVERY)


def saved(out: Path) -> dict | None:
    """The checkpoint's progress and world, or None before the first."""
    try:
        state = checkpoint.load(out / checkpoint.NAME)
    except UserError:
        return None
    return {**state["progress"], "world": state["world"]}


def workers(hosts: netns.Hosts, i: int, agent_pid: int) -> list[int]:
    return [p for p in hosts.pids(i) if p != agent_pid]


def lose_node_one(hosts, out, logs, agents) -> dict:
    """Once a checkpoint inside an epoch is written at world 2: kill -9 node 1's agent and worker; that checkpoint."""
    netns.wait_until(lambda: (s := saved(out)) is not None and s["world"] == 2 and s["step"] % STEPS, "a checkpoint "
                     "inside an epoch at world 2", agents, 240, logs)
    for pid in hosts.pids(1):
        os.kill(pid, signal.SIGKILL)
    agents[1].wait(timeout=30)
    return saved(out)  # what the survivor resumes from: its next collective fails, so it writes no other


def term_pending(pid: int) -> bool:
    """Is a SIGTERM waiting for (stopped) process ``pid``? Its /proc status's ShdPnd mask: bit n - 1 is signal n."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(next(line for line in status.splitlines() if line.startswith("ShdPnd:")).split()[1], 16)
    return bool(mask & 1 << (signal.SIGTERM - 1))


def rejoin_node_one(hosts, out, logs, agents, args) -> tuple[dict, subprocess.Popen]:
    """Once the survivor has checkpointed at world 1: node 1 starts again. The survivor's worker is paused (SIGSTOP:
    at world 1 it waits on no collective) while node 1's agent starts up, seconds on a loaded machine, so the rejoin
    falls inside the run; it goes on once its agent, seeing node 1 waiting, has sent it SIGTERM (a clean
    checkpoint at the next step)."""
    netns.wait_until(lambda: (s := saved(out)) is not None and s["world"] == 1, "a checkpoint at world 1",
                     agents[:1], 240, logs)
    (survivor,) = workers(hosts, 0, agents[0].pid)
    os.kill(survivor, signal.SIGSTOP)
    try:
        at_world_1 = saved(out)
        logs.append(out.parent / "node1-again.log")
        again = hosts.start(1, agent(hosts, 1, "1:2", args, restarts=3), logs[-1], env(), cwd=ROOT)
        netns.wait_until(lambda: term_pending(survivor), "node 0's agent stopping its worker for node 1 (SIGTERM)",
                         [agents[0], again], 240, logs)
    finally:
        os.kill(survivor, signal.SIGCONT)
    return at_world_1, again


@pytest.mark.slow
@needs_netns
def test_a_lost_node_is_survived_and_a_returning_node_joins(tmp_path, hosts_of):
    """--nnodes=1:2: node 1 killed (-9) inside an epoch; node 0 re-forms the group alone, resumes at world 1 from that
    checkpoint; node 1 comes back and joins at the next restart (world 2 again). Nothing is lost or counted twice."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, hosts = tmp_path / "run", hosts_of(2)
    args = [*LOSS, f"--run.out_dir={out}"]
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    agents = [hosts.start(i, agent(hosts, i, "1:2", args, restarts=3), logs[i], env(), cwd=ROOT) for i in range(2)]
    lost = lose_node_one(hosts, out, logs, agents)
    at_world_1, again = rejoin_node_one(hosts, out, logs, agents, args)
    assert agents[0].wait(timeout=300) == 0 and again.wait(timeout=60) == 0, logs_text(logs)[-5000:]
    text = logs_text(logs)
    assert "stopped answering" in text  # the survivor's one line about the lost rank
    assert f"resuming at epoch {lost['epoch'] + 1} step {lost['step']}" in text
    assert "fastres: resuming at world 1 (checkpoint written at world 2)" in text
    assert "fastres: resuming at world 2 (checkpoint written at world 1)" in text
    rows, summary = read_metrics(out), json.loads((out / "summary.json").read_text())
    assert [r["epoch"] for r in rows] == [5, 10] and summary["steps"] == 10 * STEPS and summary["world_size"] == 2
    assert summary["epochs_to_target"] == 5 and summary["time_to_target_s"] == rows[0]["train_time_s"]
    # time to target is the sum over the three processes' segments, not the last one's alone
    assert 0 < lost["train_time_s"] < at_world_1["train_time_s"] < summary["time_to_target_s"]
    ea = EventAccumulator(str(out / "tb"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("train/batch_loss")] == list(range(1, 10 * STEPS + 1))  # each step once


# ------------------------------------------------------------------------------------------- a rank that hangs

def worker_pid(agent_pid: int, rank: int) -> int | None:
    """The pid of the worker of global rank ``rank`` that torchrun's agent ``agent_pid`` started."""
    for d in Path("/proc").iterdir():
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) if d.name.isdigit() else -1
            if ppid == agent_pid and f"RANK={rank}".encode() in (d / "environ").read_bytes().split(b"\0"):
                return int(d.name)
        except (OSError, IndexError, ValueError):
            continue
    return None


@pytest.mark.slow
def test_a_rank_that_stops_answering_fails_the_others_in_bounded_time_and_torchrun_restarts(tmp_path):
    """Rank 1 SIGSTOPped: rank 0 fails within run.collective_timeout_s (+ its roll call) in one line naming rank 1;
    torchrun restarts the group, which resumes from the checkpoint and finishes. The stopped rank is let go once the
    agent has sent it SIGTERM: torchrun itself would SIGKILL it 30 s later, time this test does not spend."""
    out, log = tmp_path / "run", tmp_path / "log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           "-m", "fastres.train", *LOSS, "--run.epochs=4", "--run.eval_every=1", "--run.checkpoint_every_s=0",
           "--run.collective_timeout_s=8", f"--run.out_dir={out}"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=f, stderr=subprocess.STDOUT)
    try:
        netns.wait_until(lambda: (out / checkpoint.NAME).exists(), "the first checkpoint", [proc], 240, [log])
        victim = worker_pid(proc.pid, 1)
        os.kill(victim, signal.SIGSTOP)
        t0 = time.monotonic()
        netns.wait_until(lambda: "stopped answering" in log.read_text(), "rank 0's line", [proc], 60, [log])
        waited = time.monotonic() - t0
        netns.wait_until(lambda: term_pending(victim), "torchrun stopping the group", [proc], 60, [log])
        os.kill(victim, signal.SIGCONT)
        assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    (line,) = [x for x in text.splitlines() if "stopped answering" in x and "[rank 1]" not in x]
    assert line.startswith("fastres: error: a collective failed or waited over run.collective_timeout_s = 8 s")
    assert ": rank 1 stopped answering" in line
    assert 8 <= waited < 8 + 3 + 20  # the timeout, the roll call, a loaded machine's slack
    assert "fastres: resuming a" in text and [r["epoch"] for r in read_metrics(out)] == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------- the run directory

@pytest.mark.slow
@needs_netns
def test_a_run_directory_another_node_cannot_see_fails_at_start_in_one_line(tmp_path, hosts_of):
    """Node 1 mounts another directory at the run directory's path (a mount namespace of its own): the same path
    string, not the same files. Both nodes stop at start, each with one line, instead of training apart."""
    shared, other = tmp_path / "shared", tmp_path / "other"
    shared.mkdir()
    other.mkdir()
    hosts, args = hosts_of(2), [*SMALL, f"--run.out_dir={shared / 'run'}"]
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    agents = [hosts.start(i, agent(hosts, i, "2", args), logs[i], env(), mount=(other, shared) if i else None,
                          cwd=ROOT) for i in range(2)]
    codes = [a.wait(timeout=240) for a in agents]
    text = logs_text(logs)
    assert codes[0] != 0 and codes[1] != 0, text[-4000:]
    ours = [x for x in text.splitlines() if x.startswith("fastres: error:")]  # torchrun's summary quotes each too
    blind = [x for x in ours if "is not the directory rank 0 writes" in x]
    told = [x for x in ours if "cannot see run.out_dir" in x]
    assert sum("traceback : fastres: error:" in x for x in text.splitlines()) == 2  # each agent's summary names it
    assert len(blind) == 1 and blind[0].startswith("fastres: error: [rank 1] run.out_dir ") and "storage" in blind[0]
    assert len(told) == 1 and told[0].startswith("fastres: error: rank 1 cannot see run.out_dir")
    assert not any(x.startswith("[rank") and "Traceback" in x for x in text.splitlines())
    assert not (shared / "run" / checkpoint.NAME).exists() and not (other / "run" / checkpoint.NAME).exists()


@pytest.mark.slow
@needs_netns
def test_nodes_started_with_different_configs_are_refused_naming_the_keys_and_ranks(tmp_path, hosts_of):
    """Another learning rate (would train apart silently), another depth (DDP's traceback), another epoch count (a
    hang at the end): refused when the group forms, in one line naming each key and the rank that holds it."""
    hosts = hosts_of(2)
    extra = [[], ["--optim.lr_per_128=0.2", "--model.depth=14", "--run.epochs=3"]]
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    agents = [hosts.start(i, agent(hosts, i, "2", [*SMALL, f"--run.out_dir={tmp_path / 'run'}", *extra[i]]),
                          logs[i], env(), cwd=ROOT) for i in range(2)]
    codes = [a.wait(timeout=240) for a in agents]
    text = logs_text(logs)
    assert codes[0] != 0 and codes[1] != 0, text[-4000:]
    ours = [x for x in text.splitlines() if x.startswith("fastres: error:")]
    assert len(ours) == 1, text[-4000:]  # rank 0 speaks for both
    assert "the ranks were started with different configs" in ours[0]
    for words in ("model.depth = 8 on rank 0 but 14 on rank(s) 1", "optim.lr_per_128 = 0.1 on rank 0 but 0.2",
                  "run.epochs = 2 on rank 0 but 3"):
        assert words in ours[0], ours[0]
    assert "DDP expects same model" not in text and not (tmp_path / "run" / checkpoint.NAME).exists()


# ------------------------------------------------------------------------------------------- in one process

def test_a_checkpoint_inside_an_epoch_resumes_at_another_world_with_derived_streams(tmp_path):
    ranks = [checkpoint.rng_state(), checkpoint.rng_state()]
    state = {"rng_ranks": ranks, "world": 2, "progress": {"epoch": 3, "step": 40}, "config": {"run": {"seed": 7}}}
    checkpoint.restore_rng_ranks(tmp_path, state, rank=0, world=1)
    derived = torch.rand(3)
    torch.manual_seed(rng.derive_seed(7, rng.EPOCH, 3, 0, 40))
    assert torch.equal(derived, torch.rand(3))  # a pure function of (seed, epoch, step, rank) at another world
    torch.manual_seed(123)
    ranks[1] = checkpoint.rng_state()
    checkpoint.restore_rng_ranks(tmp_path, state, rank=1, world=2)  # the same world: that rank's saved streams
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), (checkpoint.restore_rng_ranks(tmp_path, state, 1, 2), torch.rand(3))[1])
    assert checkpoint.world_note(state, 1) == "resuming at world 1 (checkpoint written at world 2)"
    assert checkpoint.world_note(state, 2) is None and checkpoint.world_note(None, 2) is None
    assert checkpoint.world_note({"rng_ranks": ranks}, 3) == "resuming at world 3 (checkpoint written at world 2)"
    with pytest.raises(UserError, match="holds no random streams"):
        checkpoint.restore_rng_ranks(tmp_path, {**state, "rng_ranks": []}, 0, 1)


def test_collective_timeout_is_a_run_key_a_resume_may_change():
    cfg = config.load(None, ["--run.collective_timeout_s=5"])
    assert cfg.run.collective_timeout_s == 5.0 and config.RunCfg().collective_timeout_s == 300.0
    assert "run.collective_timeout_s" in config.RESUME_MAY_DIFFER
    with pytest.raises(ConfigError, match="out of range"):
        config.load(None, ["--run.collective_timeout_s=0"])
    with pytest.raises(ConfigError, match="use a multiple of 3 or a number of ranks .* that divides it"):
        config.load(None, ["--optim.batch_size=64"], world=3)


def test_a_failed_collective_names_the_ranks_that_did_not_answer(monkeypatch):
    monkeypatch.setattr(distributed, "ROLL_CALL_S", 0.3)
    store = torch.distributed.HashStore()
    store.set("failed/2", "1")  # rank 2 failed too and said so; rank 1 did not
    d = distributed.Dist(rank=0, local_rank=0, world=3, device=torch.device("cpu"), store=store, timeout_s=5)
    with pytest.raises(UserError, match=r"over run.collective_timeout_s = 5 s on .*: rank 1 stopped answering .*"
                                        r"\[\[.*gloo/transport/tcp/unbound_buffer.cc:78\] Timed out"):
        with distributed.failures_named(d):
            raise RuntimeError("[/src/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv")
    with pytest.raises(ValueError):  # anything else is not a collective's failure: as it was
        with distributed.failures_named(d):
            raise ValueError("not a collective")


# ------------------------------------------------------------------------------------------- SLURM

SRUN = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$STUBS/srun.argv"
echo "$TORCH_DISABLE_SHARE_RDZV_TCP_STORE" > "$STUBS/srun.env"
trap 'echo TERM >> "$STUBS/srun.signals"; exit 143' TERM
echo $$ > "$STUBS/srun.pid"
while [ -n "${SRUN_WAITS:-}" ]; do sleep 0.05; done
"""
SCANCEL = """#!/usr/bin/env bash
echo "$@" >> "$STUBS/scancel.calls"
kill -TERM "$(cat "$STUBS/srun.pid")"  # as SLURM signals the step's tasks
"""
SCONTROL = """#!/usr/bin/env bash
if [ "$1 $2" = "show hostnames" ]; then printf 'node17\\nnode18\\n'; else echo "$@" >> "$STUBS/scontrol.calls"; fi
"""


def sbatch(tmp_path, *args: str, **env_vars: str) -> subprocess.Popen:
    """launch/slurm.sbatch run as SLURM would run it on a 2-node job, with srun and scontrol stubs on PATH that
    record what they are given."""
    for name, text in (("srun", SRUN), ("scancel", SCANCEL), ("scontrol", SCONTROL)):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    job = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[17-18]",
           "SLURM_SUBMIT_DIR": str(ROOT), "STUBS": str(tmp_path), "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.Popen(["bash", str(ROOT / "launch" / "slurm.sbatch"), *args], cwd=tmp_path,
                            env={**os.environ, **job, **env_vars}, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("min_nodes,nnodes", [("", "2"), ("1", "1:2")], ids=["fixed", "elastic"])
def test_slurm_script_makes_one_torchrun_per_node_from_slurms_variables(tmp_path, min_nodes, nnodes):
    proc = sbatch(tmp_path, "--config", "configs/smoke.toml", "--run.name=a b", SLURM_GPUS_ON_NODE="4",
                  MIN_NODES=min_nodes)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    argv = (tmp_path / "srun.argv").read_text().splitlines()
    assert argv == ["--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=0", "python3", "-m",
                    "torch.distributed.run", f"--nnodes={nnodes}", "--nproc_per_node=4", "--rdzv_backend=c10d",
                    "--rdzv_endpoint=node17:29500", "--rdzv_id=4242", "--max-restarts=3", "-m", "fastres.train",
                    "--config", "configs/smoke.toml", "--run.name=a b"]
    assert (tmp_path / "srun.env").read_text().strip() == "1"  # each rendezvous round its own store
    header = (ROOT / "launch" / "slurm.sbatch").read_text()
    assert all(f"#SBATCH {d}\n" in header for d in ("--requeue", "--ntasks-per-node=1", "--signal=B:USR1@300"))


def test_slurm_script_checkpoints_and_requeues_before_the_time_limit(tmp_path):
    """USR1 (SLURM's --signal=B:USR1@300): one SIGTERM to the step's tasks (a clean checkpoint), then the requeue."""
    proc = sbatch(tmp_path, SRUN_WAITS="1", GPUS_PER_NODE="1")
    netns.wait_until(lambda: (tmp_path / "srun.pid").exists(), "srun started", [proc], 30, [])
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=30) == 0
    assert (tmp_path / "srun.signals").read_text() == "TERM\n"
    assert (tmp_path / "scancel.calls").read_text() == "--signal=TERM 4242\n"
    assert (tmp_path / "scontrol.calls").read_text() == "requeue 4242\n"
    assert "fastres: SLURM time limit near: checkpointing and requeueing job 4242" in proc.stderr.read()
