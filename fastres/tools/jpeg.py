"""JPEG decode + augmentation throughput of every folder loader: ``python -m fastres.tools.jpeg [...]``.

Writes ``--images`` JPEGs of ImageNet's size distribution (sides log-normal around 400 x 350, aspect 3:4 to
4:3, quality 90, in 10 class folders) to a temporary folder, then for each folder loader - workers (Pillow, one
process per core), workers with torchvision's decoder, gpu (torchvision's batched nvJPEG on a GPU; its CPU decoder
without one) and dali (nvJPEG "mixed" on a GPU, "cpu" without one) - measures:
- the loader alone: images/s over ``--epochs`` epochs after a warm-up epoch (random-resized-crop to
  ``--size``, flip, normalize, batch on the device), median over epochs;
- ResNet-``--depth`` training with it: img/s of ``--steps`` SGD steps after 3 warm-up steps (bf16 autocast and
  channels_last on a GPU), device-synchronized.
Rows go to ``--out`` (JSON lines, default results/jpeg.json) and a ratio table to stdout.

    python -m fastres.tools.jpeg [--images 2000] [--size 224] [--batch 128] [--depth 50] [--width 64]
        [--steps 30] [--epochs 2] [--workers N (default: every core)] [--out results/jpeg.json]

Benchmarks assert no speed: they measure on whatever machine they run and say which.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fastres import distributed, log
from fastres.config import DataCfg, ModelCfg, RunCfg
from fastres.data.folder import load_folder
from fastres.data.loaders import build_loader
from fastres.errors import writing
from fastres.model import build_model
from fastres.step import Timer
from fastres.tools import Parser, parser, tool_cli, whole_number

CLASSES = 10


# detail at three scales (period in pixels, weight): smooth regions, edges, grain; at quality 90 and ImageNet's
# sizes the files come out near ImageNet's mean of about 110 KB, so decoding costs what it costs there
DETAIL = ((32, 0.5), (4, 0.25), (1, 0.25))


def write_jpegs(root: Path, n: int, seed: int = 0, detail: bool = False) -> Path:
    """``n`` JPEGs in train/ (and n // 10 in val/), sized like ImageNet's photographs (mean about 400 x 350) and, with
    ``detail``, about as large as its files (quality 90); without, smooth (about 40 KB)."""
    g = np.random.default_rng(seed)
    for sub, count in (("train", n), ("val", max(CLASSES, n // 10))):
        for k in range(count):
            w = int(np.clip(g.lognormal(np.log(400), 0.25), 64, 2000))
            h = int(np.clip(w / np.exp(g.uniform(np.log(3 / 4), np.log(4 / 3))), 64, 2000))
            img = _picture(g, w, h, DETAIL if detail else ((16, 1.0),))
            path = root / sub / f"c{k % CLASSES}" / f"{k}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path, "JPEG", quality=90)
    return root


def _picture(g: np.random.Generator, w: int, h: int, scales: tuple[tuple[int, float], ...]) -> Image.Image:
    """Random colour at each (period, weight) scale, upsampled bicubically and summed: a w x h RGB image."""
    out = np.zeros((h, w, 3), np.float32)
    for period, weight in scales:
        small = g.integers(0, 256, (max(2, h // period), max(2, w // period), 3), dtype=np.uint8)
        out += weight * np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.float32)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def loader_alone(ld, epochs: int) -> float:
    """Images/s of the loader by itself (batches synchronized on the device), median over epochs after one."""
    rates = []
    for e in range(epochs + 1):
        ld.set_epoch(e)
        t0, n = time.perf_counter(), 0
        for x, _ in ld:
            n += len(x)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        if e:
            rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def train_rate(ld, model_cfg: ModelCfg, steps: int, device: torch.device) -> float:
    """Training img/s of ResNet on the loader's batches: SGD steps after 3 warm-up ones, device-synchronized."""
    model = build_model(model_cfg).to(device, memory_format=torch.channels_last if device.type == "cuda" else
                                      torch.contiguous_format)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    timer, done, epoch, images = Timer(device), 0, 0, 0
    while done < steps + 3:
        ld.set_epoch(epoch)
        for x, y in ld:
            if done == 3:
                timer.start()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            images += len(y) if done > 3 else 0
            if done == steps + 3:
                break
        epoch += 1
    return images / timer.stop()


def measure(args: dict[str, Any]) -> list[dict[str, Any]]:
    device = distributed.measurement_device(RunCfg())
    kinds = [("workers", "pil")]
    try:
        import torchvision.io  # noqa: F401 - measured only where it imports
        kinds += [("workers", "torchvision"), ("gpu", "torchvision")]
    except Exception:  # noqa: BLE001 - absent, or built for another torch
        print("jpeg: skipping torchvision's decoders: torchvision does not import", file=sys.stderr)
    try:
        import nvidia.dali  # noqa: F401 - measured only where it imports
        kinds.append(("dali", "dali"))
    except ImportError:
        print("jpeg: skipping dali: NVIDIA DALI does not import", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = write_jpegs(Path(tmp) / "jpegs", args["images"])
        for kind, decoder in kinds:
            cfg = DataCfg(dir=str(root), source="folder", loader=kind, image_size=args["size"],
                          num_workers=args["workers"], decoder="torchvision" if kind == "workers" and
                          decoder == "torchvision" else "pil")
            data = load_folder(cfg, Path(tmp) / "run")
            ld = build_loader(cfg, data.train, batch_per_rank=args["batch"], seed=0, rank=0, world=1, device=device,
                              channels_last=device.type == "cuda", norm=(data.mean, data.std))
            model_cfg = ModelCfg(family="imagenet", depth=args["depth"], width=args["width"], num_classes=CLASSES)
            on_gpu = device.type == "cuda" and kind in ("dali", "gpu")  # nvJPEG: DALI's "mixed", torchvision's
            rows.append(dict(what="jpeg", loader=kind, decoder=f"{decoder} ({'nvJPEG' if on_gpu else 'CPU'})",
                             device=log.device_name(device),
                             images=len(data.train), image_size=args["size"], batch_size=args["batch"],
                             workers=args["workers"], depth=args["depth"], width=args["width"],
                             loader_img_per_s=loader_alone(ld, args["epochs"]),
                             train_img_per_s=train_rate(ld, model_cfg, args["steps"], device),
                             git_sha=log.git_sha(), torch_version=torch.__version__))
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    base = rows[0]
    lines = ["| loader | decoder | device | loader img/s | x workers | train img/s | x workers |", "|---" * 7 + "|"]
    for r in rows:
        lines.append(f"| {r['loader']} | {r['decoder']} | {r['device']} | {r['loader_img_per_s']:,.0f} | "
                     f"{r['loader_img_per_s'] / base['loader_img_per_s']:.2f}x | {r['train_img_per_s']:,.1f} | "
                     f"{r['train_img_per_s'] / base['train_img_per_s']:.2f}x |")
    return "\n".join(lines) + "\n"


def command_line() -> Parser:
    p = parser("python -m fastres.tools.jpeg", __doc__)
    for flag, default, what in (("images", 2000, "JPEGs written to train/ (a tenth as many to val/)"),
                                ("size", 224, "the side random-resized-crop makes"), ("batch", 128, "images a batch"),
                                ("depth", 50, "ResNet depth of the training measurement"),
                                ("width", 64, "ResNet width (channels of the first stage)"),
                                ("steps", 30, "timed training steps (after 3 untimed)"),
                                ("epochs", 2, "timed epochs of the loader alone (after a warm-up epoch)"),
                                ("workers", distributed.cores(), "loader processes: every core this process may use")):
        p.add_argument(f"--{flag}", type=whole_number(1), default=default, metavar="N", help=what)
    p.add_argument("--out", type=Path, default="results/jpeg.json", metavar="FILE", help="the rows, appended")
    return p


def main(argv: list[str]) -> list[dict[str, Any]]:
    args = vars(command_line().parse_args(argv))
    out = args.pop("out")
    rows = measure(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    with writing(out), open(out, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(table(rows))
    return rows


def cli(argv: list[str] | None = None) -> int:
    return tool_cli(main, command_line, argv)


if __name__ == "__main__":
    sys.exit(cli())
