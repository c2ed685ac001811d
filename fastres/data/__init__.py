"""The data a run reads, by data.source: CIFAR-10 and CIFAR-100 (fastres/data/cifar.py), synthetic images of
CIFAR-10's shape (ibid.) and ImageNet-style folders (fastres/data/folder.py), each a :class:`RunData`
(fastres/data/base.py); the training loaders are in fastres/data/loaders.py.
"""

from __future__ import annotations

import os

from fastres.config import DataCfg
from fastres.data import cifar, folder
from fastres.data.base import RunData


def fetch(cfg: DataCfg, cache_dir: str | os.PathLike | None = None) -> None:
    """Download CIFAR-10/100 into data.dir unless it is there; for a folder, build (or refresh) its file index in
    ``cache_dir``. Call on one rank; the others wait."""
    if cfg.source == "cifar10":
        cifar.ensure(cfg.dir)
    elif cfg.source == "cifar100" and cifar.find(cfg.dir, cifar.CIFAR100_FOLDER) is None:
        cifar.download(cifar.data_root(cfg.dir), cifar.URL_100, cifar.MD5_100, folder=cifar.CIFAR100_FOLDER)
    elif cfg.source == "folder":
        folder.folder_index(folder.folder_root(cfg), cache_dir)


def load(cfg: DataCfg, cache_dir: str | os.PathLike | None = None, *, eval_side: int = 0,
         eval_ratio: float = folder.EVAL_RESIZE) -> RunData:
    """The splits ``cfg`` names (train, test, and val when data.val_size); :func:`fetch` first. A folder's evaluation
    splits are decoded at ``eval_side`` (0: data.image_size) from a resize to side / ``eval_ratio``."""
    if cfg.source == "folder":
        return folder.load_folder(cfg, cache_dir, eval_side=eval_side, eval_ratio=eval_ratio)
    if cfg.source == "synthetic":
        data = cifar.synthetic(cfg.split_seed, train_images=cfg.subset, test_images=cfg.test_subset, side=cfg.side)
    elif cfg.source == "cifar100":
        data = cifar.read_cifar100(cfg.dir)
    else:
        data = cifar.read_cifar10(cfg.dir, train_images=cfg.subset)
    return cifar.split(data, val_size=cfg.val_size, split_seed=cfg.split_seed, subset=cfg.subset,
                       test_subset=cfg.test_subset)
