"""The GPU loaders (data.loader = gpu): CIFAR's whole uint8 training set resident on the device, augmented with tensor
ops; a folder's files decoded on the device (below).

From cifar10-airbench: the set is zero-padded by 4 pixels once, and at the start of each epoch the whole epoch is
augmented on the device in a few kernels per chunk of images (an index_select and a gather that takes every image's
32x32 crop at its own offset, mirrored where its flip bit is set, then the normalize and the cast), so a step
dispatches nothing: its batch is a view the epoch already made. On a CPU device it runs the same ops.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from fastres.data.base import Files, Split, normalize, to_batch
from fastres.data.draws import PAD, Resolution, aug_params, epoch_indices, folder_boxes, steps_per_epoch
from fastres.data.folder import crop_resize_tv, decode_rgb, decode_tv, file_bytes, import_torchvision

CHUNK = 4096  # images augmented per kernel group at an epoch's start


def crop_flip(padded: torch.Tensor, idx: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor,
              flip: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H+2P, W+2P) -> (B, C, H, W): image idx[i] cropped at (dy[i], dx[i]), flipped if flip[i]."""
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
        self.image_shapes = [tuple(split.x.shape[1:])]

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
        shape = self.image_shapes[0]  # (3, 32, 32) for CIFAR
        images = torch.empty(steps * b, *shape, dtype=self.dtype, device=self.device, memory_format=fmt)
        for i in range(0, steps * b, CHUNK):  # in chunks: the gather's int64 indices are 24 kB an image
            idx = order[i:i + CHUNK]
            images[i:i + CHUNK] = to_batch(normalize(crop_flip(self.padded, idx, dy[idx], dx[idx], flip[idx]),
                                                     *self.norm), self.dtype, self.channels_last)
        labels = self.labels[order]
        yield from zip(images.view(steps, b, *shape).unbind(0), labels.view(steps, b).unbind(0))


# ----------------------------------------------------------------------------------------------------
# The GPU loader over a folder: file bytes read by host threads, decoded on the device by torchvision's nvJPEG
# (torchvision.io.decode_jpeg with device="cuda", a batch at a time), each image's random-resized-crop box cut and
# resized there (torchvision's tensor resize: bilinear, antialiased), flipped, normalized. Files nvJPEG does not read
# (PNG, CMYK JPEGs), and every file on a CPU device, go through torchvision's CPU decoder on the host (Pillow's
# conversion for 16-bit images), then to the device. Boxes, flips and order are the other loaders' (draws.py).

JPEG_MAGIC = (0xFF, 0xD8)  # a JPEG file's first two bytes
PREFETCH = 2  # batches of file bytes read ahead by the host threads


class FolderGpuLoader:
    def __init__(self, files: Files, *, batch_per_rank: int, seed: int, rank: int, world: int, device: torch.device,
                 channels_last: bool, dtype: torch.dtype, num_threads: int, flip: str, norm: tuple,
                 resolution: Resolution, skip_bad: bool, augment: str = "rrc"):
        self.tv_io, _ = import_torchvision()  # here, in one line
        self.files, self.n, self.b, self.seed = files, len(files), batch_per_rank, seed
        self.rank, self.world = rank, world
        self.device, self.channels_last, self.dtype, self.flip, self.norm = device, channels_last, dtype, flip, norm
        self.resolution, self.augment, self.skip_bad, self.skipped = resolution, augment, skip_bad, set()
        self.image_shapes = [(3, side, side) for side in resolution.sides()]
        self.pool = ThreadPoolExecutor(max(1, num_threads))  # file reads: I/O
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return steps_per_epoch(self.n, self.b, self.world)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = epoch_indices(self.n, self.seed, self.epoch, self.rank, self.world).tolist()
        draws = folder_boxes(self.files.sizes, self.seed, self.epoch, self.flip, self.augment)
        boxes = list(zip(*(t.tolist() for t in draws)))
        side = self.resolution.at(self.epoch)
        batches = [order[k * self.b:(k + 1) * self.b] for k in range(self.start, len(self))]
        reads = [self.pool.submit(self._read, idx) for idx in batches[:PREFETCH]]
        for k, idx in enumerate(batches):
            if k + PREFETCH < len(batches):
                reads.append(self.pool.submit(self._read, batches[k + PREFETCH]))
            images = self._decode(idx, reads.pop(0).result())
            x = torch.stack([crop_resize_tv(img, boxes[i][:4], side, boxes[i][4]) for img, i in zip(images, idx)])
            yield (to_batch(normalize(x, *self.norm), self.dtype, self.channels_last),
                   torch.from_numpy(self.files.y[idx]).to(self.device, non_blocking=True))

    def _read(self, idx: list[int]) -> list[torch.Tensor]:
        return [file_bytes(self.files.root / self.files.paths[i]) for i in idx]

    def _decode(self, idx: list[int], data: list[torch.Tensor]) -> list[torch.Tensor]:
        """The batch's images as uint8 (3, H, W) on the device: nvJPEG's batch for the plain JPEGs on a GPU, the host
        decoder for the rest; a file neither decodes is named (DataError) or, with data.skip_bad, grey."""
        out: list[torch.Tensor | None] = [None] * len(idx)
        gpu = [j for j, i in enumerate(idx) if self.device.type == "cuda" and self.files.modes[i] in ("RGB", "L")
               and tuple(data[j][:2].tolist()) == JPEG_MAGIC]
        if gpu:
            try:
                decoded = self.tv_io.decode_jpeg([data[j] for j in gpu], mode=self.tv_io.ImageReadMode.RGB,
                                                 device=self.device)
                for j, x in zip(gpu, decoded):
                    out[j] = x
            except RuntimeError:  # one file nvJPEG refuses fails the batch: those go to the host decoder below
                pass
        for j, i in enumerate(idx):
            if out[j] is None:
                path = self.files.root / self.files.paths[i]
                x, ok = decode_tv(data[j], path, self.files.sizes[i])
                if not ok:
                    decode_rgb(path, skip_bad=self.skip_bad)  # raises its one line unless data.skip_bad
                    self.skipped.add(self.files.paths[i])
                out[j] = x.to(self.device, non_blocking=True)
        return out
