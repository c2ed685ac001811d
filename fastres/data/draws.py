"""The order and augmentation draws every loader shares, so loaders agree image for image.

Which training images each rank sees each epoch, in which order, and how each is augmented:
- order: torch's DistributedSampler's order (seeded per epoch with seed + epoch, drop_last): rank r takes every
  W-th image of one permutation, so the global batch k is the same set of images for any world size W.
- augmentation: pad-4 random crop offsets and a flip bit per image index (CIFAR), or a random-resized-crop box and
  a flip bit per image (folders), drawn per epoch from (seed, epoch). They depend on the image, not on the rank or
  worker that loads it. data.flip = "alternate" changes only the flip bits (see :func:`aug_params`).
Batches are full: the epoch has floor(floor(N / W) / per_rank_batch) = floor(N / global_batch) steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fastres import rng
from fastres.config import FLIPS, DataCfg

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


# The training side of a folder's images per epoch: data.image_size, or progressive resizing (FFCV's ImageNet
# recipes: low resolution early, when the weights are far from trained, full resolution at the end).

@dataclass(frozen=True)
class Resolution:
    """The side (pixels) of epoch e's training images: :meth:`at`. With ``max_res`` set: ``min_res`` through epoch
    ``start_ramp``, ``max_res`` from ``end_ramp`` on, between them the straight line rounded to a multiple of 32
    (FFCV's train_imagenet.py get_resolution); else ``size`` every epoch."""
    size: int
    min_res: int = 0
    max_res: int = 0
    start_ramp: int = 0
    end_ramp: int = 0

    @classmethod
    def of(cls, cfg: DataCfg) -> Resolution:
        return cls(cfg.side, cfg.min_res, cfg.max_res, cfg.start_ramp, cfg.end_ramp)

    def at(self, epoch: int) -> int:
        if not self.max_res:
            return self.size
        if epoch <= self.start_ramp:
            return self.min_res
        if epoch >= self.end_ramp:
            return self.max_res
        line = np.interp([epoch], [self.start_ramp, self.end_ramp], [self.min_res, self.max_res])[0]
        return int(np.round(line / 32)) * 32

    def sides(self) -> list[int]:
        """Every side a run may train at, smallest first (what the step's warm-ups cover)."""
        return sorted({self.at(e) for e in range(self.end_ramp + 2)})


def crop_boxes(sizes: np.ndarray, seed: int, epoch: int, flip: str = "random") -> tuple[torch.Tensor, ...]:
    """Per image of (width, height) ``sizes``: crop top, left, height, width and flip bit, int64 on the CPU.

    torchvision's RandomResizedCrop.get_params for every image at once (:func:`rrc_boxes`) on uniform draws from
    (seed, epoch). ``flip`` as :func:`aug_params` (alternate: epoch 0's bits inverted every other epoch)."""
    g = rng.generator(seed, rng.AUGMENT, epoch)
    n = len(sizes)
    u_area = torch.rand(n, RRC_TRIES, generator=g, dtype=torch.float64)
    u_ratio = torch.rand(n, RRC_TRIES, generator=g, dtype=torch.float64)
    u_top, u_left = torch.rand(n, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64)
    bits = torch.randint(0, 2, (n,), generator=g)
    if flip == "alternate" and epoch > 0:
        bits = crop_boxes(sizes, seed, 0)[4] ^ (epoch % 2)
    return (*rrc_boxes(sizes, u_area, u_ratio, u_top, u_left), bits)


def folder_boxes(sizes: np.ndarray, seed: int, epoch: int, flip: str = "random",
                 augment: str = "rrc") -> tuple[torch.Tensor, ...]:
    """(top, left, height, width, flip) of each folder image's training crop: RandomResizedCrop's box
    (:func:`crop_boxes`; augment = "rrc"), or CIFAR's pad-4 random crop (augment = "pad-crop"): a window of the
    image's own size at the offsets -PAD..PAD of :func:`aug_params`, the same draws as the CIFAR loaders'; where it
    hangs over the image's edge the loaders fill zeros, as the zero pad does."""
    if augment == "rrc":
        return crop_boxes(sizes, seed, epoch, flip)
    dy, dx, bits = aug_params(len(sizes), seed, epoch, flip)
    return dy - PAD, dx - PAD, torch.as_tensor(sizes[:, 1]).long(), torch.as_tensor(sizes[:, 0]).long(), bits


def rrc_boxes(sizes: np.ndarray, u_area: torch.Tensor, u_ratio: torch.Tensor, u_top: torch.Tensor,
              u_left: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(top, left, height, width) of RandomResizedCrop.get_params's box for each image from its uniform draws in
    [0, 1): up to 10 tries of an area fraction in RRC_SCALE (``u_area``) and a log-uniform ratio in RRC_RATIO
    (``u_ratio``), rounded half to even as Python's round(); the first that fits is placed at floor(u * (room + 1))
    (``u_top``, ``u_left``: torch.randint's draw); none fitting, the largest centred crop of a clamped ratio."""
    wi = torch.as_tensor(sizes[:, 0], dtype=torch.float64)[:, None]
    hi = torch.as_tensor(sizes[:, 1], dtype=torch.float64)[:, None]
    area = wi * hi * (RRC_SCALE[0] + (RRC_SCALE[1] - RRC_SCALE[0]) * u_area)
    lo, hi_r = np.log(RRC_RATIO[0]), np.log(RRC_RATIO[1])
    ratio = torch.exp(lo + (hi_r - lo) * u_ratio)
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
    top = torch.where(found, torch.floor(u_top * (hi - h + 1)), torch.floor((hi - h) / 2))
    left = torch.where(found, torch.floor(u_left * (wi - w + 1)), torch.floor((wi - w) / 2))
    return top.long(), left.long(), h.long(), w.long()
