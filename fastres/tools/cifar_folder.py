"""CIFAR-10 written as an image folder: ``python -m fastres.tools.cifar_folder --out DIR [--subset N] [...]``.

Reads CIFAR-10 as a run does (``--data-dir``, else $FASTRES_DATA, else data; checked, downloaded if missing) and
writes every training image to ``DIR/train/<class>/<index>.png`` and every test image to
``DIR/val/<class>/<index>.png``: lossless PNGs, so a folder run sees the pickle run's pixels. The class folders
are CIFAR-10's label names, which sort in label order (airplane, automobile, ..., truck), so ImageFolder's
indices are CIFAR's labels.

It is how the folder path is checked against the pickle path (tests/test_folder.py): trained through
``data.source = folder`` with CIFAR's augmentation (``data.augment = pad-crop``, ``data.image_size = 32``,
``eval.resize_ratio = 1``: the test images as they are) and the CIFAR ResNet, a run reaches the pickle run's
accuracy within seed noise.

    python -m fastres.tools.cifar_folder --out data/cifar10-folder [--subset 5000] [--test-subset 1000]
    python -m fastres.train --data.source=folder --data.dir=data/cifar10-folder --data.augment=pad-crop \\
        --data.image_size=32 --eval.resize_ratio=1 --data.loader=workers
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from fastres.data import cifar
from fastres.errors import UserError, writing
from fastres.tools import Parser, parser, tool_cli, whole_number

# CIFAR-10's label names (batches.meta), in label order, which is also their sorted order
LABEL_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def write_split(x: np.ndarray, y: np.ndarray, folder: Path, names: tuple[str, ...]) -> int:
    """uint8 (N, 3, 32, 32) images as folder/<class>/<index>.png; how many were written."""
    for name in names:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(x, y)):
        Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0))).save(folder / names[label] / f"{i:05d}.png")
    return len(y)


def write_folder(data_dir: str | os.PathLike, out: Path, *, subset: int = 0, test_subset: int = 0) -> dict[str, int]:
    """CIFAR-10 from ``data_dir`` (downloaded there if missing) as ``out/train`` and ``out/val``: the first
    ``subset`` training and ``test_subset`` test images (0: all); {"train": n, "val": m}."""
    batches = cifar.ensure(data_dir)
    data = cifar.split(cifar.read_cifar10(batches, train_images=subset), subset=subset, test_subset=test_subset)
    names = LABEL_NAMES
    with writing(out):
        return {"train": write_split(data.train.x, data.train.y, out / "train", names),
                "val": write_split(data.test.x, data.test.y, out / "val", names)}


def command_line() -> Parser:
    p = parser("python -m fastres.tools.cifar_folder", __doc__)
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the image folder to write (train/, val/)")
    p.add_argument("--data-dir", default=os.environ.get("FASTRES_DATA") or "data", metavar="DIR",
                   help="the data root holding cifar-10-batches-py ($FASTRES_DATA, else data)")
    p.add_argument("--subset", type=whole_number(0), default=0, metavar="N",
                   help="the first N training images; 0: all")
    p.add_argument("--test-subset", type=whole_number(0), default=0, metavar="N",
                   help="the first N test images; 0: all")
    return p


def main(argv: list[str]) -> dict[str, int]:
    args = command_line().parse_args(argv)
    if (args.out / "train").exists() or (args.out / "val").exists():
        raise UserError(f"{args.out} holds train/ or val/ already: choose another --out, or remove them")
    counts = write_folder(args.data_dir, args.out, subset=args.subset, test_subset=args.test_subset)
    print(f"cifar_folder: {counts['train']} training and {counts['val']} test images as PNGs in {args.out}")
    return counts


def cli(argv: list[str] | None = None) -> int:
    return tool_cli(main, command_line, argv)


if __name__ == "__main__":
    sys.exit(cli())
