"""The training loaders: ``build_loader(cfg.data, split, ...)`` -> this rank's batches, one contract for all.

Every loader keeps one contract (NVIDIA ConvNets' data backends do the same): per rank, ``len(loader)`` full
batches per epoch of ``(images, labels)`` where images are normalized float (NCHW, of a shape in ``image_shapes``:
one, or one per side of progressive resizing; channels_last memory format when asked; dtype as asked) and labels
int64, both on ``device``. ``set_epoch(e, start)`` picks the epoch's order, augmentation and side
(fastres/data/draws.py), so loaders agree image for image; the next iteration then yields the epoch's batches from
batch ``start`` on (a run resumed inside an epoch). The loader families, a file each: gpu (fastres/data/gpu.py),
workers (fastres/data/workers.py), dali (fastres/data/dali.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from fastres.config import DataCfg
from fastres.data.base import Files, Split, stats
from fastres.data.cifar import MEAN, STD
from fastres.data.dali import DaliLoader, FolderDaliLoader
from fastres.data.draws import Resolution
from fastres.data.gpu import FolderGpuLoader, GpuLoader
from fastres.data.workers import FolderWorkersLoader, WorkersLoader
from fastres.errors import UserError


class Loader(Protocol):
    image_shapes: list[tuple[int, int, int]]  # every (C, H, W) its images may have: what the step's warm-ups cover

    def __len__(self) -> int: ...
    def set_epoch(self, epoch: int, start: int = 0) -> None: ...
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def endless(loader: Loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's batches across epoch boundaries (epochs 0, 1, ...), as training would see them."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def build_loader(cfg: DataCfg, split: Split | Files, *, batch_per_rank: int, seed: int, rank: int, world: int,
                 device: torch.device, channels_last: bool = False, dtype: torch.dtype = torch.float32,
                 norm: tuple = (MEAN, STD)) -> Loader:
    """The training loader named by ``cfg.loader`` over ``split`` (a folder's :class:`Files` for data.source =
    folder); ``batch_per_rank`` = global / world; ``norm`` = the data's (mean, std)."""
    stats(device, *norm)  # made here, before any timed loop
    if (len(split) // world) // batch_per_rank == 0:
        raise UserError(f"{len(split)} training images make no full batch of {batch_per_rank} per rank on "
                        f"{world} rank(s): lower optim.batch_size or raise data.subset")
    common = dict(batch_per_rank=batch_per_rank, seed=seed, rank=rank, world=world, device=device,
                  channels_last=channels_last, dtype=dtype, flip=cfg.flip, norm=norm)
    if isinstance(split, Files):
        return _folder_loader(cfg, split, common)
    if cfg.loader == "gpu":
        return GpuLoader(split, **common)
    if cfg.loader == "dali":  # the module imports nvidia.dali only when a DaliLoader is made
        return DaliLoader(split, num_threads=cfg.num_workers, source=cfg.dali_source, **common)
    if cfg.loader == "workers":
        return WorkersLoader(split, num_workers=cfg.num_workers, **common)
    raise UserError(f"data.loader = {cfg.loader!r} is not one of: workers, gpu, dali")


def _folder_loader(cfg: DataCfg, files: Files, common: dict) -> Loader:
    folder = dict(resolution=Resolution.of(cfg), skip_bad=cfg.skip_bad, augment=cfg.augment, **common)
    if cfg.loader == "dali":
        return FolderDaliLoader(files, num_threads=cfg.num_workers, **folder)
    if cfg.loader == "gpu":
        return FolderGpuLoader(files, num_threads=cfg.num_workers, **folder)
    return FolderWorkersLoader(files, num_workers=cfg.num_workers, decoder=cfg.decoder, **folder)
