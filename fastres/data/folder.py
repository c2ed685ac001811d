"""ImageNet-style image folders (data.source = folder): the file index, and decoding with Pillow (the workers
loader and every evaluation split).

``data.dir/train/<class>/*`` and ``data.dir/val/<class>/*``, torchvision's ImageFolder layout; the class index is the
position of the folder name in the sorted train/ listing. A file index (paths, labels, image sizes and modes) is
built once and cached in the run directory (docs/data.md has the rules).
"""

from __future__ import annotations

import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fastres.config import DataCfg
from fastres.data.base import DataError, Files, NotRegular, RunData, Split, open_regular, resolved
from fastres.errors import one_line, shown, signals_held, writing

# ImageNet's channel statistics, as torchvision's references normalize every folder of photographs.
MEAN_IMAGENET = (0.485, 0.456, 0.406)
STD_IMAGENET = (0.229, 0.224, 0.225)

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
INDEX_VERSION = 2  # 2: paths as file-system bytes joined by NUL (a name may hold a newline, or not be UTF-8)
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
        for e in os.scandir(d):
            if _kind(e) == "dir":
                key[f"{sub}/{e.name}"] = e.stat().st_mtime_ns
    return key


def _kind(e: os.DirEntry) -> str:
    """"dir", "file" (regular, links followed), "special" (FIFO, device, socket) or why it cannot be told (a link
    loop, a dangling link, no permission)."""
    try:
        if e.is_dir():
            return "dir"
        if e.is_file():
            return "file"
        e.stat()  # follows a link: raises for one that leads nowhere
        return "special"
    except FileNotFoundError:
        return "is a link to nothing (a dangling link)"
    except OSError as err:
        return f"cannot be read ({err.strerror or type(err).__name__})"


def _scandir(d: Path) -> tuple[list[os.DirEntry], str]:
    """The entries of ``d`` sorted by name, and "" or why it cannot be listed."""
    try:
        return sorted(os.scandir(d), key=lambda e: e.name), ""
    except OSError as err:
        return [], f"is a folder this process cannot list ({err.strerror or type(err).__name__}; chmod makes it " \
                   "readable)"


def _header(path: Path) -> tuple[int, int, str, str]:
    """(width, height, mode, problem) from the file's header alone ("" when it may be decoded)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning: the sides are checked below
            with open_regular(path) as f, Image.open(f) as im:
                (w, h), mode, fmt = im.size, im.mode, im.format
    except NotRegular as e:
        return 0, 0, "", str(e)
    except OSError as e:
        if e.errno is not None:  # the system's: gone, no permission, a link loop (Pillow's own carry no errno)
            return 0, 0, "", f"cannot be read ({e.strerror or type(e).__name__})"
        return 0, 0, "", f"is not an image Pillow can read ({type(e).__name__}: {one_line(e, 80)})"
    except Image.DecompressionBombError:
        return 0, 0, "", f"is over {Image.MAX_IMAGE_PIXELS * 2:,} pixels (a decompression bomb?)"
    except Exception as e:  # noqa: BLE001 - Pillow raises many kinds for a file that is not an image
        return 0, 0, "", f"is not an image Pillow can read ({type(e).__name__}: {one_line(e, 80)})"
    if fmt not in ("JPEG", "MPO", "PNG"):  # MPO: a phone camera's JPEG with more frames after the first
        return w, h, mode, f"is a {fmt} image, not JPEG or PNG"
    if min(w, h) < MIN_SIDE or max(w, h) > MAX_SIDE:
        return w, h, mode, f"is {w}x{h} pixels: sides must be {MIN_SIDE} to {MAX_SIDE:,}"
    return w, h, mode, ""


def _list_split(root: Path, sub: str, classes: list[str] | None) -> tuple[list[str], list[int], list[list[str]]]:
    """(relative paths, labels, [path, problem] pairs) of ``root/sub``; the classes are train/'s when given."""
    base = root / sub
    entries, why = _scandir(base)
    if why:
        raise DataError(f"{shown(base)} {why}")
    names = [e.name for e in entries if _kind(e) == "dir"]
    bad = [[f"{sub}/{e.name}", "is a file outside any class folder" if _kind(e) in ("file", "special") else _kind(e)]
           for e in entries if _kind(e) != "dir"]
    classes = names if classes is None else classes
    label_of = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for name in names:
        if name not in label_of:
            bad.append([f"{sub}/{name}", "is a class folder with no namesake in train/"])
            continue
        found = 0
        inside, why = _scandir(base / name)
        if why:
            bad.append([f"{sub}/{name}", why])
            continue
        for e in inside:
            rel, kind = f"{sub}/{name}/{e.name}", _kind(e)
            if kind == "dir":
                bad.append([rel, "is a folder inside a class folder (the layout is <split>/<class>/<image>)"])
            elif kind == "special":
                bad.append([rel, "is not a regular file (a FIFO, a device or a socket)"])
            elif kind != "file":
                bad.append([rel, kind])
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
    classes = [e.name for e in _scandir(root / "train")[0] if _kind(e) == "dir"]
    if not classes:
        raise DataError(f"{root / 'train'} holds no class folders: data.source = folder needs "
                        f"data.dir/train/<class>/<image> (and val/<class>/<image>)")
    index: dict = {"classes": classes, "bad": []}
    for sub in ("train", "val"):
        paths, labels, bad = _list_split(root, sub, classes)
        pool = ThreadPoolExecutor(16)
        try:
            heads = list(pool.map(_header, (root / rel for rel in paths)))
        finally:  # a signal (or an error) cancels the headers not yet read: a stop does not wait for a million
            pool.shutdown(cancel_futures=True)
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
        arrays[f"{sub}_paths"] = np.frombuffer(b"\0".join(os.fsencode(p) for p in part["paths"]), np.uint8)
        arrays[f"{sub}_modes"] = np.frombuffer("\n".join(part["modes"]).encode(), np.uint8)
        arrays[f"{sub}_labels"] = np.asarray(part["labels"], np.int64)
        arrays[f"{sub}_sizes"] = np.asarray(part["sizes"], np.int64).reshape(-1, 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part.npz")
    with writing(path), signals_held():  # a signal waits until the index is whole (a few MB); a failure leaves none
        try:
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def _read_index(path: Path, key: dict) -> dict | None:
    """The cached index, or None when it is missing, from another folder state, or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
            if meta.get("version") != INDEX_VERSION or meta.get("key") != key:
                return None
            index = {"classes": meta["classes"], "bad": meta["bad"]}
            for sub in ("train", "val"):
                raw, modes = z[f"{sub}_paths"].tobytes(), z[f"{sub}_modes"].tobytes().decode()
                index[sub] = dict(paths=[os.fsdecode(p) for p in raw.split(b"\0")] if raw else [],
                                  modes=modes.split("\n") if modes else [],
                                  labels=z[f"{sub}_labels"], sizes=z[f"{sub}_sizes"])
            if any(len(index[sub]["paths"]) != len(index[sub]["labels"]) for sub in ("train", "val")):
                return None
            return index
    except Exception:  # noqa: BLE001 - damaged (BadZipFile, a bad copy, a run killed mid-write): rebuilt
        return None


def folder_index(root: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> dict:
    """The index of an ImageFolder tree: {"classes", "train", "val", "bad"}; train and val hold paths (relative to
    ``root``), labels, (width, height) sizes and modes; bad is [path, problem] pairs for everything left out.

    Cached as ``cache_dir/file_index.npz``, reused while :func:`_freshness` of the folder is unchanged."""
    root = resolved(root)
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


def folder_root(cfg: DataCfg) -> Path:
    """The image folder: data.dir, or data.dir/data.folder."""
    return resolved(Path(cfg.dir) / cfg.folder)


def load_folder(cfg: DataCfg, cache_dir: str | os.PathLike | None = None, *, eval_side: int = 0,
                eval_ratio: float = EVAL_RESIZE) -> RunData:
    """A folder's training files and its decoded evaluation splits (val/ as "test"; data.val_size held out of
    train/ as "val"); files with problems stop the run, or with data.skip_bad are left out and listed."""
    root = folder_root(cfg)
    index = folder_index(root, cache_dir)
    bad = [f"{shown(root / rel)}: {why}" for rel, why in index["bad"]]
    if bad and not cfg.skip_bad:
        more = f" (and {len(bad) - 1} more problem(s))" if len(bad) > 1 else ""
        raise DataError(f"{bad[0]}{more}: fix or remove it, or set data.skip_bad = true to leave such files out")
    train, test = _files(root, index["train"]), _files(root, index["val"])
    if cfg.augment == "pad-crop" and len(train) and (train.sizes != cfg.side).any():
        i = int(np.flatnonzero((train.sizes != cfg.side).any(1))[0])
        raise DataError(f"data.augment = pad-crop crops images of the side they have, data.image_size = {cfg.side}, "
                        f"but {shown(root / train.paths[i])} is {train.sizes[i][0]}x{train.sizes[i][1]}: set "
                        "data.image_size to the images' side, or use data.augment = rrc")
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
    view = (eval_side or cfg.side, eval_ratio)  # eval.image_size and eval.resize_ratio: FixRes
    val = decode_split(train.take(np.flatnonzero(held)), cfg, skipped, *view) if cfg.val_size else None
    return RunData(train=train.take(np.flatnonzero(~held)), test=decode_split(test, cfg, skipped, *view), val=val,
                   num_classes=len(index["classes"]), mean=MEAN_IMAGENET, std=STD_IMAGENET, skipped=skipped)


def decode_rgb(path: Path, skip_bad: bool = False, instead: str = "train on a grey image in its place"
               ) -> Image.Image | None:
    """The file as an RGB image (grayscale, palette, CMYK and alpha converted as Pillow converts them). A file
    that does not decode (or is gone, or is no longer a regular file) is a DataError naming it, which says what
    data.skip_bad does ``instead``; with ``skip_bad``, None."""
    try:
        with open_regular(path) as f, Image.open(f) as im:
            im.load()  # decodes it all: a truncated file raises here
            return im if im.mode == "RGB" else im.convert("RGB")  # an RGB file needs no copy
    except Exception as e:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, ... for a bad file
        if not skip_bad:
            if isinstance(e, OSError) and e.errno is not None:  # the system's, not Pillow's verdict on the bytes
                raise DataError(f"{shown(path)} cannot be read ({e.strerror}): it changed after the file index "
                                f"was built; restore it, or start again to re-index the folder, or set data.skip_bad "
                                f"= true to {instead}") from None
            raise DataError(f"{shown(path)} cannot be decoded ({type(e).__name__}: {one_line(e, 80)}): replace or "
                            f"remove it, or set data.skip_bad = true to {instead}") from None
    return None


def grey(size: tuple[int, int]) -> Image.Image:
    """data.skip_bad's stand-in for a file that does not decode: a grey image of its (width, height)."""
    return Image.new("RGB", (int(size[0]), int(size[1])), (GREY,) * 3)


def crop_resize_pil(img: Image.Image, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """The (top, left, height, width) box of ``img`` resized to size x size (Pillow's bilinear with its
    antialiasing: torchvision's PIL path, crop then resize); uint8 (size, size, 3), Pillow's own layout."""
    top, left, h, w = box
    # FIXME: resize(..., box=) crops and resizes in one call but reads past the box's edge: 3% faster (measured in
    # results/loaders-jpeg.md's README), not torchvision's pixels; kept as crop then resize
    return np.asarray(img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------
# torchvision's decoders (data.decoder = torchvision in the workers loader; the gpu loader's nvJPEG): imported when
# one is used, so fastres runs without torchvision otherwise.

TORCHVISION_INSTALL = ("install the torchvision that pairs with your torch (bash launch/install.sh does), or use "
                       "data.decoder = pil")


def import_torchvision():
    """(torchvision.io, torchvision.transforms.v2.functional); a UserError saying how to install it if it does not
    import (absent, or built for another torch)."""
    # FIXME: torchvision 0.29 deprecates its image decoders for TorchCodec's; they stay until torchvision drops them,
    # said once in docs/layout.md rather than on every call
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are "
                            "deprecated", category=DeprecationWarning)
    try:
        import torchvision.io as tv_io
        import torchvision.transforms.v2.functional as tv_f
    except Exception as e:  # noqa: BLE001 - a torchvision built for another torch raises RuntimeError at import
        raise DataError(f"a torchvision decoder was asked for but torchvision does not import ({one_line(e, 100)}): "
                        f"{TORCHVISION_INSTALL}") from None
    return tv_io, tv_f


def file_bytes(path: Path) -> torch.Tensor:
    """A file's bytes, uint8 1-D; empty when it is gone, unreadable or no longer a regular file (the decoders then
    fail, and Pillow names the file)."""
    try:
        with open_regular(path) as f:
            return torch.from_numpy(np.fromfile(f, dtype=np.uint8))
    except OSError:
        return torch.empty(0, dtype=torch.uint8)


def decode_tv(data: torch.Tensor, path: Path, size: tuple[int, int]) -> tuple[torch.Tensor, bool]:
    """A file's bytes (uint8, 1-D) decoded by torchvision.io (libjpeg-turbo or libpng: Pillow's pixels for 8-bit
    files) as uint8 RGB (3, H, W), and whether it decoded; 16-bit images through Pillow's conversion, as the other
    loaders; a file neither decodes is data.skip_bad's grey image of its (width, height) ``size``."""
    tv_io, _ = import_torchvision()
    try:
        x = tv_io.decode_image(data, mode=tv_io.ImageReadMode.RGB)
        if x.dtype == torch.uint8:
            return x, True
    except RuntimeError:
        pass  # Pillow decides whether the file is bad, as for every loader
    img = decode_rgb(path, skip_bad=True)
    return torch.from_numpy(np.asarray(grey(size) if img is None else img, dtype=np.uint8).transpose(2, 0, 1).copy()), \
        img is not None


def crop_resize_tv(x: torch.Tensor, box: tuple[int, int, int, int], size: int, flip: int) -> torch.Tensor:
    """:func:`crop_resize_pil` for a uint8 (3, H, W) tensor on any device: torchvision's tensor resize (bilinear,
    antialiased), rounded to uint8."""
    _, tv_f = import_torchvision()
    top, left, h, w = box
    pads = (max(0, -left), max(0, left + w - x.shape[-1]), max(0, -top), max(0, top + h - x.shape[-2]))
    if any(pads):  # a pad-crop window over the edge: zeros there, as CIFAR's pad (and Pillow's crop) give
        x, top, left = torch.nn.functional.pad(x, pads), top + pads[2], left + pads[0]
    x = tv_f.resize(x[:, top:top + h, left:left + w], [size, size], antialias=True)
    return x.flip(-1) if flip else x


def eval_transform(img: Image.Image, size: int, ratio: float = EVAL_RESIZE) -> np.ndarray:
    """torchvision's evaluation transform: shorter side to int(size / ratio) (256 for 224 at 0.875), centre crop;
    uint8 (3, size, size)."""
    w, h = img.size
    short = int(size / ratio)
    nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    img = img.resize((nw, nh), Image.BILINEAR)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


class _EvalImages(Dataset):
    def __init__(self, files: Files, size: int, ratio: float):
        self.files, self.size, self.ratio = files, size, ratio

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        img = decode_rgb(self.files.root / self.files.paths[i], skip_bad=True)
        if img is None:  # the main process names it (or skips it): an error raised here would be a traceback
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), False
        return torch.from_numpy(eval_transform(img, self.size, self.ratio)), True


def decode_split(files: Files, cfg: DataCfg, skipped: list[str], side: int, ratio: float) -> Split:
    """Evaluation images decoded once (data.num_workers processes): uint8 (N, 3, side, side), :func:`eval_transform`.
    A file that does not decode stops with its name, or with data.skip_bad is left out and appended to ``skipped``."""
    loader = DataLoader(_EvalImages(files, side, ratio), batch_size=64,
                                         num_workers=min(cfg.num_workers, os.cpu_count() or 1))
    parts = list(loader)
    x = torch.cat([p[0] for p in parts]).numpy()
    ok = torch.cat([p[1] for p in parts]).numpy().astype(bool)
    for i in np.flatnonzero(~ok):
        decode_rgb(files.root / files.paths[i], skip_bad=cfg.skip_bad,  # raises the one line unless skip_bad
                   instead="leave it out of evaluation")
        skipped.append(f"{shown(files.root / files.paths[i])}: cannot be decoded")
    return Split(np.ascontiguousarray(x[ok]), files.y[ok])
