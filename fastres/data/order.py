"""Which training images each rank sees each epoch, in which order, and how each is augmented.

Shared by every loader so they agree image for image:
- order: torch's DistributedSampler's order (seeded per epoch with seed + epoch, drop_last): rank r takes every
  W-th image of one permutation, so the global batch k is the same set of images for any world size W.
- augmentation: pad-4 random crop offsets and a flip bit per image index, drawn per epoch from
  (seed, epoch). They depend on the image, not on the rank or worker that loads it. data.flip = "alternate"
  changes only the flip bits (see :func:`aug_params`).
Batches are full: the epoch has floor(floor(N / W) / per_rank_batch) = floor(N / global_batch) steps.
"""

from __future__ import annotations

import torch

from fastres import rng

PAD = 4  # pixels of zero padding before the random 32x32 crop (He 2015, sec. 4.2)
FLIPS = ("random", "alternate")


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
