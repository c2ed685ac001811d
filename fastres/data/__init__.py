"""CIFAR-10 from the official python-pickle layout: find, download, read, validate, split.

The reader checks structure, not checksums: our copy's ``filenames`` entries differ from the original, so
whole-file hashes (torchvision's check) reject a set whose images and labels are right. What is checked:
every file unpickles (only numpy arrays and plain containers are allowed to load), ``data`` is uint8 of
shape (10000, 3072), ``labels`` are 10000 integers in 0..9. A bad file stops with one line naming it.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastres.config import DataCfg
from fastres.errors import UserError, one_line

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
PER_FILE = 10_000
NUM_CLASSES = 10
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"  # of the archive, as published on the CIFAR page

# Channel statistics of the 50k training images (the values used across the CIFAR literature).
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


class DataError(UserError):
    """Missing, truncated or malformed CIFAR-10 files."""


@dataclass
class Split:
    """Images as uint8 (N, 3, 32, 32) and labels as int64 (N,), in a fixed order."""
    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Cifar10:
    train: Split
    test: Split
    val: Split | None = None


class _ArraysOnly(pickle._Unpickler):
    """Unpickle numpy arrays and builtins only: a data file must not be able to run code.

    The pure-Python unpickler, on purpose: the C one sizes its memo from the file, so one damaged
    LONG_BINPUT index (a 4-byte number) made it allocate 20 GB before failing. Here the memo is a dict,
    and it is as fast on the official files (about 0.04 s each: the images are 10,000 short strings)."""
    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"),
                ("_codecs", "encode")}  # how Python 3 pickles bytes at protocol 2

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR-10 file never does")


def _max_bytes(per_file: int) -> int:
    """A batch file's size bound: the official ones hold per_file x 3,072 image bytes and about 0.2 MB more."""
    return 2 * per_file * 3 * 32 * 32 + (1 << 20)


def read_batch(path: Path, per_file: int | None = None) -> Split:
    """One official batch file as a validated :class:`Split`; DataError naming the file if it is wrong."""
    per_file = per_file or PER_FILE
    limit = _max_bytes(per_file)
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)  # unpickled from memory: a damaged length cannot ask the file for GBs
    except FileNotFoundError:
        raise DataError(f"{path} is missing: the CIFAR-10 folder needs {', '.join(TRAIN_FILES)} and "
                        f"{TEST_FILE}") from None
    except OSError as e:
        raise DataError(f"{path} cannot be read ({e})") from None
    if len(raw) > limit:
        raise DataError(f"{path} is over {limit:,} bytes, far more than a CIFAR-10 batch of {per_file} "
                        f"images; replace it with the file from the official archive")
    try:
        d = _ArraysOnly(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # random bytes make the unpickler raise almost anything: Overflow-, Key-, Memory-, ...
        raise DataError(f"{path} is truncated or not a CIFAR-10 pickle ({type(e).__name__}: {one_line(e)}); "
                        f"replace it with the file from the official archive") from None
    if not isinstance(d, dict):
        raise DataError(f"{path} is not a CIFAR-10 batch (a {type(d).__name__}, not a dict)")
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise DataError(f"{path} is not a CIFAR-10 batch: it has no 'data'/'labels' entries "
                        f"(keys: {sorted(map(str, d))})")
    x, y = d["data"], d["labels"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.shape != (per_file, 3 * 32 * 32):
        shape = getattr(x, "shape", None)
        dtype = getattr(x, "dtype", type(x).__name__)
        raise DataError(f"{path}: 'data' is {dtype} {shape}, expected uint8 ({per_file}, 3072)")
    y = np.asarray(y)
    if y.shape != (per_file,) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: 'labels' has shape {y.shape} and dtype {y.dtype}, expected {per_file} integers")
    if y.min() < 0 or y.max() >= NUM_CLASSES:
        raise DataError(f"{path}: labels out of range [{y.min()}, {y.max()}], expected 0..{NUM_CLASSES - 1}")
    return Split(x.reshape(per_file, 3, 32, 32), y.astype(np.int64))


def _resolved(root: str | os.PathLike) -> Path:
    """``root`` made absolute with its links followed; a DataError for a symlink loop or an unreadable path."""
    try:
        return Path(root).resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: pathlib's "Symlink loop from ..."
        raise DataError(f"data.dir {root} cannot be followed ({one_line(e, 120)}): point --data.dir at the folder "
                        f"holding {FOLDER}, not at a link that leads back to itself") from None


def find(root: str | os.PathLike) -> Path | None:
    """The folder holding the batch files: ``root`` itself or ``root/cifar-10-batches-py``; None if neither."""
    root = _resolved(root)
    for cand in (root, root / FOLDER):
        if (cand / TRAIN_FILES[0]).exists() or (cand / TEST_FILE).exists():
            return cand
    return None


def download(root: str | os.PathLike, url: str = URL, md5: str = MD5, timeout_s: float = 30.0) -> Path:
    """Fetch and unpack the official archive into ``root``; verify its MD5 first. Returns the batch folder.
    On failure the file system is as it was: the partial archive, the staging folder and the folders made for
    ``root`` are gone."""
    root = _resolved(root)
    made = [p for p in (root, *root.parents) if not p.exists()]  # what mkdir(parents=True) makes, deepest first
    try:
        return _fetch_into(root, url, md5, timeout_s)
    except BaseException:
        for folder in made:
            try:
                folder.rmdir()
            except OSError:  # not empty: something besides this download is in it now
                break
        raise


def _fetch_into(root: Path, url: str, md5: str, timeout_s: float) -> Path:
    """:func:`download`'s work: ``root`` made, the archive to a .part file in it, checked, unpacked beside."""
    where = f"put the {FOLDER} folder in {root} (or point --data.dir / $FASTRES_DATA at it)"
    tmp, staging = None, None
    try:
        try:
            root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=root, suffix=".tar.gz.part", delete=False) as tmp:
                h = hashlib.md5()
                with urllib.request.urlopen(url, timeout=timeout_s) as r:
                    while chunk := r.read(1 << 20):
                        h.update(chunk)
                        tmp.write(chunk)
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            raise DataError(f"CIFAR-10 is not in {root} and downloading {url} failed ({reason}): {where}") from None
        if h.hexdigest() != md5:
            raise DataError(f"downloaded {url} has MD5 {h.hexdigest()}, expected {md5}: {where}")
        with tarfile.open(tmp.name) as tar:
            # The 'data' filter refuses absolute paths, links out of root and device files.
            kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            staging = Path(tempfile.mkdtemp(dir=root))
            tar.extractall(staging, **kw)
        dest = root / FOLDER
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging / FOLDER, dest)
        return dest
    finally:
        if tmp is not None:
            Path(tmp.name).unlink(missing_ok=True)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def ensure(root: str | os.PathLike) -> Path:
    """The batch folder under ``root``, downloading the archive first if there is none."""
    found = find(root)
    return found if found is not None else download(root)


def read_cifar10(root: str | os.PathLike, per_file: int | None = None) -> Cifar10:
    """All 50k training and 10k test images, validated (no download: call :func:`ensure` first)."""
    folder = find(root)
    if folder is None:
        raise DataError(f"CIFAR-10 not found in {_resolved(root)}: put the {FOLDER} folder there "
                        f"(or point --data.dir / $FASTRES_DATA at it)")
    parts = [read_batch(folder / name, per_file) for name in TRAIN_FILES]
    train = Split(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))
    return Cifar10(train=train, test=read_batch(folder / TEST_FILE, per_file))


def train_size(*, val_size: int = 0, subset: int = 0) -> int:
    """How many images :func:`split` trains on from the full set, without reading it."""
    return (subset or len(TRAIN_FILES) * PER_FILE) - val_size


def split(data: Cifar10, *, val_size: int = 0, split_seed: int = 0, subset: int = 0,
          test_subset: int = 0) -> Cifar10:
    """Take the first ``subset`` training images, then hold ``val_size`` of them out (a seeded draw).

    Train and validation keep the original image order; the validation images are never trained on.
    """
    n = subset or len(data.train)
    if n > len(data.train):
        raise DataError(f"data.subset = {subset} but the training set has only {len(data.train)} images")
    if val_size >= n:
        raise DataError(f"data.val_size = {val_size} leaves no training images out of {n}: "
                        f"lower data.val_size")
    x, y = data.train.x[:n], data.train.y[:n]
    val = None
    if val_size:
        held = np.zeros(n, dtype=bool)
        held[np.random.default_rng(split_seed).permutation(n)[:val_size]] = True
        val = Split(x[held], y[held])
        x, y = x[~held], y[~held]
    nt = test_subset or len(data.test)
    if nt > len(data.test):
        raise DataError(f"data.test_subset = {test_subset} but the test set has only {len(data.test)} images")
    return Cifar10(train=Split(x, y), test=Split(data.test.x[:nt], data.test.y[:nt]), val=val)


# ----------------------------------------------------------------------------------------------------
# The batch contract's last step: uint8 images -> normalized float in the dtype and memory format asked for.

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


# ----------------------------------------------------------------------------------------------------
# What a run reads: data.source = cifar10 (data.dir) or synthetic (made in memory).

def synthetic(seed: int = 0) -> Cifar10:
    """Random uint8 images and labels with CIFAR-10's shapes and sizes (50k train, 10k test), made in memory."""
    g = np.random.default_rng(seed)
    n_train, n_test = len(TRAIN_FILES) * PER_FILE, PER_FILE

    def part(n: int) -> Split:
        return Split(g.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8),
                     g.integers(0, NUM_CLASSES, n, dtype=np.int64))
    return Cifar10(train=part(n_train), test=part(n_test))


def fetch(cfg: DataCfg) -> None:
    """Download CIFAR-10 into data.dir unless it is there (call on one rank; the others wait)."""
    if cfg.source == "cifar10":
        ensure(cfg.dir)


def load(cfg: DataCfg) -> Cifar10:
    """The splits ``cfg`` names (train, test, and val when data.val_size); :func:`fetch` first."""
    data = synthetic(cfg.split_seed) if cfg.source == "synthetic" else read_cifar10(cfg.dir)
    return split(data, val_size=cfg.val_size, split_seed=cfg.split_seed, subset=cfg.subset,
                       test_subset=cfg.test_subset)


