"""The CPU side of the JPEG path, side by side with the torchvision reference loader on the same cores.

``python -m fastres.tools.bench cpu-loaders`` (configs/bench-cpu-loaders.toml) writes ``--images`` JPEGs of ImageNet's
size distribution and detail (:func:`fastres.tools.jpeg.write_jpegs`: mean about 400 x 350, about 110 KB at quality
90), then, on every core this process may use, measures the training transform's rate (random-resized-crop to
data.image_size, flip, a batch handed over):

- (a) the reference: torchvision's ``ImageFolder`` with transforms.v2 ``RandomResizedCrop``,
  ``RandomHorizontalFlip``, ``ToImage``, ``ToDtype(float32, scale=True)``, a ``DataLoader`` with one worker a core
  and pin_memory where there is a GPU (what torchvision's classification reference runs);
- (b) fastres's workers loader with each decoder (data.decoder);
- (c) DALI on the CPU, where it is installed;
- the reference and (b), (c) again on a copy of the set at a maximum side of ``--prepared-side``
  (:mod:`fastres.tools.resize_folder`, FFCV's lever: fewer pixels to decode);

and the evaluation transform (resize to size / 0.875, centre crop) of the reference and of fastres, over the same
train/ files. Every rate counts batches as the main process receives them, before the copy to the device (fastres
normalizes there; the reference hands float32 over). Each row: img/s (the median of ``--repeats`` epochs after a
warm-up epoch), img/s per core and the ratio to (a); then ``workers vs reference: N.NNx`` (the best workers-loader
decoder on the same files) and, last, ``fastest vs reference: N.NNx (<which>)``. The table goes to ``--out``
(results/loaders-jpeg.md) with the machine it ran on.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fastres import log
from fastres.config import Config, DataCfg, with_values
from fastres.data.base import Files
from fastres.data.folder import EVAL_RESIZE, decode_split, load_folder
from fastres.data.loaders import build_loader
from fastres.distributed import cores
from fastres.tools.jpeg import write_jpegs
from fastres.tools.resize_folder import resize_folder


def rate(epoch: Callable[[int], Iterable], repeats: int) -> float:
    """Images/s of ``epoch(e)``'s batches (an epoch of (images, labels)), the median of ``repeats`` epochs after one
    untimed."""
    rates = []
    for e in range(repeats + 1):
        t0, n = time.perf_counter(), 0
        for x, _ in epoch(e):
            n += len(x)
        if e:
            rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def reference(root: Path, size: int, batch: int, workers: int, train: bool):
    """torchvision's classification-reference loader over ``root``: (train) RandomResizedCrop + flip, or (eval)
    Resize(size / 0.875) + CenterCrop, then ToImage + ToDtype(float32, scale=True)."""
    from torchvision import datasets
    from torchvision.transforms import v2
    steps = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()] if train else \
        [v2.Resize(int(size / 0.875), antialias=True), v2.CenterCrop(size)]
    images = datasets.ImageFolder(str(root / "train"),
                                  transform=v2.Compose([*steps, v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]))
    return torch.utils.data.DataLoader(images, batch_size=batch, shuffle=train, num_workers=workers,
                                       pin_memory=torch.cuda.is_available(), drop_last=train,
                                       persistent_workers=workers > 0)


def measure(cfg: Config, images: int, repeats: int, prepared_side: int = 256) -> list[dict[str, Any]]:
    """The rows (see the module docstring) on a fresh set of ``images`` JPEGs."""
    n_cores, batch, size = cores(), cfg.optim.batch_size, cfg.data.side
    workers = cfg.data.num_workers or n_cores
    cpu = torch.device("cpu")
    rows = []

    def row(name: str, what: str, img_per_s: float) -> None:
        rows.append(dict(name=name, what=what, img_per_s=img_per_s, per_core=img_per_s / n_cores))
    with tempfile.TemporaryDirectory() as tmp:
        root = write_jpegs(Path(tmp) / "jpegs", images, detail=True)
        ref = reference(root, size, batch, workers, train=True)
        row("reference (torchvision ImageFolder + v2)", "train", rate(lambda e: ref, repeats))
        small = Path(tmp) / f"max{prepared_side}"
        resize_folder(root, small, max_side=prepared_side, workers=workers)
        ref_small = reference(small, size, batch, workers, train=True)
        row(f"reference, copy at max side {prepared_side}", "train", rate(lambda e: ref_small, repeats))
        kinds = [("workers", "pil", root), ("workers", "torchvision", root), ("dali", "pil", root),
                 ("workers", "pil", small), ("workers", "torchvision", small), ("dali", "pil", small)]
        for loader, decoder, folder in kinds:
            if loader == "dali" and not _has_dali():
                continue
            data_cfg = with_values(cfg, {"data.dir": str(folder), "data.loader": loader, "data.decoder": decoder,
                                         "data.num_workers": workers}).data
            data = load_folder(data_cfg, Path(tmp) / f"run-{folder.name}")
            if folder == root:
                originals = data.train  # what the evaluation rows read: the reference's files, not the copy
            ld = build_loader(data_cfg, data.train, batch_per_rank=batch, seed=0, rank=0, world=1, device=cpu,
                              norm=(data.mean, data.std))
            name = f"fastres {loader}" + (f", {decoder} decoder" if loader == "workers" else " (CPU)") \
                + (f", copy at max side {prepared_side}" if folder != root else "")
            # the workers' batches as the main process receives them, before the copy to the device (where
            # fastres normalizes): what the reference's DataLoader yields too; DALI's as its pipeline yields them
            row(name, "train", rate(lambda e, ld=ld: (ld.set_epoch(e), _pairs(getattr(ld, "loader", ld)))[1], repeats))
        ev = reference(root, size, batch, workers, train=False)  # over train/, as fastres's evaluation row
        row("reference (torchvision ImageFolder + v2)", "eval", rate(lambda e: ev, repeats))
        row("fastres (decoded once at start)", "eval", _eval_rate(cfg.data, originals, size, workers, repeats))
    base = {r["what"]: r["img_per_s"] for r in rows if r["name"].startswith("reference (")}
    for r in rows:
        r.update(ratio=r["img_per_s"] / base[r["what"]], cores=n_cores, images=images, batch=batch, side=size,
                 device=log.device_name(cpu), torch_version=torch.__version__, git_sha=log.git_sha())
    return rows


def _has_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except ImportError:
        return False


def _pairs(batches: Iterable) -> Iterable:
    return ((b[0], b[1]) for b in batches)


def _eval_rate(cfg: DataCfg, files: Files, size: int, workers: int, repeats: int) -> float:
    """Images/s of fastres's evaluation decode (:func:`fastres.data.folder.decode_split`, data.num_workers processes)
    over the same train/ files as the reference's evaluation row: the transform's cost, on more than val/'s few."""
    cfg = replace(cfg, num_workers=workers)

    def epoch(e: int) -> Iterable:
        split = decode_split(files, cfg, [], size, EVAL_RESIZE)
        return [(split.x, split.y)]
    return rate(epoch, repeats)


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table, then the two summary lines."""
    lines = ["| transform | loader | img/s | img/s a core | vs reference |", "|---|---|---|---|---|"]
    lines += [f"| {r['what']} | {r['name']} | {r['img_per_s']:,.0f} | {r['per_core']:,.0f} | {r['ratio']:.2f}x |"
              for r in rows]
    train_rows = [r for r in rows if r["what"] == "train" and not r["name"].startswith("reference")]
    # the goal's comparison: fastres on the files the reference reads (a smaller copy is a row of its own)
    workers = max((r for r in train_rows if "workers" in r["name"] and "copy" not in r["name"]),
                  key=lambda r: r["ratio"])
    fastest = max(train_rows, key=lambda r: r["ratio"])
    return "\n".join(lines) + (f"\n\nworkers vs reference: {workers['ratio']:.2f}x\n"
                               f"fastest vs reference: {fastest['ratio']:.2f}x ({fastest['name']})\n")
