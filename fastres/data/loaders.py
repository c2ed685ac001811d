"""The training loaders: ``build_loader(cfg.data, split, ...)`` -> this rank's batches, one contract for all.

Every loader keeps one contract (NVIDIA ConvNets' data backends do the same): per rank, ``len(loader)``
full batches per epoch of ``(images, labels)`` where images are normalized float (NCHW shape; channels_last
memory format when asked; dtype as asked) and labels int64, both on ``device``. ``set_epoch(e, start)`` picks the
epoch's order and augmentation, so loaders agree image for image; the next iteration then yields the epoch's
batches from batch ``start`` on (a run resumed inside an epoch). The three loaders (gpu, workers, dali) sit
below the order and augmentation draws they share.

Which training images each rank sees each epoch, in which order, and how each is augmented:
- order: torch's DistributedSampler's order (seeded per epoch with seed + epoch, drop_last): rank r takes every
  W-th image of one permutation, so the global batch k is the same set of images for any world size W.
- augmentation: pad-4 random crop offsets and a flip bit per image index, drawn per epoch from
  (seed, epoch). They depend on the image, not on the rank or worker that loads it. data.flip = "alternate"
  changes only the flip bits (see :func:`aug_params`).
Batches are full: the epoch has floor(floor(N / W) / per_rank_batch) = floor(N / global_batch) steps.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from fastres import rng
from fastres.config import FLIPS, DataCfg
from fastres.data import GREY, MEAN, STD, DataError, Files, Split, decode_rgb, normalize, stats, to_batch
from fastres.errors import UserError, one_line

PAD = 4  # pixels of zero padding before the random 32x32 crop (He 2015, sec. 4.2)


def epoch_indices(n: int, seed: int, epoch: int, rank: int, world: int) -> torch.Tensor:
    """Image indices rank ``rank`` of ``world`` visits in ``epoch`` (disjoint across ranks), int64 on the CPU.

    Exactly ``list(DistributedSampler(range(n), world, rank, shuffle=True, seed=seed, drop_last=True))`` after
    ``set_epoch(epoch)`` (tested), computed with tensor ops: the sampler's Python list of 50k indices is host
    time at the start of every timed epoch, with the GPU idle.
    """
    g = torch.Generator()
    g.manual_seed(seed + epoch)  # DistributedSampler's seeding
    total = (n // world) * world  # drop_last: the tail that does not split evenly is left out
    return torch.randperm(n, generator=g)[:total][rank::world].clone()


def steps_per_epoch(n: int, batch_per_rank: int, world: int) -> int:
    return (n // world) // batch_per_rank


def aug_params(n: int, seed: int, epoch: int, flip: str = "random") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: crop row offset, crop column offset (0..2*PAD) and horizontal flip (0/1), int64 on the CPU.

    ``flip = "random"``: each image is mirrored with probability 1/2, drawn anew every epoch (He 2015).
    ``flip = "alternate"``: epoch 0 draws the same bits; every later epoch mirrors exactly the images the
    epoch before did not, so each image is seen mirrored every other epoch instead of at random
    (alternating flip: K. Jordan, "94% on CIFAR-10 in 3.29 Seconds on a Single GPU", 2024, sec. 3.6;
    cifar10-airbench). The crop offsets are the same under both.
    """
    if flip not in FLIPS:
        raise ValueError(f"flip must be one of {FLIPS}, got {flip!r}")
    g = rng.generator(seed, rng.AUGMENT, epoch)
    dy = torch.randint(0, 2 * PAD + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * PAD + 1, (n,), generator=g)
    bits = torch.randint(0, 2, (n,), generator=g)
    if flip == "alternate" and epoch > 0:
        bits = aug_params(n, seed, 0)[2] ^ (epoch % 2)
    return dy, dx, bits


# Folders: torchvision's RandomResizedCrop boxes, drawn per (seed, epoch, image) like the crop offsets above.

RRC_SCALE = (0.08, 1.0)  # fraction of the image's area (torchvision's RandomResizedCrop defaults; Szegedy 2015)
RRC_RATIO = (3 / 4, 4 / 3)  # aspect ratio w / h, drawn log-uniformly
RRC_TRIES = 10  # torchvision's attempts before its centre-crop fallback


def crop_boxes(sizes: np.ndarray, seed: int, epoch: int, flip: str = "random") -> tuple[torch.Tensor, ...]:
    """Per image of (width, height) ``sizes``: crop top, left, height, width and flip bit, int64 on the CPU.

    torchvision's RandomResizedCrop.get_params for every image at once: up to 10 tries of an area fraction in
    RRC_SCALE and a log-uniform ratio in RRC_RATIO, rounded; the first that fits is placed uniformly; none fitting,
    the largest centred crop of a clamped ratio. ``flip`` as :func:`aug_params` (alternate: epoch 0's bits inverted
    every other epoch)."""
    g = rng.generator(seed, rng.AUGMENT, epoch)
    n = len(sizes)
    wi = torch.as_tensor(sizes[:, 0], dtype=torch.float64)[:, None]
    hi = torch.as_tensor(sizes[:, 1], dtype=torch.float64)[:, None]
    area = wi * hi * (RRC_SCALE[0] + (RRC_SCALE[1] - RRC_SCALE[0]) * torch.rand(n, RRC_TRIES, generator=g,
                                                                               dtype=torch.float64))
    lo, hi_r = np.log(RRC_RATIO[0]), np.log(RRC_RATIO[1])
    ratio = torch.exp(lo + (hi_r - lo) * torch.rand(n, RRC_TRIES, generator=g, dtype=torch.float64))
    w, h = torch.round(torch.sqrt(area * ratio)), torch.round(torch.sqrt(area / ratio))
    fits = (w > 0) & (h > 0) & (w <= wi) & (h <= hi)
    first = fits.to(torch.int8).argmax(1, keepdim=True)
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(1)
    wi, hi = wi[:, 0], hi[:, 0]
    # the fallback: the whole image where its ratio is in range, else the ratio clamped to the range's end
    in_ratio = wi / hi
    fw = torch.where(in_ratio > RRC_RATIO[1], torch.round(hi * RRC_RATIO[1]), wi)
    fh = torch.where(in_ratio < RRC_RATIO[0], torch.round(wi / RRC_RATIO[0]), hi)
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    uy, ux = torch.rand(n, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64)
    top = torch.where(found, torch.floor(uy * (hi - h + 1)), torch.floor((hi - h) / 2))
    left = torch.where(found, torch.floor(ux * (wi - w + 1)), torch.floor((wi - w) / 2))
    bits = torch.randint(0, 2, (n,), generator=g)
    if flip == "alternate" and epoch > 0:
        bits = crop_boxes(sizes, seed, 0)[4] ^ (epoch % 2)
    return top.long(), left.long(), h.long(), w.long(), bits


# ----------------------------------------------------------------------------------------------------
# The GPU-resident loader: the whole uint8 training set on the device, augmented with tensor ops.
#
# From cifar10-airbench: the set is zero-padded by 4 pixels once, and at the start of each epoch the whole
# epoch is augmented on the device in a few kernels per chunk of images (an index_select and a gather that takes
# every image's 32x32 crop at its own offset, mirrored where its flip bit is set, then the normalize and the cast),
# so a step dispatches nothing: its batch is a view the epoch already made. On a CPU device it runs the same ops.

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
                 norm: tuple = (MEAN, STD)):
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


# ----------------------------------------------------------------------------------------------------
# The classic loader (the baseline's path): torch DataLoader, CPU worker processes, DistributedSampler.
#
# Each worker crops, flips and normalizes single images on the CPU, like torchvision's
# RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize; the main process collates and
# copies the float batch to the device. Crop offsets and flips come from the order and augmentation draws above, passed
# with each index by the sampler, so the batches equal the gpu loader's whatever the worker count.

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
        img = self.padded[i, :, dy:dy + 32, dx:dx + 32]
        if flip:
            img = img[:, :, ::-1]
        return normalize(torch.from_numpy(np.ascontiguousarray(img)), *self.norm), int(self.labels[i])


class WorkersLoader:
    def __init__(self, split: Split, *, batch_per_rank: int, seed: int, rank: int, world: int,
                 device: torch.device, channels_last: bool, dtype: torch.dtype, num_workers: int,
                 flip: str = "random", norm: tuple = (MEAN, STD)):
        self.sampler = _AugmentedSampler(len(split), seed, rank, world, flip)
        self.n, self.b, self.world, self.image_shape = len(split), batch_per_rank, world, tuple(split.x.shape[1:])
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


# ----------------------------------------------------------------------------------------------------
# The DALI loader: NVIDIA DALI does the pad-crop, flip and normalize, on the GPU (on the CPU without one).
#
# Imported only when ``data.loader = "dali"``. The pipeline (one per process, on its LOCAL_RANK device):
#
#     fn.external_source  -> uint8 HWC images, zero-padded to 40x40, in this rank's order for the epoch
#                            + per image: crop position x and y, mirror flag; + int64 labels
#     fn.crop_mirror_normalize (device="gpu")  -> 32x32 crop at the image's offset, mirrored if its flag is
#                            set, (x - 255*mean) / (255*std), NCHW (NHWC when channels_last), fp32 or fp16
#
# Order and augmentation come from the order and augmentation draws above, so batches are the gpu loader's images (up to
# float rounding in the normalize): disjoint, complete shards with the same number of full batches on every
# rank, no duplicates, whatever DALI's prefetching does. Images reach the pipeline one of two ways
# (``data.dali_source``): "host" gathers each batch from a uint8 array in host memory (DALI copies it to the
# GPU); "device" keeps the padded set on the GPU as a torch tensor, gathers there and hands the batch to
# DALI zero-copy through __cuda_array_interface__ / DLPack. ``fastres.tools.bench --what loaders`` measures both.
#
# DALI has no bfloat16: with precision.amp = "bf16" the pipeline writes fp16 and torch casts it (exact for
# the normalized range up to bf16's own rounding).

INSTALL = "pip install nvidia-dali-cuda130  (or: pip install -e '.[dali]'; the bare 'nvidia-dali' is a placeholder)"


def import_dali():
    """(dali.fn, dali.types, pipeline_def, DALIGenericIterator); UserError with the pip command if absent."""
    try:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator
    except ImportError as e:
        raise UserError(f"data.loader = 'dali' but NVIDIA DALI does not import ({e}): {INSTALL}") from None
    return fn, types, pipeline_def, DALIGenericIterator


_FORK_HOOK: list[bool] = []
_ORPHANS: list[object] = []


def _disown_pipelines_in_child() -> None:
    """A forked child (a DataLoader worker, say) inherits DALI pipelines but not their threads: shutting
    one down there hangs or aborts the child. The child keeps the native objects referenced, never to be
    destroyed (multiprocessing children leave through os._exit), and the Python side forgets them."""
    from nvidia.dali.pipeline import Pipeline
    for ref in list(getattr(Pipeline, "_pipes", ())):
        pipe = ref()
        if pipe is not None and getattr(pipe, "_pipe", None) is not None:
            _ORPHANS.append(pipe._pipe)
            pipe._pipe = None


class _EpochSource:
    """external_source callbacks: batch ``info.iteration`` of epoch ``base_epoch + info.epoch_idx``.

    The epoch comes from DALI's own counter, not from set_epoch, so batches DALI prefetches ahead of the
    training loop still belong to the right epoch.
    """

    def __init__(self, loader: DaliLoader, base_epoch: int, start: int = 0):
        self.loader, self.base_epoch, self.start, self.cached = loader, base_epoch, start, None

    def _epoch(self, epoch: int):
        if self.cached is None or self.cached[0] != epoch:
            ld = self.loader
            order = epoch_indices(ld.n, ld.seed, epoch, ld.rank, ld.world).numpy()
            dy, dx, flip = (t.numpy() for t in aug_params(ld.n, ld.seed, epoch, ld.flip))
            # crop_mirror_normalize puts the window at pos * (40 - 32): pos = offset / 8 is exact in fp32
            pos_x = (dx / (2 * PAD)).astype(np.float32)
            pos_y = (dy / (2 * PAD)).astype(np.float32)
            order_dev = torch.from_numpy(order).to(ld.device) if ld.images_dev is not None else None
            self.cached = (epoch, order, order_dev, pos_x, pos_y, flip.astype(np.int32))
        return self.cached

    def _slice(self, info):
        k = info.iteration + (self.start if info.epoch_idx == 0 else 0)  # the first epoch may resume at `start`
        if k >= len(self.loader):
            raise StopIteration
        b = self.loader.b
        return self._epoch(self.base_epoch + info.epoch_idx), slice(k * b, (k + 1) * b)

    def images(self, info):
        (_, order, order_dev, *_), sl = self._slice(info)
        if self.loader.images_dev is not None:
            batch = self.loader.images_dev.index_select(0, order_dev[sl])  # gathered on the device
            return batch if self.loader.gpu else batch.numpy()  # (DALI takes CPU data as numpy)
        return np.take(self.loader.images_host, order[sl], axis=0)

    def params(self, info):
        (_, order, _, pos_x, pos_y, mirror), sl = self._slice(info)
        idx = order[sl]
        return pos_x[idx], pos_y[idx], mirror[idx], self.loader.labels[idx]


class DaliLoader:
    def __init__(self, split: Split, *, batch_per_rank: int, seed: int, rank: int, world: int,
                 device: torch.device, channels_last: bool, dtype: torch.dtype, num_threads: int = 4,
                 source: str = "host", flip: str = "random", norm: tuple = (MEAN, STD)):
        self._setup_dali()
        self.n, self.b, self.seed, self.rank, self.world = len(split), batch_per_rank, seed, rank, world
        self.device, self.channels_last, self.dtype, self.flip = device, channels_last, dtype, flip
        self.num_threads, self.norm, self.image_shape = max(1, num_threads), norm, tuple(split.x.shape[1:])
        self.gpu = device.type == "cuda"
        padded = np.pad(split.x, ((0, 0), (0, 0), (PAD, PAD), (PAD, PAD))).transpose(0, 2, 3, 1)  # N,40,40,3
        padded = np.ascontiguousarray(padded)
        self.labels = split.y.astype(np.int64)
        self.images_dev = torch.from_numpy(padded).to(device) if source == "device" else None
        self.images_host = padded if source == "host" else None
        self.epoch, self.start = 0, 0
        self._build(0)

    def __len__(self) -> int:
        return steps_per_epoch(self.n, self.b, self.world)

    def _build(self, base_epoch: int, start: int = 0) -> None:
        fn, gpu = self.fn, self.gpu
        src = _EpochSource(self, base_epoch, start)

        on_device = gpu and self.images_dev is not None
        # the batch is gathered on torch's current stream: DALI copies it on that stream too, in order, instead of
        # blocking the host until the gather is done (external_source's cuda_stream)
        stream = {"cuda_stream": torch.cuda.current_stream(self.device)} if on_device else {}

        @self._pipeline_def()
        def pipeline():
            images = fn.external_source(source=src.images, batch=True, batch_info=True, layout="HWC",
                                        device="gpu" if on_device else "cpu", **stream)
            pos_x, pos_y, mirror, labels = fn.external_source(source=src.params, num_outputs=4, batch=True,
                                                              batch_info=True)
            if gpu and not on_device:
                images = images.gpu()
            out = self._normalized(images, mirror, crop=(32, 32), crop_pos_x=pos_x, crop_pos_y=pos_y)
            return out, labels.gpu() if gpu else labels

        self._start(pipeline(), base_epoch)

    def _setup_dali(self) -> None:
        """DALI's modules; once a process, the fork hook that keeps a forked child off the parent's pipelines."""
        self.fn, self.types, self.pipeline_def, self.Iterator = import_dali()
        if not _FORK_HOOK:
            os.register_at_fork(after_in_child=_disown_pipelines_in_child)
            _FORK_HOOK.append(True)

    def _pipeline_def(self):
        """The decorator of this loader's pipelines: its batch, threads and device, two batches prefetched."""
        return self.pipeline_def(batch_size=self.b, num_threads=self.num_threads,
                                 device_id=self.device.index if self.gpu else None, prefetch_queue_depth=2)

    def _normalized(self, images, mirror, **crop):
        """The pipeline's last op, both loaders': mirror, (crop,) normalize by data's mean and std, in the
        loader's dtype and layout, on the device."""
        types, fp16 = self.types, self.dtype in (torch.float16, torch.bfloat16)
        return self.fn.crop_mirror_normalize(
            images, device="gpu" if self.gpu else "cpu", mirror=mirror, mean=[255 * m for m in self.norm[0]],
            std=[255 * s for s in self.norm[1]], dtype=types.FLOAT16 if fp16 else types.FLOAT,
            output_layout="HWC" if self.channels_last else "CHW", **crop)

    def _start(self, pipe, base_epoch: int) -> None:
        """Build the pipeline (outputs: images, labels) and iterate it; it starts at epoch ``base_epoch``."""
        pipe.build()
        self.iterator = self.Iterator(pipe, ["images", "labels"], auto_reset=False, prepare_first_batch=False)
        self.pipe_epoch, self.needs_reset = base_epoch, False

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.pipe_epoch != self.epoch or self.start:  # first use after a jump (resume) or a partly read epoch
            self._build(self.epoch, self.start)
        elif self.needs_reset:  # here, not at the end of the last epoch: its prefetch is then training time
            self.iterator.reset()
        self.pipe_epoch, self.needs_reset = None, True
        for batch in self.iterator:
            x, y = batch[0]["images"], batch[0]["labels"]
            if self.channels_last:
                x = x.permute(0, 3, 1, 2)  # NHWC storage seen as NCHW: the channels_last layout
            yield (x if x.dtype == self.dtype else x.to(self.dtype)), y
        self.pipe_epoch = self.epoch + 1  # where DALI's own epoch counter now stands


# ----------------------------------------------------------------------------------------------------
# Folder loaders: files decoded every epoch, random-resized-crop to data.image_size, flip, normalize.
#
# Both draw the boxes and flips of :func:`crop_boxes` for the image at hand, in the epoch order of
# :func:`epoch_indices`, so they agree image for image up to the decoders' and resizers' rounding (measured in
# tests/test_folder.py). "workers": DataLoader processes decode with Pillow, crop and resize (bilinear, with
# Pillow's antialiasing: torchvision's PIL path) and hand uint8 images over; the main process normalizes them on the
# device. "dali": file bytes through an external source, fn.decoders.image (device "mixed": nvJPEG on the GPU;
# "cpu" without one), fn.resize of the box (linear, antialiased), fn.crop_mirror_normalize.
# A file that fails to decode stops the run naming it; with data.skip_bad it becomes a grey image (GREY) in both.


class _BoxSampler(Sampler):
    """Yields (index, top, left, height, width, flip) for this rank's share of the epoch."""

    def __init__(self, files: Files, seed: int, rank: int, world: int, flip: str):
        self.files, self.seed, self.rank, self.world, self.flip = files, seed, rank, world, flip
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return len(self.files) // self.world - self.skip

    def __iter__(self):
        boxes = [t.tolist() for t in crop_boxes(self.files.sizes, self.seed, self.epoch, self.flip)]
        for i in epoch_indices(len(self.files), self.seed, self.epoch, self.rank, self.world)[self.skip:].tolist():
            yield (i, *(b[i] for b in boxes))


class _FolderImages(Dataset):
    def __init__(self, files: Files, size: int, skip_bad: bool):
        self.files, self.size, self.skip_bad = files, size, skip_bad

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, ...]) -> tuple[torch.Tensor, int, int]:
        i, top, left, h, w, flip = item
        img = decode_rgb(self.files.root / self.files.paths[i], skip_bad=True)
        ok = img is not None
        if not ok:  # data.skip_bad's stand-in (without it the main process stops the run)
            img = Image.new("RGB", tuple(int(v) for v in self.files.sizes[i]), (GREY,) * 3)
        img = img.crop((left, top, left + w, top + h)).resize((self.size, self.size), Image.BILINEAR)
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy())
        return x, int(self.files.y[i]), i if not ok else -1  # the main process names a bad file: no traceback


class FolderWorkersLoader:
    def __init__(self, files: Files, *, batch_per_rank: int, seed: int, rank: int, world: int, device: torch.device,
                 channels_last: bool, dtype: torch.dtype, num_workers: int, flip: str, norm: tuple, image_size: int,
                 skip_bad: bool):
        self.sampler = _BoxSampler(files, seed, rank, world, flip)
        self.files, self.n, self.b, self.world = files, len(files), batch_per_rank, world
        self.image_shape = (3, image_size, image_size)
        self.device, self.channels_last, self.dtype, self.norm = device, channels_last, dtype, norm
        self.skip_bad, self.skipped = skip_bad, set()
        self.loader = DataLoader(_FolderImages(files, image_size, skip_bad), batch_size=batch_per_rank,
                                 sampler=self.sampler, num_workers=num_workers, pin_memory=device.type == "cuda",
                                 drop_last=True, persistent_workers=num_workers > 0,
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
            x = normalize(x.to(self.device, non_blocking=True), *self.norm)
            yield to_batch(x, self.dtype, self.channels_last), y.to(self.device, non_blocking=True)


def _file_bytes(path: Path, mode: str, grey: tuple[int, int] | None) -> np.ndarray:
    """What the DALI decoder reads for one file: its bytes; re-encoded losslessly by Pillow when its mode is not
    RGB or L (CMYK, palette, alpha: Pillow's conversion, as the workers loader); for a known bad file a grey PNG
    of its size ``grey`` (so its crop box fits)."""
    if grey is None and mode in ("RGB", "L"):
        return np.fromfile(path, dtype=np.uint8)
    img = decode_rgb(path) if grey is None else Image.new("RGB", (int(grey[0]), int(grey[1])), (GREY,) * 3)
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)
    return np.frombuffer(buf.getvalue(), np.uint8)


class _FolderEpochSource(_EpochSource):
    """external_source callbacks of the folder DALI loader: file bytes, then boxes (relative), mirror and labels."""

    def _epoch(self, epoch: int):
        if self.cached is None or self.cached[0] != epoch:
            ld = self.loader
            order = epoch_indices(ld.n, ld.seed, epoch, ld.rank, ld.world).numpy()
            top, left, h, w, flip = (t.numpy() for t in crop_boxes(ld.files.sizes, ld.seed, epoch, ld.flip))
            anchor = np.stack([top, left], 1).astype(np.float32)  # pixels, (y, x): axis_names = "HW"
            shape = np.stack([h, w], 1).astype(np.float32)
            self.cached = (epoch, order, anchor, shape, flip.astype(np.int32))
        return self.cached

    def images(self, info):
        (_, order, *_), sl = self._slice(info)
        ld = self.loader
        args = [(ld.files.root / ld.files.paths[i], ld.files.modes[i],
                 tuple(ld.files.sizes[i]) if ld.files.paths[i] in ld.skipped else None) for i in order[sl]]
        return list(ld.pool.map(lambda a: _file_bytes(*a), args))

    def params(self, info):
        (_, order, anchor, shape, mirror), sl = self._slice(info)
        idx = order[sl]
        return anchor[idx], shape[idx], mirror[idx], self.loader.files.y[idx]


def _dali_reason(e: Exception) -> str:
    """The line of a DALI pipeline error that says what went wrong (it follows "encountered:")."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    after = [b for a, b in zip(lines, lines[1:]) if a == "encountered:"]
    return one_line(after[0] if after else lines[-1] if lines else e, 200)


class FolderDaliLoader(DaliLoader):
    """The DALI loader over files (see the section's comment); set_epoch / __iter__ / resume as DaliLoader's."""

    def __init__(self, files: Files, *, batch_per_rank: int, seed: int, rank: int, world: int, device: torch.device,
                 channels_last: bool, dtype: torch.dtype, num_threads: int, flip: str, norm: tuple, image_size: int,
                 skip_bad: bool):
        self._setup_dali()
        self.files, self.n, self.b, self.seed = files, len(files), batch_per_rank, seed
        self.rank, self.world = rank, world
        self.device, self.channels_last, self.dtype, self.flip, self.norm = device, channels_last, dtype, flip, norm
        self.num_threads, self.size, self.skip_bad, self.skipped = max(1, num_threads), image_size, skip_bad, set()
        self.image_shape = (3, image_size, image_size)
        self.gpu = device.type == "cuda"
        self.pool = ThreadPoolExecutor(self.num_threads)  # file reads: I/O, outside DALI's own threads
        self.epoch, self.start = 0, 0
        self._build(0)

    def _build(self, base_epoch: int, start: int = 0) -> None:
        fn, types, gpu = self.fn, self.types, self.gpu
        src = _FolderEpochSource(self, base_epoch, start)
        self.first_batch = start

        @self._pipeline_def()
        def pipeline():
            data = fn.external_source(source=src.images, batch=True, batch_info=True, dtype=types.UINT8)
            anchor, shape, mirror, labels = fn.external_source(source=src.params, num_outputs=4, batch=True,
                                                               batch_info=True)
            # decode the box alone (nvJPEG's ROI decode on a GPU), then resize all of it: a resize of a region of
            # the whole image would read pixels outside the box at its edges, where Pillow's crop-then-resize does not
            images = fn.decoders.image_slice(data, anchor, shape, axis_names="HW", normalized_anchor=False,
                                             normalized_shape=False, device="mixed" if gpu else "cpu",
                                             output_type=types.RGB)
            images = fn.resize(images, size=[self.size, self.size], interp_type=types.INTERP_LINEAR, antialias=True,
                               dtype=types.UINT8)
            return self._normalized(images, mirror), labels.gpu() if gpu else labels

        self._start(pipeline(), base_epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        k = self.start
        while True:
            try:
                for x, y in super().__iter__():
                    k += 1
                    yield x, y
                return
            except RuntimeError as e:  # DALI stops the whole batch at a file it cannot decode: find it with Pillow
                bad = self._undecodable(k, e)
                self.skipped.update(bad)
                self.set_epoch(self.epoch, k)  # and rebuild from the batch it stopped at
                self.pipe_epoch = None

    def _undecodable(self, k: int, e: Exception) -> list[str]:
        """The files of batches k to k + 2 (DALI's prefetch) that Pillow cannot decode; the one-line error for the
        first unless data.skip_bad; a DataError with DALI's own message if Pillow decodes them all."""
        order = epoch_indices(self.n, self.seed, self.epoch, self.rank, self.world)[k * self.b:(k + 3) * self.b]
        bad = [self.files.paths[i] for i in order.tolist() if self.files.paths[i] not in self.skipped
               and decode_rgb(self.files.root / self.files.paths[i], skip_bad=True) is None]
        if not bad:
            raise DataError(f"DALI failed in batch {k} of epoch {self.epoch + 1} ({_dali_reason(e)}) on files that "
                            "Pillow decodes: try data.loader = workers, and report the file") from None
        if not self.skip_bad:
            decode_rgb(self.files.root / bad[0])  # raises its one line
        return bad


# ----------------------------------------------------------------------------------------------------
# The contract every loader keeps, and the one that picks a loader.

class Loader(Protocol):
    image_shape: tuple[int, int, int]  # (C, H, W) of the images it yields: what the step's warm-ups train on

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
    folder = dict(image_size=cfg.image_size, skip_bad=cfg.skip_bad, **common)
    if cfg.loader == "dali":
        return FolderDaliLoader(files, num_threads=cfg.num_workers, **folder)
    if cfg.loader == "workers":
        return FolderWorkersLoader(files, num_workers=cfg.num_workers, **folder)
    raise UserError(f"data.loader = {cfg.loader!r} cannot read a folder (the gpu loader keeps a uint8 set of one "
                    "image size on the device): use data.loader = dali or workers")
