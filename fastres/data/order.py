"""Which training images each rank sees each epoch, in which order, and how each is augmented.

Shared by every loader so they agree image for image:
- order: torch's DistributedSampler's order (seeded per epoch with seed + epoch, drop_last): rank r takes every
  W-th image of one permutation, so the global batch k is the same set of images for any world size W.
- augmentation: pad-4 random crop offsets and a flip bit per image index, drawn per epoch from
  (seed, epoch). They depend on the image, not on the rank or worker that loads it.
Batches are full: the epoch has floor(floor(N / W) / per_rank_batch) = floor(N / global_batch) steps.
"""

from __future__ import annotations

import torch

from fastres import rng

PAD = 4  # pixels of zero padding before the random 32x32 crop (He 2015, sec. 4.2)


def epoch_indices(n: int, seed: int, epoch: int, rank: int, world: int) -> torch.Tensor:
    """Image indices rank ``rank`` of ``world`` visits in ``epoch`` (disjoint across ranks), int64 on the CPU.

    Exactly ``list(DistributedSampler(range(n), world, rank, shuffle=True, seed=seed, drop_last=True))`` after
    ``set_epoch(epoch)`` (tested), computed with tensor ops: the sampler's ``.tolist()`` of 50k indices and the
    copy back into a tensor took ~20 ms on the host at the start of every timed epoch, with the GPU idle.
    """
    g = torch.Generator()
    g.manual_seed(seed + epoch)  # DistributedSampler's seeding
    total = (n // world) * world  # drop_last: the tail that does not split evenly is left out
    return torch.randperm(n, generator=g)[:total][rank::world].clone()


def steps_per_epoch(n: int, batch_per_rank: int, world: int) -> int:
    return (n // world) // batch_per_rank


def aug_params(n: int, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: crop row offset, crop column offset (0..2*PAD) and horizontal flip (0/1), int64 on the CPU."""
    g = rng.generator(seed, rng.AUGMENT, epoch)
    dy = torch.randint(0, 2 * PAD + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * PAD + 1, (n,), generator=g)
    flip = torch.randint(0, 2, (n,), generator=g)
    return dy, dx, flip
