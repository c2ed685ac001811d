"""The workers loaders (data.loader = workers, the baseline's path): torch DataLoader, CPU worker processes.

CIFAR arrays: each worker crops, flips and normalizes single images on the CPU, like torchvision's
RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize; the main process collates and copies the
float batch to the device. Folders: each worker decodes a file (data.decoder: Pillow, or torchvision.io), crops its
random-resized-crop box and resizes it (bilinear with antialiasing: Pillow's, as torchvision's PIL path, or
torchvision's tensor resize), flips it, and writes it into its batch (a worker makes whole batches: one object per
batch, uint8 in shared memory); the main process normalizes the batch on the device. Crop offsets, boxes and flips
come from fastres/data/draws.py, passed with each index by the sampler, so the batches equal the other loaders'
whatever the worker count. A folder file that fails to decode stops the run naming it; with data.skip_bad it becomes
a grey image (GREY).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, get_worker_info

from fastres.data import folder
from fastres.data.base import Files, Split, normalize, to_batch
from fastres.data.draws import PAD, Resolution, aug_params, epoch_indices, folder_boxes, steps_per_epoch
from fastres.data.folder import crop_resize_pil, crop_resize_tv, decode_rgb, decode_tv, grey, import_torchvision


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
    def __init__(self, split: Split, norm: tuple):
        self.padded = np.pad(split.x, ((0, 0), (0, 0), (PAD, PAD), (PAD, PAD)))  # zero padding
        self.labels, self.norm = split.y, norm

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: tuple[int, int, int, int]) -> tuple[torch.Tensor, int]:
        i, dy, dx, flip = item
        side = self.padded.shape[-1] - 2 * PAD  # 32 for CIFAR; synthetic images may be larger
        img = self.padded[i, :, dy:dy + side, dx:dx + side]
        if flip:
            img = img[:, :, ::-1]
        return normalize(torch.from_numpy(np.ascontiguousarray(img)), *self.norm), int(self.labels[i])


class WorkersLoader:
    def __init__(self, split: Split, *, batch_per_rank: int, seed: int, rank: int, world: int,
                 device: torch.device, channels_last: bool, dtype: torch.dtype, num_workers: int,
                 flip: str = "random", norm: tuple):
        self.sampler = _AugmentedSampler(len(split), seed, rank, world, flip)
        self.n, self.b, self.world, self.image_shapes = len(split), batch_per_rank, world, [tuple(split.x.shape[1:])]
        self.device, self.channels_last, self.dtype = device, channels_last, dtype
        self.loader = DataLoader(_PaddedImages(split, norm), batch_size=batch_per_rank, sampler=self.sampler,
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


class _BoxSampler(Sampler):
    """Yields (index, top, left, height, width, flip, side) for this rank's share of the epoch: the side of the
    epoch's images travels with each index, so persistent workers follow progressive resizing."""

    def __init__(self, files: Files, seed: int, rank: int, world: int, flip: str, resolution: Resolution,
                 augment: str):
        self.files, self.seed, self.rank, self.world, self.flip = files, seed, rank, world, flip
        self.resolution, self.augment, self.epoch, self.skip = resolution, augment, 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return len(self.files) // self.world - self.skip

    def __iter__(self):
        boxes = [t.tolist() for t in folder_boxes(self.files.sizes, self.seed, self.epoch, self.flip, self.augment)]
        side = self.resolution.at(self.epoch)
        for i in epoch_indices(len(self.files), self.seed, self.epoch, self.rank, self.world)[self.skip:].tolist():
            yield (i, *(b[i] for b in boxes), side)


class _FolderBatches(Dataset):
    """A whole batch per call (BatchSampler's list of _BoxSampler items): each image decoded, its box cropped and
    resized, flipped while it is copied into one uint8 (B, side, side, 3) tensor that the worker allocates in shared
    memory, so a batch crosses to the main process as one object with no further copy. The bytes stay in the
    decoders' height-width-channel order: the main process views them as NCHW in channels_last strides."""

    def __init__(self, files: Files, decoder: str):
        self.files, self.decoder = files, decoder

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, items: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        side = items[0][-1]
        x = _shared_uint8((len(items), side, side, 3))
        out = x.numpy()
        y = torch.from_numpy(self.files.y[[item[0] for item in items]].astype(np.int64))
        bad = torch.full((len(items),), -1, dtype=torch.int64)  # the main process names a bad file: no traceback
        for k, (i, top, left, h, w, flip, _) in enumerate(items):
            img, ok = self._crop(i, (top, left, h, w), side)
            out[k] = img[:, ::-1] if flip else img  # the flip is the copy's direction: no extra pass
            if not ok:
                bad[k] = i
        return x, y, bad

    def _crop(self, i: int, box: tuple[int, int, int, int], side: int) -> tuple[np.ndarray, bool]:
        path = self.files.root / self.files.paths[i]
        if self.decoder == "torchvision":
            x, ok = decode_tv(folder.file_bytes(path), path, self.files.sizes[i])
            return crop_resize_tv(x, box, side, 0).permute(1, 2, 0).numpy(), ok
        img = decode_rgb(path, skip_bad=True)
        ok = img is not None
        if not ok:  # data.skip_bad's stand-in (without it the main process stops the run)
            img = grey(self.files.sizes[i])
        return crop_resize_pil(img, box, side), ok


def _shared_uint8(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialized uint8 tensor, in shared memory inside a loader worker (what default_collate does)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(math.prod(shape))).view(shape)


class FolderWorkersLoader:
    def __init__(self, files: Files, *, batch_per_rank: int, seed: int, rank: int, world: int, device: torch.device,
                 channels_last: bool, dtype: torch.dtype, num_workers: int, flip: str, norm: tuple,
                 resolution: Resolution, skip_bad: bool, augment: str = "rrc", decoder: str = "pil"):
        if decoder == "torchvision":
            import_torchvision()  # here, in one line, rather than in a worker's traceback
        self.sampler = _BoxSampler(files, seed, rank, world, flip, resolution, augment)
        self.files, self.n, self.b, self.world = files, len(files), batch_per_rank, world
        self.image_shapes = [(3, side, side) for side in resolution.sides()]
        self.device, self.channels_last, self.dtype, self.norm = device, channels_last, dtype, norm
        self.skip_bad, self.skipped = skip_bad, set()
        self.loader = DataLoader(_FolderBatches(files, decoder), batch_size=None,  # batches made by the workers
                                 sampler=BatchSampler(self.sampler, batch_per_rank, drop_last=True),
                                 num_workers=num_workers, pin_memory=device.type == "cuda",
                                 persistent_workers=num_workers > 0,
                                 generator=torch.Generator().manual_seed(seed))  # as WorkersLoader: draws nothing

    def __len__(self) -> int:
        return steps_per_epoch(self.n, self.b, self.world)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.sampler.set_epoch(epoch, start * self.b)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y, bad in self.loader:
            if (bad >= 0).any():  # a CPU tensor: no device sync
                for i in bad[bad >= 0].tolist():
                    decode_rgb(self.files.root / self.files.paths[i], skip_bad=self.skip_bad)  # the one line
                    self.skipped.add(self.files.paths[i])
            x = normalize(x.permute(0, 3, 1, 2).to(self.device, non_blocking=True), *self.norm)  # uint8 over the bus
            yield to_batch(x, self.dtype, self.channels_last), y.to(self.device, non_blocking=True)
