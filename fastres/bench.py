"""Benchmarks that print ratios: ``python -m fastres.bench --what loaders [--config X] [--key=value ...]``.

``--what loaders``: for each loader (workers, gpu, dali with host-fed and device-resident images):
- alone: images/s of iterating the loader over a full epoch (after one warm-up epoch), device-synchronized,
  median of ``--repeats`` epochs;
- end to end: the training time of the second epoch (the first warms up and compiles) of a real
  ``fastres.train`` run with that loader, as the trainer itself measures it.
Each loader is one row appended to ``--out`` (default results/loaders.json) with the device, torch and
DALI versions, git SHA and the config, and a table of ratios against the ``gpu`` loader is printed. It
runs on whatever machine it is started on; on a CPU the numbers describe that CPU.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fastres import config, provenance, train
from fastres.config import Config
from fastres.data import build_loader, cifar
from fastres.errors import UserError
from fastres.log import read_metrics
from fastres.report import short_sha
from fastres.timing import Timer

LOADERS = ("workers", "gpu", "dali", "dali-device")
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "bench-loaders.toml"


def _variant(cfg: Config, loader: str) -> Config:
    """``cfg`` with data.loader (and data.dali_source for "dali-device") set for one loader."""
    return config.with_values(cfg, {"data.loader": "dali" if loader.startswith("dali") else loader,
                                    "data.dali_source": "device" if loader == "dali-device" else "host"})


def loader_alone(cfg: Config, split: cifar.Split, device: torch.device, repeats: int) -> float:
    """Median images/s of full epochs through the loader alone (one warm-up epoch first)."""
    dtype = train.AMP_DTYPES[cfg.precision.amp] or torch.float32
    loader = build_loader(cfg.data, split, batch_per_rank=cfg.optim.batch_size, seed=cfg.run.seed, rank=0,
                          world=1, device=device, channels_last=cfg.precision.channels_last, dtype=dtype)
    timer, rates = Timer(device), []
    for epoch in range(repeats + 1):
        loader.set_epoch(epoch)
        timer.start()
        n = 0
        for x, _ in loader:
            n += len(x)
        seconds = timer.stop()
        if epoch:  # epoch 0 warms up (workers start, DALI allocates, kernels load)
            rates.append(n / seconds)
    del loader
    return statistics.median(rates)


def end_to_end_epoch(cfg: Config) -> dict[str, Any]:
    """Train 2 epochs with ``cfg``; the second epoch's training time as fastres.train measures it."""
    with tempfile.TemporaryDirectory() as tmp:
        run = config.with_values(cfg, {"run.out_dir": tmp, "run.epochs": 2, "run.eval_every": 1,
                                       "run.resume": "never"})
        summary = train.main(run)
        rows = read_metrics(tmp)
    epoch_s = rows[1]["train_time_s"] - rows[0]["train_time_s"]
    return dict(epoch_s=epoch_s, train_img_per_s=summary["train_images"] // cfg.optim.batch_size
                * cfg.optim.batch_size / epoch_s, first_epoch_s=rows[0]["train_time_s"])


def bench_loaders(cfg: Config, loaders: list[str], repeats: int) -> list[dict[str, Any]]:
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.run.device != "cpu" else "cpu")
    data = cifar.split(cifar.load(cifar.ensure(cfg.data.dir)), val_size=cfg.data.val_size,
                       split_seed=cfg.data.split_seed, subset=cfg.data.subset, test_subset=cfg.data.test_subset)
    try:
        import nvidia.dali
        dali_version = nvidia.dali.__version__
    except ImportError:
        dali_version = None
    rows, run_id, git_sha = [], time.strftime("%Y%m%dT%H%M%S"), provenance.git_sha()  # the code as started
    for name in loaders:
        if name.startswith("dali") and dali_version is None:
            print(f"bench: skipping {name}: NVIDIA DALI does not import", file=sys.stderr)
            continue
        var = _variant(cfg, name)
        alone = loader_alone(var, data.train, device, repeats)
        e2e = end_to_end_epoch(var)
        rows.append(dict(
            what="loaders", loader=name, device=provenance.device_name(device), img_per_s=alone,
            epoch_s=e2e["epoch_s"], train_img_per_s=e2e["train_img_per_s"], first_epoch_s=e2e["first_epoch_s"],
            batch_size=cfg.optim.batch_size, images=len(data.train), amp=cfg.precision.amp,
            channels_last=cfg.precision.channels_last, compile=cfg.precision.compile, depth=cfg.model.depth,
            num_workers=cfg.data.num_workers, repeats=repeats, world_size=1, git_sha=git_sha,
            torch_version=torch.__version__, dali_version=dali_version,
            run_id=run_id, config=config.to_dict(var)))
        print(f"bench: {name}: {alone:,.0f} img/s alone, {e2e['epoch_s']:.3f} s/epoch end to end", file=sys.stderr)
    return rows


def loader_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of loader rows; ratios against the gpu loader of the same bench run."""
    head = ["device", "loader", "batch", "amp", "images", "img/s alone", "vs gpu", "s/epoch", "vs gpu", "git"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ref = next((g for g in rows if g["loader"] == "gpu" and g["run_id"] == r["run_id"]), None)
        alone = f"{r['img_per_s'] / ref['img_per_s']:.2f}x" if ref else "-"
        epoch = f"{r['epoch_s'] / ref['epoch_s']:.3f}x" if ref else "-"
        cells = [r["device"], r["loader"], r["batch_size"], r["amp"], r["images"], f"{r['img_per_s']:,.0f}", alone,
                 f"{r['epoch_s']:.3f}", epoch, short_sha(r["git_sha"])]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def append_rows(path: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Append to the JSON list at ``path`` and rewrite its markdown table beside it; all rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        old = json.loads(path.read_text()) if path.exists() else []
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}): fix or move it; nothing was written") from None
    everything = old + rows
    path.write_text(json.dumps(everything, indent=1) + "\n")
    path.with_suffix(".md").write_text(
        f"# Loader benchmark\n\nRows of `{path.name}`, written by `python -m fastres.bench --what loaders`. "
        "img/s alone: the loader iterating full epochs by itself; s/epoch: the second epoch of a real "
        "training run with it. Ratios are against the gpu loader of the same bench run.\n\n"
        + loader_table(everything))
    return everything


def cli(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        what = config.take_flag(argv, "--what", "loaders")
        out = Path(config.take_flag(argv, "--out", "results/loaders.json"))
        loaders = [name for name in config.take_flag(argv, "--loaders", ",".join(LOADERS)).split(",") if name]
        repeats = config.take_flag(argv, "--repeats", "3")
        path, overrides = config.parse_args(argv)
        cfg = config.load(path or DEFAULT_CONFIG, overrides)
        if what != "loaders":
            raise UserError(f"--what {what!r} is not one of: loaders")
        unknown = sorted(set(loaders) - set(LOADERS))
        if unknown:
            raise UserError(f"--loaders: unknown {', '.join(unknown)} (valid: {', '.join(LOADERS)})")
        if not repeats.isdigit() or int(repeats) < 1:
            raise UserError(f"--repeats {repeats!r} must be a whole number >= 1")
        rows = bench_loaders(cfg, loaders, repeats=int(repeats))
        append_rows(out, rows)
        print(loader_table(rows), end="")
    except UserError as e:
        print(f"fastres: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
