"""Data: ``load(cfg.data)`` gives the splits, ``build_loader(cfg.data, split, ...)`` the training batches.

Every loader keeps one contract (NVIDIA ConvNets' data backends do the same): per rank, ``len(loader)``
full batches per epoch of ``(images, labels)`` where images are normalized float (NCHW shape; channels_last
memory format when asked; dtype as asked) and labels int64, both on ``device``. ``set_epoch(e, start)`` picks the
epoch's order and augmentation (see :mod:`fastres.data.order`), so loaders agree image for image; the next
iteration then yields the epoch's batches from batch ``start`` on (a run resumed inside an epoch).
``data.source = "synthetic"`` feeds the same loaders random images of CIFAR-10's shape.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch

from fastres.config import DataCfg
from fastres.data import cifar
from fastres.data.cifar import Split
from fastres.data.dali import DaliLoader
from fastres.data.gpu import GpuLoader
from fastres.data.transform import stats
from fastres.data.workers import WorkersLoader
from fastres.errors import UserError


class Loader(Protocol):
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


def synthetic(seed: int = 0) -> cifar.Cifar10:
    """Random uint8 images and labels with CIFAR-10's shapes and sizes (50k train, 10k test), made in memory."""
    g = np.random.default_rng(seed)
    n_train, n_test = len(cifar.TRAIN_FILES) * cifar.PER_FILE, cifar.PER_FILE

    def part(n: int) -> Split:
        return Split(g.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8),
                     g.integers(0, cifar.NUM_CLASSES, n, dtype=np.int64))
    return cifar.Cifar10(train=part(n_train), test=part(n_test))


def fetch(cfg: DataCfg) -> None:
    """Download CIFAR-10 into data.dir unless it is there (call on one rank; the others wait)."""
    if cfg.source == "cifar10":
        cifar.ensure(cfg.dir)


def load(cfg: DataCfg) -> cifar.Cifar10:
    """The splits ``cfg`` names (train, test, and val when data.val_size); :func:`fetch` first."""
    data = synthetic(cfg.split_seed) if cfg.source == "synthetic" else cifar.load(cfg.dir)
    return cifar.split(data, val_size=cfg.val_size, split_seed=cfg.split_seed, subset=cfg.subset,
                       test_subset=cfg.test_subset)


def build_loader(cfg: DataCfg, split: Split, *, batch_per_rank: int, seed: int, rank: int, world: int,
                 device: torch.device, channels_last: bool = False,
                 dtype: torch.dtype = torch.float32) -> Loader:
    """The training loader named by ``cfg.loader`` over ``split``; ``batch_per_rank`` = global / world."""
    stats(device)  # made here, before any timed loop
    if (len(split) // world) // batch_per_rank == 0:
        raise UserError(f"{len(split)} training images make no full batch of {batch_per_rank} per rank on "
                        f"{world} rank(s): lower optim.batch_size or raise data.subset")
    common = dict(batch_per_rank=batch_per_rank, seed=seed, rank=rank, world=world, device=device,
                  channels_last=channels_last, dtype=dtype, flip=cfg.flip)
    if cfg.loader == "gpu":
        return GpuLoader(split, **common)
    if cfg.loader == "dali":  # the module imports nvidia.dali only when a DaliLoader is made
        return DaliLoader(split, num_threads=cfg.num_workers, source=cfg.dali_source, **common)
    if cfg.loader == "workers":
        return WorkersLoader(split, num_workers=cfg.num_workers, **common)
    raise UserError(f"data.loader = {cfg.loader!r} is not one of: workers, gpu, dali")
