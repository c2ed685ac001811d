"""The batch contract's last step: uint8 images -> normalized float in the dtype and memory format asked for."""

from __future__ import annotations

import functools

import torch

from fastres.data.cifar import MEAN, STD


@functools.cache
def stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The channel mean and std on ``device``, made once: made per batch they were a host-to-device copy (a sync)
    every step."""
    return (torch.tensor(MEAN, device=device).view(3, 1, 1), torch.tensor(STD, device=device).view(3, 1, 1))


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 standardized with the CIFAR-10 channel statistics."""
    mean, std = stats(x.device)
    return (x.float().div_(255) - mean) / std


def to_batch(x: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """Cast a normalized NCHW batch to the dtype and memory format the model expects."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.to(dtype=dtype, memory_format=fmt)
