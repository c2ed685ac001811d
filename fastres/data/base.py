"""What every data source produces and every loader consumes: the splits as arrays or files, and normalization.

A source (fastres/data/cifar.py: the CIFAR pickles and synthetic images; fastres/data/folder.py: ImageNet-style
folders) gives a :class:`RunData`: training images as a :class:`Split` of uint8 arrays or as :class:`Files`,
evaluation splits as arrays, the class count and the channel statistics. The loaders (fastres/data/loaders.py)
turn training images into batches; :func:`normalize` and :func:`to_batch` are the contract's last step.
"""

from __future__ import annotations

import functools
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from fastres.errors import UserError, one_line


class DataError(UserError):
    """Missing, truncated or malformed data: one line naming the file and the fix."""


@dataclass
class Split:
    """Images as uint8 (N, 3, H, W) and labels as int64 (N,), in a fixed order."""
    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

@dataclass
class Files:
    """Training images as files under ``root``: relative paths, int64 labels, (width, height) from each header
    and Pillow's mode name (RGB, L, CMYK, P, ...), in the index's order (class, then name)."""
    root: Path
    paths: list[str]
    y: np.ndarray
    sizes: np.ndarray
    modes: list[str]

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx: np.ndarray) -> Files:
        return Files(self.root, [self.paths[i] for i in idx], self.y[idx], self.sizes[idx],
                     [self.modes[i] for i in idx])


@dataclass
class RunData:
    """What a run reads, from any source: training images (arrays, or a folder's files), the test split and an
    optional validation split as uint8 arrays, the class count, the channel statistics that normalize them, and the
    files left out (data.skip_bad)."""
    train: Split | Files
    test: Split
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    val: Split | None = None
    skipped: list[str] = field(default_factory=list)  # "path: reason", for the log and the summary


def resolved(root: str | os.PathLike) -> Path:
    """``root`` made absolute with its links followed; a DataError for a symlink loop or an unreadable path."""
    try:
        return Path(root).resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: pathlib's "Symlink loop from ..."
        raise DataError(f"data.dir {root} cannot be followed ({one_line(e, 120)}): point --data.dir at the folder "
                        "holding the data, not at a link that leads back to itself") from None


# ----------------------------------------------------------------------------------------------------
# The batch contract's last step: uint8 images -> normalized float in the dtype and memory format asked for.

@functools.cache
def stats(device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The channel mean and std on ``device``, made once: made per batch they were a host-to-device copy (a sync)
    every step."""
    return (torch.tensor(mean, device=device).view(3, 1, 1), torch.tensor(std, device=device).view(3, 1, 1))


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 standardized with the data's channel statistics."""
    m, s = stats(x.device, tuple(mean), tuple(std))
    return (x.float().div_(255) - m) / s


def to_batch(x: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """Cast a normalized NCHW batch to the dtype and memory format the model expects."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.to(dtype=dtype, memory_format=fmt)


class NotRegular(OSError):
    """A path named like a data file that is a FIFO, a device, a socket or a folder."""


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """``path`` opened for reading, refused (NotRegular) unless it is a regular file: a FIFO named like an image or a
    CIFAR batch would block the read, and the start, forever. Opened non-blocking so that even a FIFO returns."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else "a device or socket"
            raise NotRegular(f"is {kind}, not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise

