"""CIFAR-10 and CIFAR-100 in their official python-pickle layouts: find, download, read, validate, split; and
synthetic images of CIFAR-10's shape.

The reader checks structure, not checksums: some copies' ``filenames`` entries differ from the original, so
whole-file hashes (torchvision's check) reject a set whose images and labels are right. What is checked: every file
unpickles (only numpy arrays and plain containers are allowed to load), ``data`` is uint8 of shape (10000, 3072),
``labels`` are 10000 integers in 0..9 (CIFAR-100: files train and test of 50000 and 10000 rows, ``fine_labels`` in
0..99). A bad file stops with one line naming it.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from fastres.data.base import DataError, RunData, Split, open_regular, resolved
from fastres.errors import one_line, shown, writing

CIFAR10_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
PER_FILE = 10_000
NUM_CLASSES = 10
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"  # of the archive, as published on the CIFAR page

# Channel statistics of the 50k training images (the values used across the CIFAR literature).
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)

CIFAR100_FOLDER = "cifar-100-python"
SIZES_100 = {"train": 50_000, "test": 10_000}  # images in each CIFAR-100 file
NUM_CLASSES_100 = 100
URL_100 = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
MD5_100 = "eb9058c3a382ffc7106e4002c42a8d85"  # of the archive (torchvision's CIFAR100.tgz_md5)
MEAN_100 = (0.5071, 0.4865, 0.4409)  # CIFAR-100's 50k training images (as its literature normalizes)
STD_100 = (0.2673, 0.2564, 0.2762)


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
        with open_regular(path) as f:  # a FIFO named data_batch_1 would block the read forever
            raw = f.read(limit + 1)  # unpickled from memory: a damaged length cannot ask the file for GBs
    except FileNotFoundError:
        raise DataError(f"{path} is missing: the CIFAR-10 folder needs {', '.join(TRAIN_FILES)} and "
                        f"{TEST_FILE}") from None
    except OSError as e:
        raise DataError(f"{shown(path)} cannot be read ({e.strerror or e}): replace it with the file from the official "
                        "archive") from None
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


def find(root: str | os.PathLike, folder: str = CIFAR10_FOLDER) -> Path | None:
    """The folder holding ``folder``'s batch files (cifar-10-batches-py, or cifar-100-python) in the data root
    ``root``: ``root`` itself (a path straight to the batch folder), ``folder`` in the root (:func:`data_root`: beside
    a batch folder given straight), or ``cifar10/folder`` there (where fastres put CIFAR-10 before data roots);
    None if none."""
    root, base = resolved(root), data_root(root)
    first = (TRAIN_FILES[0], TEST_FILE) if folder == CIFAR10_FOLDER else tuple(SIZES_100)
    for cand in (root, base / folder, base / "cifar10" / folder):
        if any((cand / name).exists() for name in first):
            return cand
    return None


def data_root(root: str | os.PathLike) -> Path:
    """Where a download goes: ``root``, or its parent when ``root`` is itself a CIFAR batch folder (data.dir given
    straight to cifar-10-batches-py), so CIFAR-100 lands beside CIFAR-10, not inside it."""
    root = resolved(root)
    inside = root.name in (CIFAR10_FOLDER, CIFAR100_FOLDER) or (root / TRAIN_FILES[0]).exists()
    return root.parent if inside else root


def download(root: str | os.PathLike, url: str = URL, md5: str = MD5, timeout_s: float = 30.0,
             folder: str = CIFAR10_FOLDER) -> Path:
    """Fetch the official archive into a temporary folder ($TMPDIR), verify its MD5, unpack it there, and only then
    move the batch folder into ``root`` (made if needed). Returns the batch folder. A failure leaves the file system
    as it was: ``root`` untouched (not even made), the temporary folder gone."""
    root = resolved(root)
    where = f"put the {folder} folder in {root} (or point --data.dir / $FASTRES_DATA at the folder holding it)"
    with tempfile.TemporaryDirectory(prefix="fastres-download-") as work:
        archive, unpacked = Path(work) / "archive.tar.gz", Path(work) / "unpacked"
        try:
            h = hashlib.md5()
            with urllib.request.urlopen(url, timeout=timeout_s) as r, open(archive, "wb") as out:
                while chunk := r.read(1 << 20):
                    h.update(chunk)
                    out.write(chunk)
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            raise DataError(f"{folder} is not in {root} and downloading {url} to {work} failed ({reason}): "
                            f"{where}") from None
        if h.hexdigest() != md5:
            raise DataError(f"downloaded {url} has MD5 {h.hexdigest()}, expected {md5}: {where}")
        with tarfile.open(archive) as tar:
            # The 'data' filter refuses absolute paths, links out of root and device files.
            tar.extractall(unpacked, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        if not (unpacked / folder).is_dir():
            raise DataError(f"{url} holds no {folder} folder: {where}")
        return _moved_in(unpacked / folder, root / folder)


def _moved_in(src: Path, dest: Path) -> Path:
    """``src`` moved to ``dest`` as a whole: copied beside it under a temporary name, then renamed (atomic on its
    file system); on a failure nothing of it stays, nor the folders made for it."""
    made = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()]  # deepest first
    part = dest.with_name(f".{dest.name}.part")
    try:
        with writing(dest):
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(part, ignore_errors=True)
            shutil.copytree(src, part)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(part, dest)
        return dest
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        for made_dir in made:
            try:
                made_dir.rmdir()
            except OSError:  # not empty: something besides this download is in it now
                break
        raise


def ensure(root: str | os.PathLike) -> Path:
    """CIFAR-10's batch folder in the data root ``root``, downloading the archive first if there is none."""
    found = find(root)
    return found if found is not None else download(data_root(root))


def read_cifar10(root: str | os.PathLike, per_file: int | None = None, *, train_images: int = 0) -> RunData:
    """The 50k training images (or the files holding the first ``train_images`` of them) and the 10k test images,
    validated (no download: call :func:`ensure` first)."""
    folder = find(root)
    if folder is None:
        raise DataError(f"CIFAR-10 not found in {data_root(root)}: put the {CIFAR10_FOLDER} folder there "
                        f"(or point --data.dir / $FASTRES_DATA at it)")
    files = len(TRAIN_FILES)
    if train_images:  # a subset reads only the files it takes images from (a smoke run starts a second sooner)
        files = min(files, -(-train_images // (per_file or PER_FILE)))
    parts = [read_batch(folder / name, per_file) for name in TRAIN_FILES[:files]]
    train = Split(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))
    return RunData(train=train, test=read_batch(folder / TEST_FILE, per_file), num_classes=NUM_CLASSES, mean=MEAN,
                   std=STD)


def read_cifar100(root: str | os.PathLike) -> RunData:
    """CIFAR-100's 50k training and 10k test images with their fine labels (0..99), validated."""
    folder = find(root, CIFAR100_FOLDER)
    if folder is None:
        raise DataError(f"CIFAR-100 not found in {data_root(root)}: put the {CIFAR100_FOLDER} folder (files train, "
                        "test) there (or point --data.dir at the folder holding it)")
    train, test = (read_batch(folder / name, SIZES_100[name], "fine_labels", NUM_CLASSES_100) for name in SIZES_100)
    return RunData(train=train, test=test, num_classes=NUM_CLASSES_100, mean=MEAN_100, std=STD_100)


def train_size(*, val_size: int = 0, subset: int = 0) -> int:
    """How many images :func:`split` trains on from the full set, without reading it."""
    return (subset or len(TRAIN_FILES) * PER_FILE) - val_size


def split(data: RunData, *, val_size: int = 0, split_seed: int = 0, subset: int = 0,
          test_subset: int = 0) -> RunData:
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
    return RunData(train=Split(x, y), test=Split(data.test.x[:nt], data.test.y[:nt]), val=val, **kept)


# ----------------------------------------------------------------------------------------------------
# What a run reads: data.source = cifar10 (data.dir) or synthetic (made in memory).

def synthetic(seed: int = 0, *, train_images: int = 0, test_images: int = 0, side: int = 32) -> RunData:
    """Random uint8 images and labels with CIFAR-10's split sizes and classes, made in memory, ``side`` pixels square
    (CIFAR's 32, or an ImageNet size for throughput): the first ``train_images`` (0: all 50k) and ``test_images``
    (0: all 10k) of one fixed set, so a subset is the full set's first images."""
    def part(n: int, stream: int) -> Split:  # images and labels each from a stream of its own: a prefix is a prefix
        images, labels = (np.random.default_rng([seed, stream, k]) for k in (0, 1))
        return Split(images.integers(0, 256, (n, 3, side, side), dtype=np.uint8),
                     labels.integers(0, NUM_CLASSES, n, dtype=np.int64))
    n_train, n_test = len(TRAIN_FILES) * PER_FILE, PER_FILE  # a larger request gets these, and split() refuses it
    return RunData(num_classes=NUM_CLASSES, mean=MEAN, std=STD, train=part(min(train_images, n_train) or n_train, 0),
                   test=part(min(test_images, n_test) or n_test, 1))
