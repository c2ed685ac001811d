"""Everything a run trains with, built in one place: ``build(cfg, dist) -> Parts``.

fastres.train and the measuring tools (fastres.tools.bench, .scaling, .profile, .dispatch) build through here, so
a benchmark times what training runs.
Order matters and is kept here once: data and loader (staging_s), model, optimizer, schedule and scaler; then a
checkpoint's state or LSUV; then the weight average, DDP, and last the step (compiled, captured: compile_s).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from fastres import checkpoint, distributed, rng
from fastres.config import Config, DataCfg
from fastres.data import Cifar10, Split, fetch, load, normalize
from fastres.data.loaders import Loader, build_loader
from fastres.distributed import Dist
from fastres.errors import UserError
from fastres.evaluate import Sets, evaluate_all
from fastres.model import Precision, ResNetCifar, build_model, lsuv_, precision
from fastres.optim import Schedule, WeightEMA, build_optimizer, build_schedule
from fastres.step import Step, build_step


@dataclass
class Parts:
    data: Cifar10  # the splits, in host memory
    loader: Loader  # this rank's training batches
    evals: Sets  # what each evaluation scores: {"test" and/or "val": (uint8 images, labels) on the device}
    model: ResNetCifar
    net: torch.nn.Module  # the model, or DDP around it with more than one rank
    optimizer: torch.optim.SGD
    schedule: Schedule  # lr as a function of the optimizer step
    scaler: torch.amp.GradScaler
    ema: WeightEMA | None
    evaluate: Callable[[Sets], tuple[dict[str, float], dict[str, float]]]  # one evaluation: see evaluate_all
    step: Step  # step(x, y, lr, index)
    prec: Precision
    micro_batch: int  # the images one forward sees: what BatchNorm normalizes over
    staging_s: float  # read, validate, split, copy to the device, build the loader
    compile_s: float  # compile, its warm-up, the step graph's capture
    lsuv: list[dict[str, Any]] | None  # LSUV's per-layer records (model.init = lsuv, a fresh run, rank 0)
    notes: list[str]  # what the build changed from the config, for the log (once)


def build(cfg: Config, dist: Dist, state: dict[str, Any] | None = None) -> Parts:
    """The parts of a run of ``cfg`` on this rank; with ``state`` (fastres.checkpoint.load of the run's
    checkpoint) the model, optimizer, scaler, global RNGs and weight average continue from it."""
    dev, world = dist.device, dist.world
    prec = precision(cfg.precision)
    batch_per_rank = cfg.optim.batch_size // world
    micro = batch_per_rank // cfg.optim.accum_steps
    t_staging = time.perf_counter()
    if dist.is_main:
        fetch(cfg.data)  # downloads once, on rank 0
    distributed.barrier()
    data = load(cfg.data)
    _check_labels(data, cfg.model.num_classes)
    data_cfg, notes = _workers_that_fit(cfg.data)
    if note := checkpoint.world_note(state, world):  # the same global batch, split over another number of ranks
        notes.append(note)
    loader = build_loader(data_cfg, data.train, batch_per_rank=batch_per_rank, seed=cfg.run.seed, rank=dist.rank,
                          world=world, device=dev, channels_last=prec.channels_last, dtype=prec.dtype)
    evals = {name: (torch.from_numpy(s.x).to(dev), torch.from_numpy(s.y).to(dev))
             for name, s in (("test", data.test if cfg.eval.on_test else None), ("val", data.val)) if s is not None}
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    staging_s = time.perf_counter() - t_staging

    model = build_model(cfg.model).to(dev, memory_format=prec.memory_format)
    opt = build_optimizer(model, cfg.optim)
    schedule = build_schedule(cfg.optim, len(loader), cfg.run.epochs)
    scaler = torch.amp.GradScaler(dev.type, enabled=cfg.precision.amp == "fp16")
    lsuv_records = None
    path = Path(cfg.run.out_dir) / checkpoint.NAME
    if state is not None:
        checkpoint.restore(path, state, model, opt, scaler)
    elif cfg.model.init == "lsuv":  # data-driven init on rank 0, then every rank takes its weights
        if dist.is_main:
            lsuv_records = lsuv_(model, _random_batches(data.train, micro, cfg.run.seed, dev, prec),
                                 tol_var=cfg.model.lsuv_tol_var, t_max=cfg.model.lsuv_t_max)
        distributed.broadcast_state(model)
    ema = WeightEMA(model, cfg.optim.ema_decay) if cfg.optim.ema_decay else None  # from the starting weights
    if ema is not None and state is not None:
        checkpoint.restore_ema(path, state, ema)
    net = model
    if world > 1:  # a dropped block leaves its parameters unused on every rank that step
        # No broadcast_buffers: BN's running statistics are read only by evaluation, which hands every rank rank 0's
        # first (train.py), and training normalizes with batch statistics; re-sending them before every forward
        # changed nothing but cost a broadcast per buffer per step (2 ranks still equal 1 process: test_train.py).
        net = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None, broadcast_buffers=False,
                  find_unused_parameters=cfg.model.stochastic_depth > 0, gradient_as_bucket_view=True)
    train_images = torch.from_numpy(data.train.x).to(dev) if cfg.eval.precise_bn else None
    evaluate = functools.partial(evaluate_all, model, cfg.eval, ema=ema, train_images=train_images, batch=micro,
                                 rank=dist.rank, world=world, prec=prec)
    # the compile warm-up also evaluates blank images of each split's shape, so evaluations compile nothing later
    blank = {name: (torch.zeros_like(xs), torch.zeros_like(ys)) for name, (xs, ys) in evals.items()}
    step, compile_s = build_step(net, model, opt, scaler, cfg.precision, cfg.optim, seed=cfg.run.seed,
                                 batch_per_rank=batch_per_rank, device=dev, ema=ema, evaluate=lambda: evaluate(blank))
    return Parts(data=data, loader=loader, evals=evals, model=model, net=net, optimizer=opt, schedule=schedule,
                 scaler=scaler, ema=ema, evaluate=evaluate, step=step, prec=prec, micro_batch=micro,
                 staging_s=staging_s, compile_s=compile_s, lsuv=lsuv_records, notes=notes)


def _check_labels(data: Cifar10, num_classes: int) -> None:
    top = max(int(s.y.max()) for s in (data.train, data.test) if len(s))
    if top >= num_classes:
        raise UserError(f"model.num_classes = {num_classes} but the data's labels go up to {top}: set "
                        f"model.num_classes to at least {top + 1}")


def _workers_that_fit(cfg: DataCfg) -> tuple[DataCfg, list[str]]:
    """data.num_workers clamped to this process's share of the machine's cores (torch only warns, per worker pool)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if cfg.loader != "workers" or cfg.num_workers <= share:
        return cfg, []
    return replace(cfg, num_workers=share), [f"data.num_workers = {cfg.num_workers} but this process has {share} of "
                                             f"the machine's {cores} cores: using {share} workers"]


def _random_batches(split: Split, batch: int, seed: int, device: torch.device, prec: Precision):
    """A callable giving a fresh batch of un-augmented training images each call (for LSUV)."""
    gen = rng.generator(seed, rng.LSUV)
    images = torch.from_numpy(split.x)

    def next_batch() -> torch.Tensor:
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        return normalize(images[idx]).to(device, memory_format=prec.memory_format)
    return next_batch
