"""torchrun's environment -> a process group (nccl on CUDA, gloo on CPU), and the few collectives fastres uses.

As in nanoGPT: read RANK / LOCAL_RANK / WORLD_SIZE, which torchrun sets (and leaves unset for a plain
``python -m``). Multi-node runs need nothing more to start: torchrun's rendezvous flags set the same variables
(see launch/multinode.sh and docs/multinode.md). What more nodes add is handled here: a rank that stops answering
fails the others within run.collective_timeout_s, in one line naming it (:func:`failures_named`), and a run
directory another node cannot see fails at start (:func:`check_shared_dir`).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed

from fastres import config
from fastres.config import RunCfg
from fastres.errors import UserError, one_line


@dataclass(frozen=True)
class Dist:
    """This process's place in the run (its rank among ``world``, its device). Everywhere in fastres ``dist`` names
    one of these; torch's module is spelled torch.distributed."""
    rank: int
    local_rank: int
    world: int
    device: torch.device
    store: Any = None  # the attempt's rendezvous store (a torch.distributed.Store; None without a process group)
    timeout_s: float = 0.0  # the process group's collective timeout

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_rank() -> int:
    """This process's rank from torchrun's environment, before any process group exists."""
    return int(os.environ.get("RANK", "0"))


def env_world() -> int:
    """The number of ranks torchrun started (1 for a plain ``python -m``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def backends(run: RunCfg) -> None:
    """Set torch's determinism switches from run.deterministic, once, before anything runs on the device: what
    train and every measurement run with (cuDNN's autotuner picks kernels that vary run to run)."""
    if run.deterministic and "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # cuBLAS has read it already
            raise UserError("run.deterministic = true needs CUBLAS_WORKSPACE_CONFIG before CUDA starts: run with "
                            "CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment")
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    if run.deterministic or torch.are_deterministic_algorithms_enabled():  # it imports inductor (2 s): only to change
        torch.use_deterministic_algorithms(run.deterministic)
    torch.backends.cudnn.deterministic = run.deterministic
    torch.backends.cudnn.benchmark = not run.deterministic


def _device(choice: str, local_rank: int = 0) -> torch.device:
    """run.device (auto, cpu, cuda) as this process's device; a UserError where the choice cannot be had."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("run.device = 'cuda' but torch sees no CUDA device (no GPU, driver or CUDA "
                        f"build; torch {torch.__version__}): use --run.device=cpu or auto", per_rank=True)
    if local_rank >= torch.cuda.device_count():
        raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) "
                        "visible: lower torchrun's --nproc_per_node", per_rank=True)
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def measurement_device(run: RunCfg) -> torch.device:
    """The device of a one-process measurement (fastres.tools.bench, the scaling model), with run's backend
    switches set: CUDA when torch sees one, unless run.device = "cpu"."""
    backends(run)
    return _device(run.device)


def cores() -> int:
    """The CPUs this process may run on (its affinity: taskset, cgroups' cpusets, SLURM's binding)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def busy_cores(sample_s: float = 0.2) -> float:
    """How many of this process's CPUs other programs kept busy over ``sample_s`` (/proc/stat, less this process's
    own CPU time); 0 where /proc/stat cannot be read."""
    def ticks() -> tuple[int, int]:
        busy = total = 0
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in mine:
                    t = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
                    total += sum(t)
                    busy += sum(t) - t[3] - t[4]
        return busy, total
    try:
        mine = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
        (b0, t0), own0 = ticks(), time.process_time()
        time.sleep(sample_s)
        (b1, t1), own1 = ticks(), time.process_time()
    except (OSError, ValueError):
        return 0.0
    if t1 <= t0:
        return 0.0
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = (b1 - b0 - (own1 - own0) * hz) / (t1 - t0) * len(mine)  # the share of ticks, in CPUs
    return max(0.0, busy)


def choose_threads(threads: int, loader_workers: int) -> str:
    """Set torch's intra-op threads as run.threads says (see its help); the start-up line saying the choice.
    OpenMP threads that wait at every parallel region for one another collapse when another program holds a core
    (a smoke run beside one busy process: 385 -> 131 img/s at 2 threads, 222 at 1; docs/speed.md)."""
    if threads:
        torch.set_num_threads(threads)
        return f"intra-op threads: {threads} (run.threads)"
    if os.environ.get("OMP_NUM_THREADS"):
        return f"intra-op threads: {torch.get_num_threads()} ($OMP_NUM_THREADS)"
    n, local = cores(), max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    share = max(1, n // local)
    siblings = (local - 1) * share  # the cores torchrun's other processes here take (busy or about to be)
    others = max(0, round(busy_cores()) - siblings)
    chosen = max(1, min(share - min(loader_workers, share), n - siblings - others))
    torch.set_num_threads(chosen)
    return (f"intra-op threads: {chosen} ({n} core(s) this process may use"
            + (f", {share} its share of {local} processes" if local > 1 else "")
            + f", {min(loader_workers, share)} for loader workers, {others} busy with other programs; "
            "run.threads sets it)")


def setup(run: RunCfg) -> Dist:
    """Set the backend switches, pick the device (run.device) and join the process group when launched by
    torchrun; a collective that waits longer than run.collective_timeout_s for another rank raises instead of
    hanging."""
    backends(run)
    world = env_world()
    rank, local_rank = env_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    dev = _device(run.device, local_rank)
    store = None
    if world > 1 and not torch.distributed.is_initialized():
        kw = {"device_id": dev} if dev.type == "cuda" else {}
        store = _store(rank, world)
        # torch's default is 30 min (10 for nccl); gloo applies it to every send/recv of a collective, nccl's
        # watchdog to each collective (and then ends the process)
        torch.distributed.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", store=store, rank=rank,
                                world_size=world, timeout=timedelta(seconds=run.collective_timeout_s), **kw)
    return Dist(rank=rank, local_rank=local_rank, world=world, device=dev, store=store,
                timeout_s=run.collective_timeout_s)


def single(device: torch.device) -> Dist:
    """One process on ``device``, outside any process group (benchmarks)."""
    return Dist(rank=0, local_rank=0, world=1, device=device)


def _store(rank: int, world: int) -> torch.distributed.Store:
    """The rendezvous store, with keys private to this restart attempt where the store outlives attempts.

    When torchrun's agent hosts the store (TORCHELASTIC_USE_AGENT_STORE, its default), the new process group after
    a restart (--max-restarts) would otherwise read the previous attempt's addresses from it and fail to connect
    ("Connection refused", pytorch/pytorch#167288): every key is prefixed with TORCHELASTIC_RESTART_COUNT. With
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (what a node joining a running group needs, docs/multinode.md) rank 0
    hosts a new store on a new port every round, and no prefix is needed: nor wanted, as a node that joins later
    counts its restarts from 0 while the others do not (pytorch/pytorch#135712), and the ranks would never meet.
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = torch.distributed.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"),
                                       int(os.environ.get("MASTER_PORT", "29500")), world_size=world,
                                       is_master=not agent_store and rank == 0, timeout=timedelta(minutes=10))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") if agent_store else "0"
    return torch.distributed.PrefixStore(f"fastres/attempt-{attempt}", store)


def teardown() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum or max) when distributed; a no-op otherwise."""
    if torch.distributed.is_initialized():
        reduce_op = torch.distributed.ReduceOp
        torch.distributed.all_reduce(t, op=reduce_op.SUM if op == "sum" else reduce_op.MAX)
    return t


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order ([obj] without a process group)."""
    if not torch.distributed.is_initialized():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


# What ranks may set apart: where this node keeps things and how it loads them, not what is trained.
RANKS_MAY_DIFFER = ("run.device", "run.threads", "run.sync_debug", "run.out_dir", "data.dir", "data.num_workers",
                    "log.every_steps")


def same_config(values: dict[str, Any]) -> None:
    """Every rank trains one recipe: the ranks' configs (config.to_dict) compared when the group forms; a UserError
    naming the keys that differ and the ranks that hold them. Without it, ranks started with another learning rate
    each train their own silently, another depth fails inside DDP, another epoch count hangs at the end."""
    every = all_gather_object(values)
    differ = sorted({key for other in every[1:] for key in config.diff(every[0], other, ignore=RANKS_MAY_DIFFER)})
    if not differ:
        return
    def value(cfg: dict[str, Any], key: str) -> Any:
        section, name = key.split(".", 1)
        return cfg.get(section, {}).get(name)
    parts = []
    for key in differ[:3]:
        ranks = [r for r, cfg in enumerate(every) if value(cfg, key) != value(every[0], key)]
        parts.append(f"{key} = {value(every[0], key)!r} on rank 0 but {value(every[ranks[0]], key)!r} on rank(s) "
                     + ", ".join(map(str, ranks[:8])) + (" ..." if len(ranks) > 8 else ""))
    more = f" (and {len(differ) - 3} more key(s))" if len(differ) > 3 else ""
    raise UserError(f"the ranks were started with different configs: {'; '.join(parts)}{more}: start every node "
                    "with the same config file and flags") from None


def agree(flags: list[int], device: torch.device) -> list[int]:
    """Each flag's maximum over the ranks (a host sync: call it rarely); ``flags`` itself without a group."""
    if not torch.distributed.is_initialized():
        return flags
    t = torch.tensor(flags, dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BN running statistics) so all evaluate the same network."""
    if torch.distributed.is_initialized():
        for b in model.buffers():
            torch.distributed.broadcast(b, src=0)


def broadcast_state(model: torch.nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (after an init computed on rank 0 alone)."""
    if torch.distributed.is_initialized():
        for t in list(model.parameters()) + list(model.buffers()):
            torch.distributed.broadcast(t.data, src=0)


# ----------------------------------------------------------------------------------------------------
# More than one node: a rank that stops answering, and a run directory that is not shared.

ROLL_CALL_S = 3.0  # how long a rank whose collective failed waits for the others to say they failed too
SHARED_TOKEN = ".fastres-shared"  # written by rank 0 in run.out_dir at start, read by every rank, then removed


def _collective_failure(e: BaseException) -> bool:
    """Is ``e`` a failed collective: torch's DistError (nccl, the store), or gloo's plain RuntimeError (a recv timed
    out, a peer's connection reset or closed), whose message names a gloo source file?"""
    return isinstance(e, torch.distributed.DistError) or (isinstance(e, RuntimeError) and "gloo/" in str(e))


def silent_ranks(dist: Dist, wait_s: float = ROLL_CALL_S) -> list[int] | None:
    """After a failed collective: the ranks that do not say within ``wait_s`` that theirs failed too (stopped, hung,
    or gone), through the attempt's store; None when the store itself is gone (its node died)."""
    try:
        dist.store.set(f"failed/{dist.rank}", "1")
        missing, end = [r for r in range(dist.world) if r != dist.rank], time.monotonic() + wait_s
        while missing and time.monotonic() < end:
            time.sleep(0.1)
            missing = [r for r in missing if not dist.store.check([f"failed/{r}"])]
        return missing
    except Exception:  # any store error: it is only a roll call
        return None


@contextmanager
def failures_named(dist: Dist) -> Iterator[None]:
    """Inside, a failed collective becomes one line naming the ranks that stopped answering (a UserError of this
    rank: each rank says what it saw), so torchrun's --max-restarts restarts the group from the last checkpoint."""
    try:
        yield
    except Exception as e:
        if dist.world == 1 or dist.store is None or not _collective_failure(e):
            raise
        silent = silent_ranks(dist)
        who = (f"rank {', '.join(map(str, silent))} stopped answering (hung, stopped or gone: its node's log says "
               "which)" if silent else "another rank failed")
        raise UserError(f"a collective failed or waited over run.collective_timeout_s = {dist.timeout_s:g} s on "
                        f"{socket.gethostname()}: {who}; torchrun --max-restarts=N restarts the group from the last "
                        f"checkpoint (docs/multinode.md) [{one_line(e, 160)}]", per_rank=True) from None


def check_shared_dir(out: Path, dist: Dist) -> None:
    """With several ranks, check every rank sees the run directory rank 0 writes: rank 0 writes a random token
    there, every rank reads it back. A rank that cannot raises a UserError of its own naming the directory (and the
    others one naming that rank), rather than training from another directory or waiting on a checkpoint it never
    sees."""
    if dist.world == 1 or not torch.distributed.is_initialized():
        return
    token, problem = uuid.uuid4().hex, None
    if dist.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / SHARED_TOKEN).write_text(token)
        except OSError as e:
            problem = f"cannot write to run.out_dir {out} ({e.strerror}): choose another --run.out_dir"
    box = [token, problem]
    torch.distributed.broadcast_object_list(box, src=0)  # rank 0's token, or why it could not write one
    if box[1]:
        raise UserError(box[1])
    try:
        seen = (out / SHARED_TOKEN).read_text() == box[0]
    except OSError:
        seen = False
    blind = [r for r, ok in enumerate(all_gather_object(seen)) if not ok]  # after every rank has read it
    if dist.is_main:
        (out / SHARED_TOKEN).unlink(missing_ok=True)
    if not seen:
        raise UserError(f"run.out_dir {out} on {socket.gethostname()} is not the directory rank 0 writes (its "
                        f"{SHARED_TOKEN} is not there): put the run directory on storage every node mounts at the "
                        "same path (NFS, Lustre, ...; docs/multinode.md)", per_rank=True)
    if blind:
        raise UserError(f"rank {', '.join(map(str, blind))} cannot see run.out_dir {out} as rank 0 writes it: put the "
                        "run directory on storage every node mounts at the same path (docs/multinode.md)")
