"""The GPU-resident loader (data.loader = gpu): the whole uint8 training set on the device, augmented with tensor ops.

From cifar10-airbench: the set is zero-padded by 4 pixels once, and at the start of each epoch the whole epoch is
augmented on the device in a few kernels per chunk of images (an index_select and a gather that takes every image's
32x32 crop at its own offset, mirrored where its flip bit is set, then the normalize and the cast), so a step
dispatches nothing: its batch is a view the epoch already made. On a CPU device it runs the same ops.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from fastres.data.base import Split, normalize, to_batch
from fastres.data.draws import PAD, aug_params, epoch_indices, steps_per_epoch

CHUNK = 4096  # images augmented per kernel group at an epoch's start


def crop_flip(padded: torch.Tensor, idx: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor,
              flip: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, 32+2P, 32+2P) -> (B, C, 32, 32): image idx[i] cropped at (dy[i], dx[i]), flipped if flip[i]."""
    n, c, hp, wp = padded.shape
    h, w = hp - 2 * PAD, wp - 2 * PAD
    ar_h = torch.arange(h, device=padded.device)
    ar_w = torch.arange(w, device=padded.device)
    rows = dy[:, None] + ar_h                                                 # (B, H)
    cols = dx[:, None] + torch.where(flip[:, None].bool(), w - 1 - ar_w, ar_w)  # (B, W)
    lin = (rows[:, :, None] * wp + cols[:, None, :]).view(len(idx), 1, h * w)
    imgs = padded.view(n, c, hp * wp).index_select(0, idx)
    return torch.gather(imgs, 2, lin.expand(-1, c, -1)).view(len(idx), c, h, w)


class GpuLoader:
    def __init__(self, split: Split, *, batch_per_rank: int, seed: int, rank: int, world: int,
                 device: torch.device, channels_last: bool, dtype: torch.dtype, flip: str = "random",
                 norm: tuple):
        x = torch.from_numpy(split.x).to(device)
        self.padded = F.pad(x, (PAD, PAD, PAD, PAD))  # zero padding, like the workers loader
        self.labels = torch.from_numpy(split.y).to(device)
        self.n, self.b, self.seed, self.rank, self.world = len(split), batch_per_rank, seed, rank, world
        self.device, self.channels_last, self.dtype = device, channels_last, dtype
        self.epoch, self.start, self.flip, self.norm = 0, 0, flip, norm
        self.image_shape = tuple(split.x.shape[1:])

    def __len__(self) -> int:
        return steps_per_epoch(self.n, self.b, self.world)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        b, start = self.b, self.start
        steps = len(self) - start  # the epoch from batch `start` on
        order = epoch_indices(self.n, self.seed, self.epoch, self.rank, self.world)[start * b:(start + steps) * b]
        order = order.to(self.device, non_blocking=True)
        params = aug_params(self.n, self.seed, self.epoch, self.flip)
        dy, dx, flip = (t.to(self.device, non_blocking=True) for t in params)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        images = torch.empty(steps * b, 3, 32, 32, dtype=self.dtype, device=self.device, memory_format=fmt)
        for i in range(0, steps * b, CHUNK):  # in chunks: the gather's int64 indices are 24 kB an image
            idx = order[i:i + CHUNK]
            images[i:i + CHUNK] = to_batch(normalize(crop_flip(self.padded, idx, dy[idx], dx[idx], flip[idx]),
                                                     *self.norm), self.dtype, self.channels_last)
        labels = self.labels[order]
        yield from zip(images.view(steps, b, 3, 32, 32).unbind(0), labels.view(steps, b).unbind(0))
