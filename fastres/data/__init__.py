"""Data: ``build_loader(cfg.data, split, ...)`` returns an iterable of training batches on the device.

Every loader keeps one contract (NVIDIA ConvNets' data backends do the same): per rank, ``len(loader)``
full batches per epoch of ``(images, labels)`` where images are normalized float (NCHW shape; channels_last
memory format when asked; dtype as asked) and labels int64, both on ``device``. ``set_epoch(e)`` picks the
epoch's order and augmentation (see :mod:`fastres.data.order`), so loaders agree image for image.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Protocol

import torch

from fastres.config import DataCfg
from fastres.data.cifar import MEAN, STD, Split
from fastres.errors import UserError


class Loader(Protocol):
    def __len__(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@functools.cache
def _stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The channel mean and std on ``device``, made once: building them per batch copied host memory to the
    GPU every step, a host sync the first GPU run (sync_debug, tests/test_cuda.py) caught in the loop."""
    return (torch.tensor(MEAN, device=device).view(3, 1, 1), torch.tensor(STD, device=device).view(3, 1, 1))


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 standardized with the CIFAR-10 channel statistics."""
    mean, std = _stats(x.device)
    return (x.float().div_(255) - mean) / std


def to_batch(x: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """Cast a normalized NCHW batch to the dtype and memory format the model expects."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.to(dtype=dtype, memory_format=fmt)


def build_loader(cfg: DataCfg, split: Split, *, batch_per_rank: int, seed: int, rank: int, world: int,
                 device: torch.device, channels_last: bool = False,
                 dtype: torch.dtype = torch.float32) -> Loader:
    """The training loader named by ``cfg.loader`` over ``split``; ``batch_per_rank`` = global / world."""
    _stats(device)  # made here, before any timed loop
    if (len(split) // world) // batch_per_rank == 0:
        raise UserError(f"{len(split)} training images make no full batch of {batch_per_rank} per rank on "
                        f"{world} rank(s): lower optim.batch_size or raise data.subset")
    common = dict(batch_per_rank=batch_per_rank, seed=seed, rank=rank, world=world, device=device,
                  channels_last=channels_last, dtype=dtype, flip=cfg.flip)
    if cfg.loader == "gpu":
        from fastres.data.gpu import GpuLoader
        return GpuLoader(split, **common)
    if cfg.loader == "dali":
        from fastres.data.dali import DaliLoader  # DALI is imported only when chosen
        return DaliLoader(split, num_threads=cfg.num_workers, source=cfg.dali_source, **common)
    if cfg.loader == "workers":
        from fastres.data.workers import WorkersLoader
        return WorkersLoader(split, num_workers=cfg.num_workers, **common)
    raise UserError(f"data.loader = {cfg.loader!r} is not one of: workers, gpu, dali")
