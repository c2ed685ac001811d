"""The data a run reads: CIFAR-10 and CIFAR-100 (the official python-pickle layouts) and ImageNet-style folders.

CIFAR: find, download, read, validate, split. The reader checks structure, not checksums: some copies'
``filenames`` entries differ from the original, so whole-file hashes (torchvision's check) reject a set
whose images and labels are right. What is checked: every file unpickles (only numpy arrays and plain
containers are allowed to load), ``data`` is uint8 of shape (10000, 3072), ``labels`` are 10000 integers
in 0..9 (CIFAR-100: files train and test of 50000 and 10000 rows, ``fine_labels`` in 0..99). A bad file
stops with one line naming it.

Folders (data.source = folder): ``data.dir/train/<class>/*`` and ``data.dir/val/<class>/*``, torchvision's
ImageFolder layout; the class index is the position of the folder name in the sorted train/ listing. A file index
(paths, labels, image sizes and modes) is built once and cached in the run directory; see :func:`folder_index`
for which check happens when (docs/data.md has the rules).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fastres.config import DataCfg
from fastres.errors import UserError, one_line, writing

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

FOLDER_100 = "cifar-100-python"
SIZES_100 = {"train": 50_000, "test": 10_000}  # images in each CIFAR-100 file
NUM_CLASSES_100 = 100
URL_100 = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
MD5_100 = "eb9058c3a382ffc7106e4002c42a8d85"  # of the archive (torchvision's CIFAR100.tgz_md5)
MEAN_100 = (0.5071, 0.4865, 0.4409)  # CIFAR-100's 50k training images (as its literature normalizes)
STD_100 = (0.2673, 0.2564, 0.2762)
# ImageNet's channel statistics, as torchvision's references normalize every folder of photographs.
MEAN_IMAGENET = (0.485, 0.456, 0.406)
STD_IMAGENET = (0.229, 0.224, 0.225)


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
class Cifar10:
    """What a run reads (any source, CIFAR-10's name kept): training images, test and optional val splits as
    uint8 arrays, the channel statistics that normalize them, and the files left out (data.skip_bad)."""
    train: Split | Files
    test: Split
    val: Split | None = None
    num_classes: int = NUM_CLASSES
    mean: tuple[float, float, float] = MEAN
    std: tuple[float, float, float] = STD
    skipped: list[str] = field(default_factory=list)  # "path: reason", for the log and the summary


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


def read_batch(path: Path, per_file: int | None = None, label_key: str = "labels",
               num_classes: int = NUM_CLASSES) -> Split:
    """One official batch file as a validated :class:`Split`; DataError naming the file if it is wrong.

    CIFAR-100's files are read with ``label_key = "fine_labels"`` and 100 classes."""
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
    if "data" not in d or label_key not in d:
        raise DataError(f"{path} is not a CIFAR-{num_classes} batch: it has no 'data'/'{label_key}' entries "
                        f"(keys: {sorted(map(str, d))})")
    x, y = d["data"], d[label_key]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.shape != (per_file, 3 * 32 * 32):
        shape = getattr(x, "shape", None)
        dtype = getattr(x, "dtype", type(x).__name__)
        raise DataError(f"{path}: 'data' is {dtype} {shape}, expected uint8 ({per_file}, 3072)")
    y = np.asarray(y)
    if y.shape != (per_file,) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: '{label_key}' has shape {y.shape} and dtype {y.dtype}, expected {per_file} integers")
    if y.min() < 0 or y.max() >= num_classes:
        raise DataError(f"{path}: labels out of range [{y.min()}, {y.max()}], expected 0..{num_classes - 1}")
    return Split(x.reshape(per_file, 3, 32, 32), y.astype(np.int64))


def _resolved(root: str | os.PathLike) -> Path:
    """``root`` made absolute with its links followed; a DataError for a symlink loop or an unreadable path."""
    try:
        return Path(root).resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: pathlib's "Symlink loop from ..."
        raise DataError(f"data.dir {root} cannot be followed ({one_line(e, 120)}): point --data.dir at the folder "
                        f"holding {FOLDER}, not at a link that leads back to itself") from None


def find(root: str | os.PathLike, folder: str = FOLDER) -> Path | None:
    """The folder holding the batch files: ``root`` itself or ``root/cifar-10-batches-py`` (``folder``); None if
    neither."""
    root = _resolved(root)
    first = (TRAIN_FILES[0], TEST_FILE) if folder == FOLDER else tuple(SIZES_100)
    for cand in (root, root / folder):
        if any((cand / name).exists() for name in first):
            return cand
    return None


def download(root: str | os.PathLike, url: str = URL, md5: str = MD5, timeout_s: float = 30.0,
             folder: str = FOLDER) -> Path:
    """Fetch and unpack the official archive into ``root``; verify its MD5 first. Returns the batch folder.
    On failure the file system is as it was: the partial archive, the staging folder and the folders made for
    ``root`` are gone."""
    root = _resolved(root)
    made = [p for p in (root, *root.parents) if not p.exists()]  # what mkdir(parents=True) makes, deepest first
    try:
        return _fetch_into(root, url, md5, timeout_s, folder)
    except BaseException:
        for made_dir in made:
            try:
                made_dir.rmdir()
            except OSError:  # not empty: something besides this download is in it now
                break
        raise


def _fetch_into(root: Path, url: str, md5: str, timeout_s: float, folder: str) -> Path:
    """:func:`download`'s work: ``root`` made, the archive to a .part file in it, checked, unpacked beside."""
    where = f"put the {folder} folder in {root} (or point --data.dir / $FASTRES_DATA at it)"
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
            raise DataError(f"{folder} is not in {root} and downloading {url} failed ({reason}): {where}") from None
        if h.hexdigest() != md5:
            raise DataError(f"downloaded {url} has MD5 {h.hexdigest()}, expected {md5}: {where}")
        with tarfile.open(tmp.name) as tar:
            # The 'data' filter refuses absolute paths, links out of root and device files.
            kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            staging = Path(tempfile.mkdtemp(dir=root))
            tar.extractall(staging, **kw)
        dest = root / folder
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging / folder, dest)
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


def read_cifar10(root: str | os.PathLike, per_file: int | None = None, *, train_images: int = 0) -> Cifar10:
    """The 50k training images (or the files holding the first ``train_images`` of them) and the 10k test images,
    validated (no download: call :func:`ensure` first)."""
    folder = find(root)
    if folder is None:
        raise DataError(f"CIFAR-10 not found in {_resolved(root)}: put the {FOLDER} folder there "
                        f"(or point --data.dir / $FASTRES_DATA at it)")
    files = len(TRAIN_FILES)
    if train_images:  # a subset reads only the files it takes images from (a smoke run starts a second sooner)
        files = min(files, -(-train_images // (per_file or PER_FILE)))
    parts = [read_batch(folder / name, per_file) for name in TRAIN_FILES[:files]]
    train = Split(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))
    return Cifar10(train=train, test=read_batch(folder / TEST_FILE, per_file))


def read_cifar100(root: str | os.PathLike) -> Cifar10:
    """CIFAR-100's 50k training and 10k test images with their fine labels (0..99), validated."""
    folder = find(root, FOLDER_100)
    if folder is None:
        raise DataError(f"CIFAR-100 not found in {_resolved(root)}: put the {FOLDER_100} folder (files train, test) "
                        f"there (or point --data.dir at it)")
    train, test = (read_batch(folder / name, SIZES_100[name], "fine_labels", NUM_CLASSES_100) for name in SIZES_100)
    return Cifar10(train=train, test=test, num_classes=NUM_CLASSES_100, mean=MEAN_100, std=STD_100)


def train_size(*, val_size: int = 0, subset: int = 0) -> int:
    """How many images :func:`split` trains on from the full set, without reading it."""
    return (subset or len(TRAIN_FILES) * PER_FILE) - val_size


def split(data: Cifar10, *, val_size: int = 0, split_seed: int = 0, subset: int = 0,
          test_subset: int = 0) -> Cifar10:
    """Take the first ``subset`` training images, then hold ``val_size`` of them out (a seeded draw).

    Train and validation keep the original image order; the validation images are never trained on.
    The statistics, class count and skipped files come along unchanged.
    """
    kept = dict(num_classes=data.num_classes, mean=data.mean, std=data.std, skipped=data.skipped)
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
    return Cifar10(train=Split(x, y), test=Split(data.test.x[:nt], data.test.y[:nt]), val=val, **kept)


# ----------------------------------------------------------------------------------------------------
# The batch contract's last step: uint8 images -> normalized float in the dtype and memory format asked for.

@functools.cache
def stats(device: torch.device, mean: tuple[float, ...] = MEAN,
          std: tuple[float, ...] = STD) -> tuple[torch.Tensor, torch.Tensor]:
    """The channel mean and std on ``device``, made once: made per batch they were a host-to-device copy (a sync)
    every step."""
    return (torch.tensor(mean, device=device).view(3, 1, 1), torch.tensor(std, device=device).view(3, 1, 1))


def normalize(x: torch.Tensor, mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 standardized with the channel statistics (CIFAR-10's unless given)."""
    m, s = stats(x.device, tuple(mean), tuple(std))
    return (x.float().div_(255) - m) / s


def to_batch(x: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """Cast a normalized NCHW batch to the dtype and memory format the model expects."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.to(dtype=dtype, memory_format=fmt)


# ----------------------------------------------------------------------------------------------------
# What a run reads: data.source = cifar10 (data.dir) or synthetic (made in memory).

def synthetic(seed: int = 0, *, train_images: int = 0, test_images: int = 0) -> Cifar10:
    """Random uint8 images and labels with CIFAR-10's shapes, made in memory: the first ``train_images`` (0: all
    50k) and ``test_images`` (0: all 10k) of one fixed set, so a subset is the full set's first images."""
    def part(n: int, stream: int) -> Split:  # images and labels each from a stream of its own: a prefix is a prefix
        images, labels = (np.random.default_rng([seed, stream, k]) for k in (0, 1))
        return Split(images.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8),
                     labels.integers(0, NUM_CLASSES, n, dtype=np.int64))
    n_train, n_test = len(TRAIN_FILES) * PER_FILE, PER_FILE  # a larger request gets these, and split() refuses it
    return Cifar10(train=part(min(train_images, n_train) or n_train, 0),
                   test=part(min(test_images, n_test) or n_test, 1))


def fetch(cfg: DataCfg, cache_dir: str | os.PathLike | None = None) -> None:
    """Download CIFAR-10/100 into data.dir unless it is there; for a folder, build (or refresh) its file index in
    ``cache_dir``. Call on one rank; the others wait."""
    if cfg.source == "cifar10":
        ensure(cfg.dir)
    elif cfg.source == "cifar100" and find(cfg.dir, FOLDER_100) is None:
        download(cfg.dir, URL_100, MD5_100, folder=FOLDER_100)
    elif cfg.source == "folder":
        folder_index(cfg.dir, cache_dir)


def load(cfg: DataCfg, cache_dir: str | os.PathLike | None = None) -> Cifar10:
    """The splits ``cfg`` names (train, test, and val when data.val_size); :func:`fetch` first."""
    if cfg.source == "folder":
        return load_folder(cfg, cache_dir)
    if cfg.source == "synthetic":
        data = synthetic(cfg.split_seed, train_images=cfg.subset, test_images=cfg.test_subset)
    else:
        data = read_cifar100(cfg.dir) if cfg.source == "cifar100" else read_cifar10(cfg.dir, train_images=cfg.subset)
    return split(data, val_size=cfg.val_size, split_seed=cfg.split_seed, subset=cfg.subset,
                 test_subset=cfg.test_subset)


# ----------------------------------------------------------------------------------------------------
# Image folders: the file index, and decoding with Pillow (the workers loader and every evaluation split).
#
# Which check happens when (a million files cannot be decoded at every start):
# - index time (once, then cached): the layout (train/ and val/ of class folders), a class folder with no images,
#   a val class missing from train/, a file outside a class folder or a folder inside one, an extension that is
#   not .jpg/.jpeg/.png, a header Pillow cannot read (not an image), a format other than JPEG/PNG, and the
#   header's size: a side under MIN_SIDE or over MAX_SIDE pixels. Reading a header costs one small read a file.
# - decode time (every epoch, in the loader): a truncated or corrupt file. Evaluation splits are decoded at load.
# Each is a one-line DataError naming the file; with data.skip_bad = true the file is left out (index time) or
# replaced by a grey image of its size (decode time, so batches stay full and loaders agree), and counted.

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # what Pillow and DALI's decoders both read (by content)
MIN_SIDE = 8  # pixels: smaller is a thumbnail or a broken export, not a photograph
MAX_SIDE = 16_384  # pixels: one decode would take a GB and stall its worker (ImageNet's largest side is ~5,000)
INDEX = "file_index.npz"
INDEX_VERSION = 1
EVAL_RESIZE = 0.875  # evaluation: shorter side to size / 0.875, then the centre crop (torchvision's references)
GREY = 128  # what a file that cannot be decoded becomes under data.skip_bad


def _freshness(root: Path) -> dict[str, int]:
    """The modification times (ns) of train/, val/ and every class folder: adding, removing or renaming a file
    changes its folder's time, so the index is rebuilt. (A file rewritten in place under the same name is not
    seen: write a new file and rename it, or delete the index.)"""
    key = {}
    for sub in ("train", "val"):
        d = root / sub
        key[sub] = d.stat().st_mtime_ns
        key.update({f"{sub}/{e.name}": e.stat().st_mtime_ns for e in os.scandir(d) if e.is_dir()})
    return key


def _header(path: Path) -> tuple[int, int, str, str]:
    """(width, height, mode, problem) from the file's header alone ("" when it may be decoded)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning: the sides are checked below
            with Image.open(path) as im:
                (w, h), mode, fmt = im.size, im.mode, im.format
    except Image.DecompressionBombError:
        return 0, 0, "", f"is over {Image.MAX_IMAGE_PIXELS * 2:,} pixels (a decompression bomb?)"
    except Exception as e:  # noqa: BLE001 - Pillow raises many kinds for a file that is not an image
        return 0, 0, "", f"is not an image Pillow can read ({type(e).__name__}: {one_line(e, 80)})"
    if fmt not in ("JPEG", "PNG"):
        return w, h, mode, f"is a {fmt} image, not JPEG or PNG"
    if min(w, h) < MIN_SIDE or max(w, h) > MAX_SIDE:
        return w, h, mode, f"is {w}x{h} pixels: sides must be {MIN_SIDE} to {MAX_SIDE:,}"
    return w, h, mode, ""


def _list_split(root: Path, sub: str, classes: list[str] | None) -> tuple[list[str], list[int], list[list[str]]]:
    """(relative paths, labels, [path, problem] pairs) of ``root/sub``; the classes are train/'s when given."""
    base = root / sub
    names = sorted(e.name for e in os.scandir(base) if e.is_dir())
    bad = [[f"{sub}/{e.name}", "is a file outside any class folder"] for e in os.scandir(base) if not e.is_dir()]
    classes = names if classes is None else classes
    label_of = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for name in names:
        if name not in label_of:
            bad.append([f"{sub}/{name}", "is a class folder with no namesake in train/"])
            continue
        found = 0
        for e in sorted(os.scandir(base / name), key=lambda e: e.name):
            rel = f"{sub}/{name}/{e.name}"
            if e.is_dir():
                bad.append([rel, "is a folder inside a class folder (the layout is <split>/<class>/<image>)"])
            elif not e.name.lower().endswith(IMAGE_EXTENSIONS):
                bad.append([rel, f"is not an image file (extensions read: {', '.join(IMAGE_EXTENSIONS)})"])
            else:
                paths.append(rel)
                labels.append(label_of[name])
                found += 1
        if not found:
            bad.append([f"{sub}/{name}", "is a class folder with no images"])
    return paths, labels, bad


def _build_index(root: Path) -> dict:
    """List train/ and val/, read every header (threads: it is file I/O), and record each problem found."""
    classes = sorted(e.name for e in os.scandir(root / "train") if e.is_dir())
    if not classes:
        raise DataError(f"{root / 'train'} holds no class folders: data.source = folder needs "
                        f"data.dir/train/<class>/<image> (and val/<class>/<image>)")
    index: dict = {"classes": classes, "bad": []}
    for sub in ("train", "val"):
        paths, labels, bad = _list_split(root, sub, classes)
        with ThreadPoolExecutor(16) as pool:
            heads = list(pool.map(_header, (root / rel for rel in paths), chunksize=64))
        good = [i for i, h in enumerate(heads) if not h[3]]
        bad += [[paths[i], heads[i][3]] for i, h in enumerate(heads) if h[3]]
        index[sub] = dict(paths=[paths[i] for i in good], labels=[labels[i] for i in good],
                          sizes=[heads[i][:2] for i in good], modes=[heads[i][2] for i in good])
        index["bad"] += bad
    return index


def _write_index(path: Path, key: dict, index: dict) -> None:
    arrays = {"meta": np.frombuffer(json.dumps(dict(version=INDEX_VERSION, key=key, classes=index["classes"],
                                                    bad=index["bad"])).encode(), np.uint8)}
    for sub in ("train", "val"):
        part = index[sub]
        arrays[f"{sub}_paths"] = np.frombuffer("\n".join(part["paths"]).encode(), np.uint8)
        arrays[f"{sub}_modes"] = np.frombuffer("\n".join(part["modes"]).encode(), np.uint8)
        arrays[f"{sub}_labels"] = np.asarray(part["labels"], np.int64)
        arrays[f"{sub}_sizes"] = np.asarray(part["sizes"], np.int64).reshape(-1, 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part.npz")
    with writing(path):
        np.savez(tmp, **arrays)
        os.replace(tmp, path)


def _read_index(path: Path, key: dict) -> dict | None:
    """The cached index, or None when it is missing, from another folder state, or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
            if meta.get("version") != INDEX_VERSION or meta.get("key") != key:
                return None
            index = {"classes": meta["classes"], "bad": meta["bad"]}
            for sub in ("train", "val"):
                text = {k: z[f"{sub}_{k}"].tobytes().decode() for k in ("paths", "modes")}
                index[sub] = dict(paths=text["paths"].split("\n") if text["paths"] else [],
                                  modes=text["modes"].split("\n") if text["modes"] else [],
                                  labels=z[f"{sub}_labels"], sizes=z[f"{sub}_sizes"])
            return index
    except (OSError, ValueError, KeyError, EOFError):
        return None


def folder_index(root: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> dict:
    """The index of an ImageFolder tree: {"classes", "train", "val", "bad"}; train and val hold paths (relative to
    ``root``), labels, (width, height) sizes and modes; bad is [path, problem] pairs for everything left out.

    Cached as ``cache_dir/file_index.npz``, reused while :func:`_freshness` of the folder is unchanged."""
    root = _resolved(root)
    for sub in ("train", "val"):
        if not (root / sub).is_dir():
            raise DataError(f"data.dir {root} has no {sub}/ folder: data.source = folder needs "
                            f"data.dir/train/<class>/<image> and data.dir/val/<class>/<image>")
    key = {"dir": str(root), **_freshness(root)}
    cache = Path(cache_dir) / INDEX if cache_dir is not None else None
    index = _read_index(cache, key) if cache is not None and cache.exists() else None
    if index is None:
        index = _build_index(root)
        if cache is not None:
            _write_index(cache, key, index)
            index = _read_index(cache, key)  # the same arrays whether this start built the index or read it
    return index


def _files(root: Path, part: dict) -> Files:
    return Files(root, list(part["paths"]), np.asarray(part["labels"], np.int64),
                 np.asarray(part["sizes"], np.int64).reshape(-1, 2), list(part["modes"]))


def load_folder(cfg: DataCfg, cache_dir: str | os.PathLike | None = None) -> Cifar10:
    """A folder's training files and its decoded evaluation splits (val/ as "test"; data.val_size held out of
    train/ as "val"); files with problems stop the run, or with data.skip_bad are left out and listed."""
    root = _resolved(cfg.dir)
    index = folder_index(root, cache_dir)
    bad = [f"{root / rel}: {why}" for rel, why in index["bad"]]
    if bad and not cfg.skip_bad:
        more = f" (and {len(bad) - 1} more problem(s))" if len(bad) > 1 else ""
        raise DataError(f"{bad[0]}{more}: fix or remove it, or set data.skip_bad = true to leave such files out")
    train, test = _files(root, index["train"]), _files(root, index["val"])
    if not len(train) or not len(test):
        raise DataError(f"{root} has no readable {'train' if not len(train) else 'val'} images: "
                        "data.source = folder needs images in train/<class>/ and val/<class>/")
    g = np.random.default_rng(cfg.split_seed)  # files are in class order: subsets are seeded draws, kept sorted
    if cfg.subset:
        if cfg.subset > len(train):
            raise DataError(f"data.subset = {cfg.subset} but {root / 'train'} has only {len(train)} images")
        train = train.take(np.sort(g.permutation(len(train))[:cfg.subset]))
    if cfg.val_size >= len(train):
        raise DataError(f"data.val_size = {cfg.val_size} leaves no training images out of {len(train)}: "
                        "lower data.val_size")
    held = np.zeros(len(train), bool)
    held[g.permutation(len(train))[:cfg.val_size]] = True
    if cfg.test_subset:
        test = test.take(np.sort(np.random.default_rng(cfg.split_seed).permutation(len(test))[:cfg.test_subset]))
    skipped = list(bad)
    val = decode_split(train.take(np.flatnonzero(held)), cfg, skipped) if cfg.val_size else None
    return Cifar10(train=train.take(np.flatnonzero(~held)), test=decode_split(test, cfg, skipped), val=val,
                   num_classes=len(index["classes"]), mean=MEAN_IMAGENET, std=STD_IMAGENET, skipped=skipped)


def decode_rgb(path: Path, skip_bad: bool = False) -> Image.Image | None:
    """The file as an RGB image (grayscale, palette, CMYK and alpha converted as Pillow converts them). A file
    that does not decode is a DataError naming it; with ``skip_bad``, None."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # convert() decodes it all: a truncated file raises here
    except Exception as e:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, ... for a bad file
        if not skip_bad:
            raise DataError(f"{path} cannot be decoded ({type(e).__name__}: {one_line(e, 80)}): replace or remove "
                            "it, or set data.skip_bad = true to train on a grey image in its place") from None
    return None


def eval_transform(img: Image.Image, size: int) -> np.ndarray:
    """torchvision's evaluation transform: shorter side to int(size / 0.875), centre crop; uint8 (3, size, size)."""
    w, h = img.size
    short = int(size / EVAL_RESIZE)
    nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    img = img.resize((nw, nh), Image.BILINEAR)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


class _EvalImages(Dataset):
    def __init__(self, files: Files, size: int):
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        img = decode_rgb(self.files.root / self.files.paths[i], skip_bad=True)
        if img is None:  # the main process names it (or skips it): an error raised here would be a traceback
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), False
        return torch.from_numpy(eval_transform(img, self.size)), True


def decode_split(files: Files, cfg: DataCfg, skipped: list[str]) -> Split:
    """Evaluation images decoded once (data.num_workers processes): uint8 (N, 3, S, S). A file that does not decode
    stops with its name, or with data.skip_bad is left out and appended to ``skipped``."""
    loader = DataLoader(_EvalImages(files, cfg.image_size), batch_size=64,
                                         num_workers=min(cfg.num_workers, os.cpu_count() or 1))
    parts = list(loader)
    x = torch.cat([p[0] for p in parts]).numpy()
    ok = torch.cat([p[1] for p in parts]).numpy().astype(bool)
    for i in np.flatnonzero(~ok):
        decode_rgb(files.root / files.paths[i], skip_bad=cfg.skip_bad)  # raises the one line unless skip_bad
        skipped.append(f"{files.root / files.paths[i]}: cannot be decoded")
    return Split(np.ascontiguousarray(x[ok]), files.y[ok])
