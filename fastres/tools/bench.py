"""Benchmarks that print ratios: ``python -m fastres.tools.bench [train|loaders|cpu-loaders|sharing|...] [...]``.

The subcommand comes first; with none, ``train``. ``--what NAME`` anywhere (as older command lines and results
files give it) is the same as the subcommand NAME. Each subcommand's options: ``bench NAME --help``; every one
also takes ``--config FILE`` and config overrides ``--section.key=value`` (the keys: ``python -m fastres.train
--help``).

``train`` (configs/fast.toml): train ``--steps`` optimizer steps after ``--warmup`` steps (20; compilation
happens in the warm-up) with the config's loader, model and precision, timed with CUDA events
(device-synchronized on a CPU), and the same for the baseline recipe (configs/baseline.toml) in the
same process. Reports img/s and s/epoch of both, the speed-up, and the fraction of the hardware floor: the
roofline of this model on this device, from the model's FLOPs and activation bytes per image and the
device's bf16 (fp32 on a CPU) matmul rate and copy bandwidth, both measured in the same run.
``--time-to-target`` also trains the config to run.target_acc and records the time (training, and with
evaluation), compile and data-staging seconds. A row per config goes to ``--out`` (results/bench.json),
named ``--label`` (default: the config file's stem; the row also records the whole config).

``loaders`` (configs/bench-loaders.toml): for each loader (workers, gpu, dali host-fed and
device-resident): images/s of the loader alone over full epochs (after a warm-up epoch, median of
``--repeats``), and the training time of the second epoch of a real run with it. Rows to
results/loaders.json, a table of ratios against the gpu loader to results/loaders.md.

``cpu-loaders`` (configs/bench-cpu-loaders.toml): the CPU side of the JPEG path on every core this process may use,
over ``--images`` generated ImageNet-like JPEGs: torchvision's reference loader, fastres's workers loader with each
decoder and DALI on the CPU, the training and the evaluation transform, img/s (median of ``--repeats`` epochs after
a warm-up epoch), img/s a core and each one's ratio to the reference, to ``--out`` (results/loaders-jpeg.md); see
:mod:`fastres.tools.cpuloaders`.

``sharing`` (configs/bench-sharing.toml): ``python -m fastres.train`` with the recipe, alone and beside a busy program,
at torch's default intra-op threads and at fastres's choice (run.threads = 0): img/s and beside/alone of each, to
``--out`` (results/sharing.md); see :mod:`fastres.tools.sharing`.

``scaling`` (configs/fast.toml): the multi-GPU scaling model, written to results/scaling.md; see
:mod:`fastres.tools.scaling`.

``profile`` (configs/fast.toml): where one step's time goes (torch.profiler over ``--steps`` real steps),
written to ``--out``/<label>.txt (default results/profile/); see :mod:`fastres.tools.profile`.

``dispatch`` (configs/fast.toml): host ops per training step outside a captured graph, by source, counted
over ``--steps`` (10) after ``--warmup`` (3, at least 1) steps; see :mod:`fastres.tools.dispatch`. On a CPU
too (it counts, it does not time).

Benchmarks assert no speed: they measure on whatever machine they run and say which.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fastres import config, distributed, log, train
from fastres.build import build
from fastres.config import Config, ConfigError
from fastres.data import fetch, load
from fastres.data.base import Split
from fastres.data.loaders import build_loader, endless
from fastres.errors import entry, read_json, write_text, writing
from fastres.log import read_metrics, short_sha
from fastres.model import build_model
from fastres.step import Timer, precision
from fastres.tools import OVERRIDES, Help, Parser, config_overrides, names, parser, whole_number, whole_numbers
from fastres.tools.cpuloaders import measure as cpu_loaders
from fastres.tools.cpuloaders import table as cpu_loaders_table
from fastres.tools.dispatch import count_host_ops
from fastres.tools.dispatch import report as dispatch_report
from fastres.tools.profile import profile_step
from fastres.tools.scaling import scaling_report
from fastres.tools.sharing import measure as sharing_rows
from fastres.tools.sharing import table as sharing_table

LOADERS = ("workers", "gpu", "dali", "dali-device")
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_CONFIG = {"train": CONFIGS / "fast.toml", "loaders": CONFIGS / "bench-loaders.toml",
                  "cpu-loaders": CONFIGS / "bench-cpu-loaders.toml",
                  "sharing": CONFIGS / "bench-sharing.toml", "scaling": CONFIGS / "fast.toml",
                  "profile": CONFIGS / "fast.toml", "dispatch": CONFIGS / "fast.toml"}
PROG = "python -m fastres.tools.bench"
SUMMARY = {"train": "img/s of training steps, against the baseline and the hardware floor",
           "loaders": "each loader alone and inside a training epoch",
           "cpu-loaders": "JPEG decode and augmentation on the CPU, beside torchvision's reference loader",
           "sharing": "a training process alone and beside a busy program, at two thread choices",
           "scaling": "the multi-GPU scaling model",
           "profile": "where a training step's time goes", "dispatch": "host ops per training step"}  # for --help
BASELINE = CONFIGS / "baseline.toml"
RECIPE_DATA_KEYS = ("--data.loader", "--data.num_workers", "--data.dali_source")  # how, not what, it loads


def _variant(cfg: Config, loader: str) -> Config:
    """``cfg`` with data.loader (and data.dali_source for "dali-device") set for one loader."""
    return config.with_values(cfg, {"data.loader": "dali" if loader.startswith("dali") else loader,
                                    "data.dali_source": "device" if loader == "dali-device" else "host"})


def loader_alone(cfg: Config, split: Split, device: torch.device, repeats: int) -> float:
    """Median images/s of full epochs through the loader alone (one warm-up epoch first)."""
    prec = precision(cfg.precision)
    loader = build_loader(cfg.data, split, batch_per_rank=cfg.optim.batch_size, seed=cfg.run.seed, rank=0,
                          world=1, device=device, channels_last=prec.channels_last, dtype=prec.dtype)
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


def measure_training(cfg: Config, device: torch.device, *, steps: int, warmup: int) -> dict[str, Any]:
    """Images/s of ``steps`` real training steps (everything as fastres.build makes it for training: loader,
    model, optimizer, weight average, step) after ``warmup`` steps; the loader runs across epoch boundaries as it
    would in training, at the scaled lr throughout (no schedule: a fixed number of steps)."""
    torch.manual_seed(cfg.run.seed)
    p = build(cfg, distributed.single(device))
    lr = p.optimizer.param_groups[0]["lr"]

    stream, timer, index = endless(p.loader), Timer(device), 0
    for phase, n in (("warmup", warmup), ("timed", steps)):
        if phase == "timed":
            timer.start()
        for _ in range(n):
            x, y = next(stream)
            p.train_step(x, y, lr=lr, global_step=index)
            index += 1
    seconds = timer.stop()
    step_s = seconds / steps
    del stream  # stops the loader (workers, DALI) before the next measurement
    return dict(img_per_s=steps * cfg.optim.batch_size / seconds, step_s=step_s,
                epoch_s=step_s * (len(p.data.train) // cfg.optim.batch_size), compile_s=p.compile_s)


def hardware_rates(device: torch.device, dtype: torch.dtype, repeats: int = 10) -> dict[str, float]:
    """This device's matmul rate (FLOP/s, in ``dtype``) and copy bandwidth (bytes/s: read + write), measured."""
    timer = Timer(device)
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    timer.start()
    for _ in range(repeats):
        a @ b
    flops = 2 * n ** 3 * repeats / timer.stop()
    big = torch.empty(256 * 2**20 if device.type == "cuda" else 32 * 2**20, dtype=torch.uint8, device=device)
    out = torch.empty_like(big)
    out.copy_(big)
    timer.start()
    for _ in range(repeats):
        out.copy_(big)
    bandwidth = 2 * big.numel() * repeats / timer.stop()
    return dict(matmul_flops=flops, copy_bytes_per_s=bandwidth)


# A training step reads and writes every activation several times: written and read once in the forward,
# read again (saved for backward) and its gradient written and read in the backward: ~5 passes.
ACTIVATION_PASSES = 5


def model_cost(cfg: Config) -> dict[str, float]:
    """FLOPs (forward + backward, counted by torch's FlopCounterMode) and memory traffic per image."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(cfg.model)
    x = torch.randn(2, 3, 32, 32)
    acts = []
    hooks = [m.register_forward_hook(lambda mod, i, o: acts.append(o.numel()))
             for m in model.modules() if not list(m.children())]  # leaves: conv, bn, relu, pool, fc, ...
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    for h in hooks:
        h.remove()
    elem = 2 if cfg.precision.amp in ("bf16", "fp16") else 4
    return dict(flops_per_img=counter.get_total_flops() / 2,
                bytes_per_img=ACTIVATION_PASSES * elem * sum(acts) / 2)


def floor_img_per_s(cost: dict[str, float], hw: dict[str, float]) -> float:
    """Roofline: the images/s the slower of compute and memory traffic allows."""
    return min(hw["matmul_flops"] / cost["flops_per_img"], hw["copy_bytes_per_s"] / cost["bytes_per_img"])


# Public ResNet-50 training rates (img/s per GPU) an ImageNet-sized bench row is printed beside: NVIDIA's
# DeepLearningExamples PyTorch ResNet-50 v1.5 in AMP on an A100; MLPerf Training v4.0's ResNet-50 on 8 H200 (DALI,
# LARS, MXNet), per GPU; and the rate fastres aims at on one H200.
ANCHORS = {"NVIDIA PyTorch ResNet-50, A100 AMP": 2470, "MLPerf v4.0 ResNet-50, H200": 7940,
           "fastres's goal, one H200": 6000}


def bench_train(cfg: Config, cfg_name: str, *, steps: int, warmup: int, time_to_target: bool,
                overrides: list[str], baseline: Path = BASELINE, baseline_overrides: list[str] = ()) -> dict[str, Any]:
    device = distributed.measurement_device(cfg.run)
    git_sha, code_hash = log.git_sha(), log.code_hash()
    fast = measure_training(cfg, device, steps=steps, warmup=warmup)
    # the baseline trains on the same data (dir, subset, split), with its own loader
    same_data = [o for o in overrides if o.startswith("--data.") and o.split("=")[0] not in RECIPE_DATA_KEYS]
    base_cfg = config.with_values(config.load(baseline), overrides=[*same_data, *baseline_overrides])
    base = measure_training(base_cfg, device, steps=steps, warmup=warmup)
    hw = hardware_rates(device, precision(cfg.precision).dtype if device.type == "cuda" else torch.float32)
    cost = model_cost(cfg)
    floor = floor_img_per_s(cost, hw)
    row = dict(what="train", device=log.device_name(device), config_name=cfg_name, world_size=1,
               batch_size=cfg.optim.batch_size, amp=cfg.precision.amp, depth=cfg.model.depth,
               img_per_s=fast["img_per_s"], epoch_s=fast["epoch_s"], step_s=fast["step_s"],
               compile_s=fast["compile_s"], baseline_img_per_s=base["img_per_s"], baseline_epoch_s=base["epoch_s"],
               speedup_vs_baseline=fast["img_per_s"] / base["img_per_s"], floor_img_per_s=floor,
               fraction_of_floor=fast["img_per_s"] / floor, **cost, **hw, steps=steps, warmup_steps=warmup,
               time_to_target_s=None, git_sha=git_sha, code_hash=code_hash, torch_version=torch.__version__,
               timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"), config=config.to_dict(cfg),
               baseline_config=config.to_dict(base_cfg), image_side=cfg.data.side)
    if cfg.model.family == "imagenet" and cfg.model.depth == 50 and cfg.data.side >= 160:
        row["anchors"] = {name: dict(img_per_s=rate, ratio=fast["img_per_s"] / rate) for name, rate in ANCHORS.items()}
    if time_to_target:
        with tempfile.TemporaryDirectory() as tmp:
            s = train.main(config.with_values(cfg, {"run.out_dir": tmp, "run.resume": "never"}))
        row.update(time_to_target_s=s["time_to_target_s"], time_to_target_with_eval_s=s["time_to_target_with_eval_s"],
                   target_acc=s["target_acc"], final_test_acc=s["final_test_acc"], train_time_s=s["train_time_s"],
                   ttt_compile_s=s["compile_s"], staging_s=s["staging_s"], eval_time_s=s["eval_time_s"])
    return row


def train_table(rows: list[dict[str, Any]]) -> str:
    head = ["device", "config", "batch", "amp", "img/s", "s/epoch", "baseline img/s", "speed-up", "floor img/s",
            "of floor", "time to target (s)", "git"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ttt = "-" if r.get("time_to_target_s") is None else f"{r['time_to_target_s']:.2f}"
        cells = [r["device"], r["config_name"], r["batch_size"], r["amp"], f"{r['img_per_s']:,.0f}",
                 f"{r['epoch_s']:.3f}", f"{r['baseline_img_per_s']:,.0f}", f"{r['speedup_vs_baseline']:.2f}x",
                 f"{r['floor_img_per_s']:,.0f}", f"{r['fraction_of_floor']:.1%}", ttt, short_sha(r["git_sha"])]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def bench_loaders(cfg: Config, loaders: list[str], repeats: int) -> list[dict[str, Any]]:
    device = distributed.measurement_device(cfg.run)
    fetch(cfg.data)
    data = load(cfg.data)
    try:
        import nvidia.dali
        dali_version = nvidia.dali.__version__
    except ImportError:
        dali_version = None
    rows, run_id = [], time.strftime("%Y%m%dT%H%M%S")
    git_sha, code_hash = log.git_sha(), log.code_hash()  # the code as started
    for name in loaders:
        if name.startswith("dali") and dali_version is None:
            print(f"bench: skipping {name}: NVIDIA DALI does not import", file=sys.stderr)
            continue
        var = _variant(cfg, name)
        alone = loader_alone(var, data.train, device, repeats)
        e2e = end_to_end_epoch(var)
        rows.append(dict(
            what="loaders", loader=name, device=log.device_name(device), img_per_s=alone,
            epoch_s=e2e["epoch_s"], train_img_per_s=e2e["train_img_per_s"], first_epoch_s=e2e["first_epoch_s"],
            batch_size=cfg.optim.batch_size, images=len(data.train), amp=cfg.precision.amp,
            channels_last=cfg.precision.channels_last, compile=cfg.precision.compile, depth=cfg.model.depth,
            num_workers=cfg.data.num_workers, repeats=repeats, world_size=1, git_sha=git_sha, code_hash=code_hash,
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


TABLES = {  # the commands as the results files have always named them (--what NAME: the subcommand NAME)
    "loaders": ("Loader benchmark", "`python -m fastres.tools.bench --what loaders`. img/s alone: the loader iterating "
                "full epochs by itself; s/epoch: the second epoch of a real training run with it. Ratios are "
                "against the gpu loader of the same bench run.", loader_table),
    "train": ("Training throughput", "`python -m fastres.tools.bench --what train`: img/s of timed training "
              "steps after warm-up (CUDA events), the baseline recipe measured in the same process, and the "
              "fraction of this device's roofline for the model (matmul rate and copy bandwidth measured in the "
              "same run).",
              train_table),
}


def append_rows(path: Path, rows: list[dict[str, Any]], what: str) -> list[dict[str, Any]]:
    """Append to the JSON list at ``path`` and rewrite its markdown table beside it; all rows."""
    with writing(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
    old = read_json(path, list, "results file") if path.exists() else []
    everything = old + rows
    write_text(path, json.dumps(everything, indent=1) + "\n")
    title, intro, table = TABLES[what]
    write_text(path.with_suffix(".md"),
               f"# {title}\n\nRows of `{path.name}`, written by {intro}\n\n" + table(everything))
    return everything


def _paragraph(name: str) -> str:
    """The module docstring's paragraph on subcommand ``name`` (the one starting ``name``), and its last line."""
    paragraphs = __doc__.split("\n\n")
    return "\n\n".join([next(p for p in paragraphs if p.startswith(f"``{name}``")), paragraphs[-1]])


def command_line() -> tuple[Parser, dict[str, Parser]]:
    """The parser (a subcommand per benchmark, each with its own options and defaults) and the subcommands'."""
    top = parser(PROG, __doc__, overrides=True)
    subs = top.add_subparsers(dest="what", metavar="{" + ",".join(DEFAULT_CONFIG) + "}",
                              help="the benchmark (default: train)")
    jobs = {}
    for name, path in DEFAULT_CONFIG.items():
        jobs[name] = subs.add_parser(name, help=SUMMARY[name],
                                     description=_paragraph(name), epilog=OVERRIDES, formatter_class=Help,
                                     allow_abbrev=False)
        jobs[name].add_argument("--config", "-c", default=path, metavar="FILE",
                                help=f"the recipe (default: configs/{path.name})")
    train, loaders, cpu_loaders, sharing, scaling, profile, dispatch = jobs.values()
    for p, out, what in ((train, "results/bench.json", "the rows' JSON list (the .md table beside it)"),
                         (loaders, "results/loaders.json", "the rows' JSON list (the .md table beside it)"),
                         (cpu_loaders, "results/loaders-jpeg.md", "the table (the rows' JSON beside it)"),
                         (sharing, "results/sharing.md", "the table (the rows' JSON beside it)"),
                         (scaling, "results/scaling.md", "the report"),
                         (profile, "results/profile", "the folder of <label>.txt")):
        p.add_argument("--out", type=Path, default=out, metavar="PATH", help=what)
    for p, steps, what in ((train, 100, "timed training steps, each for the config and the baseline"),
                           (scaling, 100, "timed steps of each per-GPU batch"),
                           (profile, 30, "steps timed (step alone, real loop) and profiled"),
                           (dispatch, 10, "loop steps counted")):
        p.add_argument("--steps", type=whole_number(1), default=steps, metavar="N", help=what)
    for p, warmup, low, what in ((train, 20, 0, "untimed steps first (compilation happens there)"),
                                 (scaling, 20, 0, "untimed steps first (compilation happens there)"),
                                 (dispatch, 3, 1, "steps first, not counted (at least 1: it counts steady steps)")):
        p.add_argument("--warmup", type=whole_number(low), default=warmup, metavar="N", help=what)
    for p in (train, profile, dispatch):
        p.add_argument("--label", default="", metavar="NAME",
                       help="the name of the row or report (default: the config file's stem)")
    train.add_argument("--time-to-target", action="store_true",
                       help="also train the config to run.target_acc and record the time")
    train.add_argument("--baseline", type=Path, default=BASELINE, metavar="FILE",
                       help="the config measured in the same process as the baseline (on the same data)")
    train.add_argument("--baseline-override", action="append", default=[], metavar="--SECTION.KEY=VALUE",
                       help="an override for the baseline alone (repeatable; the --data.* overrides reach it anyway)")
    loaders.add_argument("--loaders", type=names(LOADERS), default=",".join(LOADERS), metavar="NAME,NAME",
                         help="the loaders to measure")
    loaders.add_argument("--repeats", type=whole_number(1), default=3, metavar="N",
                         help="epochs of the loader alone after its warm-up epoch (the median is kept)")
    cpu_loaders.add_argument("--images", type=whole_number(100), default=2000, metavar="N",
                             help="generated JPEGs in train/ (a tenth as many in val/)")
    cpu_loaders.add_argument("--repeats", type=whole_number(1), default=2, metavar="N",
                             help="timed epochs of each loader after its warm-up epoch (the median is kept)")
    cpu_loaders.add_argument("--prepared-side", type=whole_number(16), default=256, metavar="N",
                             help="the maximum side of the smaller copy measured beside the originals")
    scaling.add_argument("--gloo-procs", type=whole_numbers(1), default="1,2,4", metavar="N,N",
                         help="the CPU process counts of the gloo all-reduce check")
    return top, jobs


def subcommand_first(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the subcommand argv names, first or as ``--what NAME``/``--what=NAME`` anywhere, or None; the rest of argv,
    as given). ConfigError for a name that is no subcommand."""
    rest = list(argv)
    what = next((i for i, a in enumerate(rest) if a == "--what" or a.startswith("--what=")), None)
    if what is not None:
        arg = rest.pop(what)
        name = arg.split("=", 1)[1] if "=" in arg else (rest.pop(what) if what < len(rest) else "")
        if name not in DEFAULT_CONFIG:
            raise ConfigError(f"--what {name!r} is not one of: {', '.join(DEFAULT_CONFIG)}" if name else
                              f"--what needs a subcommand's name, one of: {', '.join(DEFAULT_CONFIG)}")
        if rest and rest[0] in DEFAULT_CONFIG and rest[0] != name:
            raise ConfigError(f"--what {name} and the subcommand {rest[0]} disagree: give one of them")
        return name, rest[1:] if rest and rest[0] == name else rest
    if rest and not rest[0].startswith("-"):
        if rest[0] not in DEFAULT_CONFIG:
            raise ConfigError(f"subcommand {rest[0]!r} is not one of: {', '.join(DEFAULT_CONFIG)} (see {PROG} --help)")
        return rest[0], rest[1:]
    return None, rest


def help_text(argv: list[str]) -> str:
    """--help's text: the subcommand's when argv names one, the tool's otherwise."""
    top, jobs = command_line()
    try:
        name = subcommand_first(argv)[0]
    except ConfigError:
        name = None
    return (jobs[name] if name else top).format_help()


def without_config(argv: list[str]) -> list[str]:
    """``argv`` less ``--config FILE`` (``--config=FILE``, ``-c FILE``): the flags a report repeats beside it."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in ("--config", "-c"):
            i += 2
            continue
        if not argv[i].startswith("--config="):
            out.append(argv[i])
        i += 1
    return out


def _write_table(out: Path, rows: list[dict], text: str) -> None:
    """``text`` to ``out`` (a markdown table and what made it) and the rows as JSON beside it."""
    with writing(out.parent):
        out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out.with_suffix(".json"), json.dumps(rows, indent=1) + "\n")
    write_text(out, text)


def cli(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return entry(_main, argv, help_text(argv))


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str], list[str]]:
    """(the options of the subcommand ``argv`` names, defaults filled in, ``what`` naming it; its config overrides;
    argv as given less the subcommand)."""
    name, rest = subcommand_first(argv)
    top, jobs = command_line()
    args, left = top.parse_known_args([name or "train", *rest])
    return args, config_overrides(jobs[args.what], left), rest


def _main(argv: list[str]) -> None:
    args, overrides, rest = parse(argv)
    what = args.what
    cfg = config.load(args.config, overrides)
    label = getattr(args, "label", "") or Path(args.config).stem
    if what == "loaders":
        rows = bench_loaders(cfg, args.loaders, repeats=args.repeats)
        append_rows(args.out, rows, "loaders")
        print(loader_table(rows), end="")
    elif what == "train":
        row = bench_train(cfg, label, steps=args.steps, warmup=args.warmup, time_to_target=args.time_to_target,
                          overrides=overrides, baseline=args.baseline, baseline_overrides=args.baseline_override)
        append_rows(args.out, [row], "train")
        print(train_table([row]), end="")
        for name, anchor in row.get("anchors", {}).items():
            print(f"beside {name}: {anchor['img_per_s']:,} img/s: {anchor['ratio']:.2f}x")
    elif what == "cpu-loaders":
        rows = cpu_loaders(cfg, images=args.images, repeats=args.repeats, prepared_side=args.prepared_side)
        text = cpu_loaders_table(rows)
        _write_table(args.out, rows, f"# The CPU side of the JPEG path\n\nWritten by "
                     f"`{' '.join([PROG, 'cpu-loaders', *rest])}` on {rows[0]['device']}, {rows[0]['cores']} "
                     f"cores, torch {rows[0]['torch_version']}, code {short_sha(rows[0]['git_sha'])}: "
                     f"{rows[0]['images']} JPEGs, batch {rows[0]['batch']}, side {rows[0]['side']}.\n\n{text}")
        print(text, end="")
    elif what == "sharing":
        rows = sharing_rows(Path(args.config), overrides)
        text = sharing_table(rows)
        _write_table(args.out, rows, f"# A training process beside a busy program\n\nWritten by "
                     f"`{' '.join([PROG, 'sharing', *rest])}` on {rows[0]['cores']} cores, torch "
                     f"{torch.__version__}, code {short_sha(log.git_sha())}.\n\n{text}")
        print(text, end="")
    elif what == "dispatch":
        counts = count_host_ops(cfg, distributed.measurement_device(cfg.run), steps=args.steps,
                                warmup=args.warmup)
        print(dispatch_report(label, counts), end="")
    elif what == "profile":
        print(profile_step(cfg, distributed.measurement_device(cfg.run), steps=args.steps, label=label,
                           out=args.out), end="")
    else:
        flags = without_config(rest)  # the rest, as the user gave it: the report repeats it
        text = scaling_report(cfg, Path(args.config).stem, steps=args.steps, warmup=args.warmup,
                              gloo_procs=args.gloo_procs, flags=flags)
        with writing(args.out.parent):
            args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text(args.out, text)
        print(text, end="")


if __name__ == "__main__":
    sys.exit(cli())
