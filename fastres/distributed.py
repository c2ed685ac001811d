"""torchrun's environment -> a process group (nccl on CUDA, gloo on CPU), and the few collectives fastres uses.

As in nanoGPT: read RANK / LOCAL_RANK / WORLD_SIZE, which torchrun sets (and leaves unset for a plain
``python -m``). Multi-node runs need nothing more here: torchrun's rendezvous flags set the same variables
(see launch/multinode.sh).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from fastres.config import RunCfg
from fastres.errors import UserError


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world: int
    device: torch.device

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


def setup(run: RunCfg) -> Dist:
    """Set the backend switches, pick the device (run.device) and join the process group when launched by
    torchrun."""
    backends(run)
    world = env_world()
    rank, local_rank = env_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    dev = _device(run.device, local_rank)
    if world > 1 and not dist.is_initialized():
        kw = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", store=_store(rank, world),
                                rank=rank, world_size=world, **kw)
    return Dist(rank=rank, local_rank=local_rank, world=world, device=dev)


def single(device: torch.device) -> Dist:
    """One process on ``device``, outside any process group (benchmarks)."""
    return Dist(rank=0, local_rank=0, world=1, device=device)


def _store(rank: int, world: int) -> dist.Store:
    """The rendezvous store, with keys private to this restart attempt.

    After torchrun restarts its workers (--max-restarts), the new process group would otherwise read the
    previous attempt's addresses from torchrun's store and fail to connect ("Connection refused",
    pytorch/pytorch#167288). Prefixing every key with TORCHELASTIC_RESTART_COUNT keeps the attempts apart.
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent hosts it
    store = dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500")),
                          world_size=world, is_master=not agent_store and rank == 0,
                          timeout=timedelta(minutes=10))
    return dist.PrefixStore(f"fastres/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum or max) when distributed; a no-op otherwise."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order ([obj] without a process group)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def agree(flags: list[int], device: torch.device) -> list[int]:
    """Each flag's maximum over the ranks (a host sync: call it rarely); ``flags`` itself without a group."""
    if not dist.is_initialized():
        return flags
    t = torch.tensor(flags, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BN running statistics) so all evaluate the same network."""
    if dist.is_initialized():
        for b in model.buffers():
            dist.broadcast(b, src=0)


def broadcast_state(model: torch.nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (after an init computed on rank 0 alone)."""
    if dist.is_initialized():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)
