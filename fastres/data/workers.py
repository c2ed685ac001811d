"""The classic loader (the seed's baseline path): torch DataLoader, CPU worker processes, DistributedSampler.

Each worker crops, flips and normalizes single images on the CPU, like torchvision's
RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize; the main process collates and
copies the float batch to the device. Crop offsets and flips come from :mod:`fastres.data.order`, passed
with each index by the sampler, so the batches equal the gpu loader's whatever the worker count.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fastres.data.cifar import Split
from fastres.data.order import PAD, aug_params, epoch_indices, steps_per_epoch
from fastres.data.transform import normalize, to_batch


class _AugmentedSampler(Sampler):
    """Yields (index, dy, dx, flip) for this rank's share of the epoch."""

    def __init__(self, n: int, seed: int, rank: int, world: int, flip: str):
        self.n, self.seed, self.rank, self.world, self.flip, self.epoch = n, seed, rank, world, flip, 0
        self.skip = 0  # images of the epoch already trained on (a resumed epoch)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.n // self.world - self.skip

    def __iter__(self):
        dy, dx, flip = (t.tolist() for t in aug_params(self.n, self.seed, self.epoch, self.flip))
        for i in epoch_indices(self.n, self.seed, self.epoch, self.rank, self.world)[self.skip:].tolist():
            yield i, dy[i], dx[i], flip[i]


class _PaddedImages(Dataset):
    def __init__(self, split: Split):
        self.padded = np.pad(split.x, ((0, 0), (0, 0), (PAD, PAD), (PAD, PAD)))  # zero padding
        self.labels = split.y

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: tuple[int, int, int, int]) -> tuple[torch.Tensor, int]:
        i, dy, dx, flip = item
        img = self.padded[i, :, dy:dy + 32, dx:dx + 32]
        if flip:
            img = img[:, :, ::-1]
        return normalize(torch.from_numpy(np.ascontiguousarray(img))), int(self.labels[i])


class WorkersLoader:
    def __init__(self, split: Split, *, batch_per_rank: int, seed: int, rank: int, world: int,
                 device: torch.device, channels_last: bool, dtype: torch.dtype, num_workers: int,
                 flip: str = "random"):
        self.sampler = _AugmentedSampler(len(split), seed, rank, world, flip)
        self.n, self.b, self.world = len(split), batch_per_rank, world
        self.device, self.channels_last, self.dtype = device, channels_last, dtype
        self.loader = DataLoader(_PaddedImages(split), batch_size=batch_per_rank, sampler=self.sampler,
                                 num_workers=num_workers, pin_memory=device.type == "cuda", drop_last=True,
                                 persistent_workers=num_workers > 0,
                                 # its own generator: workers draw nothing random, and the global RNG
                                 # (dropout's) must not depend on when the worker pool starts
                                 generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return steps_per_epoch(self.n, self.b, self.world)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.sampler.set_epoch(epoch, start * self.b)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True)
            yield to_batch(x, self.dtype, self.channels_last), y.to(self.device, non_blocking=True)
