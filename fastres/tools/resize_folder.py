"""A smaller copy of an image folder: ``python -m fastres.tools.resize_folder SRC --out DIR [--max-side 256] [...]``.

Decoding is most of a CPU loader's cost, and it grows with the pixels of the file, not of the crop: a 400 x 350
photograph costs about 2.4 times one of 256 x 224. FFCV stores ImageNet once at a maximum side of 256-512 for that
reason. This writes every image that a run of ``--data.dir SRC`` trains and evaluates on (the folder's own index:
the same classes, files and checks) to ``DIR/train/<class>/`` and ``DIR/val/<class>/`` under the same names, its
longer side at most ``--max-side`` (Pillow's bilinear with antialiasing, after JPEG's DCT-domain reduction where it
shrinks 2x or more), in its own format (JPEG at ``--quality``); files already that small are copied byte for byte.
A run then trains on it with ``--data.dir DIR``, which indexes it as any folder.

What it costs in accuracy depends on the training side: random-resized crops of a 256-side image are upsampled to
224 more often than crops of the original. results/loaders-jpeg.md measures the loaders on both.

    python -m fastres.tools.resize_folder data/imagenet --out data/imagenet-256 --max-side 256 [--quality 90]
        [--workers N (default: every core)]

A file that does not decode is left out and named (a run with data.skip_bad would leave it out too). The copy is
written under ``DIR.partial`` and renamed to DIR when complete: an interrupted copy is never taken for a whole one.
"""

from __future__ import annotations

import shutil
import sys
from multiprocessing import get_context
from pathlib import Path

from PIL import Image

from fastres.data.folder import folder_index
from fastres.distributed import cores
from fastres.errors import UserError, shown, writing
from fastres.tools import Parser, parser, tool_cli, whole_number


def shrink(src: Path, dst: Path, max_side: int, quality: int) -> str | None:
    """``src`` written to ``dst`` with its longer side at most ``max_side``; None, or why it could not be."""
    try:
        with Image.open(src) as im:
            w, h = im.size
            if max(w, h) <= max_side:
                shutil.copyfile(src, dst)  # small enough: the original bytes, no second JPEG loss
                return None
            scale = max_side / max(w, h)
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            fmt = im.format
            im.draft("RGB", size)  # JPEG: decode at 1/2, 1/4 or 1/8 in the DCT domain, never below size
            img = im.convert("RGB").resize(size, Image.BILINEAR)
        img.save(dst, fmt, **({"quality": quality} if fmt in ("JPEG", "WEBP") else {}))  # a PNG stays lossless
        return None
    except Exception as e:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, ... for a bad file
        return f"{type(e).__name__}: {e}"


def _job(args: tuple[str, str, int, int]) -> tuple[str, str | None]:
    src, dst, max_side, quality = args
    return src, shrink(Path(src), Path(dst), max_side, quality)


def resize_folder(src: Path, out: Path, *, max_side: int, quality: int = 90, workers: int = 1) -> dict:
    """The copy (see the module docstring); {"train": n, "val": m, "left_out": [(path, why), ...]}."""
    index = folder_index(src)  # the files a run reads, as it reads them (class discovery, the skipped)
    partial = out.with_name(out.name + ".partial")
    jobs, counts = [], {}
    with writing(out.parent):
        if partial.exists():
            shutil.rmtree(partial)  # what an interrupted copy left
        for sub in ("train", "val"):
            paths = list(index[sub]["paths"])
            counts[sub] = len(paths)
            for rel in paths:
                (partial / rel).parent.mkdir(parents=True, exist_ok=True)
                jobs.append((str(src / rel), str(partial / rel), max_side, quality))
        with get_context("spawn").Pool(max(1, workers)) as pool:
            failed = [(path, why) for path, why in pool.imap_unordered(_job, jobs, chunksize=16) if why]
        partial.rename(out)
    return {**counts, "left_out": failed}


def command_line() -> Parser:
    p = parser("python -m fastres.tools.resize_folder", __doc__)
    p.add_argument("src", type=Path, metavar="SRC", help="the image folder (train/, val/) to copy")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="the smaller copy to write, which must not exist (required)")
    p.add_argument("--max-side", type=whole_number(16), default=256, metavar="N", help="the longer side, at most")
    p.add_argument("--quality", type=whole_number(1), default=90, metavar="Q", help="JPEG quality of resized files")
    p.add_argument("--workers", type=whole_number(1), default=cores(), metavar="N",
                   help="processes: every core this process may use")
    return p


def main(argv: list[str]) -> dict:
    args = command_line().parse_args(argv)
    if args.quality > 100:
        raise UserError(f"--quality {args.quality} is above JPEG's 100: choose 1..100 (90 is FFCV's and ours)")
    if args.out.exists():
        raise UserError(f"{args.out} exists: choose another --out, or remove it")
    done = resize_folder(args.src, args.out, max_side=args.max_side, quality=args.quality, workers=args.workers)
    for path, why in done["left_out"]:
        print(f"resize_folder: left out {shown(path)}: {why}", file=sys.stderr)
    print(f"resize_folder: {done['train']} training and {done['val']} validation images at most {args.max_side} "
          f"pixels a side in {args.out}" + (f" ({len(done['left_out'])} left out)" if done["left_out"] else ""))
    return done


def cli(argv: list[str] | None = None) -> int:
    return tool_cli(main, command_line, argv)


if __name__ == "__main__":
    sys.exit(cli())
