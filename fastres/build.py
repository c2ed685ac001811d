"""Everything a run trains with, built in one place: ``build(cfg, dist) -> Parts``.

fastres.train and the measuring tools (fastres.tools.bench, .scaling, .profile, .dispatch) build through here, so
a benchmark times what training runs.
Order matters and is kept here once: data and loader (staging_s), model, optimizer, schedule and scaler; LSUV (a
fresh run); the techniques; a checkpoint's state; DDP; and last the step (compiled, captured: compile_s).
Three batch sizes appear, each by its own name: the global batch (optim.batch_size, over every rank), the per-rank
batch (``batch_per_rank``: what one rank's step takes) and the micro-batch (``micro_batch``: what one forward, and
so BatchNorm, sees; per-rank / optim.accum_steps).
"""

from __future__ import annotations

import functools
import inspect
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from fastres import checkpoint, distributed, rng
from fastres.config import Config, DataCfg, OptimCfg
from fastres.data import fetch, load
from fastres.data.base import RunData, normalize
from fastres.data.loaders import Loader, build_loader
from fastres.distributed import Dist
from fastres.errors import UserError
from fastres.evaluate import Sets, evaluate_all
from fastres.model import ResNet, build_model, load_weights, lsuv_
from fastres.optim import Schedule, build_optimizer, build_schedule
from fastres.step import Precision, TrainStep, build_train_step, precision, random_batch
from fastres.techniques import Lookahead, ScheduledMomentum, StochasticDepthDraws, Technique, WeightEMA, find

TOP5_SOURCES = ("cifar100", "folder")  # where top-5 accuracy is logged: not CIFAR-10, whose rows stay as they were
# torch 2.13 deprecates broadcast_buffers (a FutureWarning on every rank) for forward_sync_buffers, which still syncs
# buffers once at init: a no-op here, every rank starts from equal ones (BN's constants, or the same checkpoint);
# older torch (2.11, for one) has only the old name. Source: torch/nn/parallel/distributed.py
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else {"broadcast_buffers": False})


@dataclass
class Parts:
    data: RunData  # the splits, in host memory
    loader: Loader  # this rank's training batches
    evals: Sets  # what each evaluation scores: {"test" and/or "val": (uint8 images, labels) on the device}
    model: ResNet
    net: torch.nn.Module  # the model, or DDP around it with more than one rank
    optimizer: torch.optim.SGD
    schedule: Schedule  # lr as a function of the optimizer step
    scaler: torch.amp.GradScaler
    techniques: list[Technique]  # the active stateful techniques, in the order they act: build_techniques
    evaluate: Callable[[Sets], tuple[dict[str, float], dict[str, float]]]  # one evaluation: see evaluate_all
    train_step: TrainStep  # train_step(x, y, lr=, global_step=): one optimizer step
    prec: Precision
    micro_batch: int  # the images one forward sees: what BatchNorm normalizes over (per-rank batch / accum_steps)
    staging_s: float  # read, validate, split, copy to the device, build the loader
    compile_s: float  # compile, its warm-up, the step graph's capture
    lsuv: list[dict[str, Any]] | None  # LSUV's per-layer records (model.init = lsuv, a fresh run, rank 0)
    notes: list[str]  # what the build changed from the config, for the log (once)


def build(cfg: Config, dist: Dist, state: dict[str, Any] | None = None) -> Parts:
    """The parts of a run of ``cfg`` on this rank; with ``state`` (fastres.checkpoint.load of the run's
    checkpoint) the model, optimizer, scaler, global RNGs and techniques continue from it."""
    dev, world = dist.device, dist.world
    prec = precision(cfg.precision)
    batch_per_rank = cfg.optim.batch_size // world  # the global batch, split evenly (config.validate checks it)
    micro_batch = batch_per_rank // cfg.optim.accum_steps
    data, loader, evals, notes, staging_s = _stage(cfg, dist, prec, batch_per_rank)
    if note := checkpoint.world_note(state, world):  # the same global batch, split over another number of ranks
        notes.append(note)

    model = build_model(replace(cfg.model, num_classes=data.num_classes))  # model.num_classes: 0 or the data's
    if state is None and cfg.model.weights:  # a fresh run from a file's weights (a resumed one has its own)
        notes += load_weights(model, cfg.model.weights)
    model = model.to(dev, memory_format=prec.memory_format)
    opt = build_optimizer(model, cfg.optim)
    schedule = build_schedule(cfg.optim, len(loader), cfg.run.epochs)
    if cfg.optim.warmup_epochs >= cfg.run.epochs:  # legal (a short test of a recipe), but never what a run wants
        notes.append(f"warning: optim.warmup_epochs = {cfg.optim.warmup_epochs:g} is not shorter than run.epochs = "
                     f"{cfg.run.epochs}: the learning rate never leaves its warm-up (it never decays)")
    scaler = torch.amp.GradScaler(dev.type, enabled=cfg.precision.amp == "fp16")
    lsuv_records = None
    if state is None and cfg.model.init == "lsuv":  # data-driven init on rank 0, then every rank takes its weights
        if dist.is_main:
            lsuv_records = lsuv_(model, _random_batches(data, micro_batch, cfg.run.seed, dev, prec),
                                 tol_var=cfg.model.lsuv_tol_var, t_max=cfg.model.lsuv_t_max)
        distributed.broadcast_state(model)
    techniques = build_techniques(cfg.optim, model, opt, schedule, seed=cfg.run.seed)  # averages start from here
    if state is not None:
        checkpoint.same_data(Path(cfg.run.out_dir) / checkpoint.NAME, state, data_record(data))
        checkpoint.restore(Path(cfg.run.out_dir) / checkpoint.NAME, state, model, opt, scaler, techniques)
    net = model
    if world > 1:  # a dropped block leaves its parameters unused on every rank that step
        # No broadcast_buffers: BN's running statistics are read only by evaluation, which hands every rank rank 0's
        # first (train.py), and training normalizes with batch statistics; re-sending them before every forward
        # changed nothing but cost a broadcast per buffer per step (2 ranks still equal 1 process: test_train.py).
        net = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None, **_NO_BUFFER_SYNC,
                  find_unused_parameters=cfg.model.stochastic_depth > 0, gradient_as_bucket_view=True)
    train_images = torch.from_numpy(data.train.x).to(dev) if cfg.eval.precise_bn else None
    evaluate = functools.partial(evaluate_all, model, cfg.eval, ema=find(techniques, WeightEMA),
                                 train_images=train_images, micro_batch=micro_batch, rank=dist.rank, world=world,
                                 prec=prec, norm=(data.mean, data.std), top5=cfg.data.source in TOP5_SOURCES)
    # the compile warm-up also evaluates blank images of each split's shape, so evaluations compile nothing later
    blank = {name: (torch.zeros_like(xs), torch.zeros_like(ys)) for name, (xs, ys) in evals.items()}
    # what the warm-ups train on, made only when one runs: a batch of each shape the loader yields, the data's classes
    examples = lambda: [random_batch(batch_per_rank, shape, data.num_classes, prec, dev)  # noqa: E731
                        for shape in loader.image_shapes]
    train_step, compile_s = build_train_step(net, model, opt, scaler, cfg.precision, cfg.optim, examples=examples,
                                             techniques=techniques, evaluate=lambda: evaluate(blank))
    return Parts(data=data, loader=loader, evals=evals, model=model, net=net, optimizer=opt, schedule=schedule,
                 scaler=scaler, techniques=techniques, evaluate=evaluate, train_step=train_step, prec=prec,
                 micro_batch=micro_batch, staging_s=staging_s, compile_s=compile_s, lsuv=lsuv_records, notes=notes)


def build_techniques(cfg: OptimCfg, model: ResNet, opt: torch.optim.SGD, schedule: Schedule, *,
                     seed: int) -> list[Technique]:
    """The stateful techniques the config turns on, in the order they act after a step (fastres/techniques.py).
    Adding one is one line here. Made before a checkpoint's state is loaded into them and the optimizer."""
    made = [
        ScheduledMomentum(opt, schedule.momentum_at) if schedule.cycles_momentum else None,
        StochasticDepthDraws(model, seed) if any(model.death_rates) else None,
        Lookahead(model, cfg.lookahead_k, cfg.lookahead_alpha, schedule.total_steps) if cfg.lookahead_k else None,
        WeightEMA(model, cfg.ema_decay) if cfg.ema_decay else None,
    ]
    return [t for t in made if t is not None]


def _stage(cfg: Config, dist: Dist, prec: Precision, batch_per_rank: int):
    """Read, validate and split the data, copy the evaluation sets to the device and make the loader (timed:
    staging_s); (data, loader, evals, notes for the log, staging_s)."""
    dev = dist.device
    t_staging = time.perf_counter()
    if dist.is_main:
        fetch(cfg.data, cfg.run.out_dir)  # downloads (or indexes a folder) once, on rank 0
    distributed.barrier()
    data = load(cfg.data, cfg.run.out_dir, eval_side=cfg.eval.image_size, eval_ratio=cfg.eval.resize_ratio)
    _check_classes(data, cfg.model.num_classes)
    data_cfg, notes = _workers_that_fit(cfg.data)
    if data.skipped:  # data.skip_bad: what was left out, named in the log once
        notes.append(f"data.skip_bad: left out {len(data.skipped)} file(s): " + "; ".join(data.skipped[:5])
                     + (" ..." if len(data.skipped) > 5 else ""))
    loader = build_loader(data_cfg, data.train, batch_per_rank=batch_per_rank, seed=cfg.run.seed, rank=dist.rank,
                          world=dist.world, device=dev, channels_last=prec.channels_last, dtype=prec.dtype,
                          norm=(data.mean, data.std))
    evals = {name: (torch.from_numpy(s.x).to(dev), torch.from_numpy(s.y).to(dev))
             for name, s in (("test", data.test if cfg.eval.on_test else None), ("val", data.val)) if s is not None}
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return data, loader, evals, notes, time.perf_counter() - t_staging


def data_record(data: RunData) -> dict[str, int]:
    """What a checkpoint records of the data it trained on, to tell a changed folder at resume."""
    return {"training_images": len(data.train), "classes": data.num_classes}


def _check_classes(data: RunData, num_classes: int) -> None:
    """model.num_classes, when set, equals the data's class count (a folder's is known only now)."""
    if num_classes and num_classes != data.num_classes:
        raise UserError(f"model.num_classes = {num_classes} but the data's labels go up to {data.num_classes - 1} "
                        f"({data.num_classes} classes): remove it (the model follows the data) or set "
                        f"model.num_classes = {data.num_classes}")


def _workers_that_fit(cfg: DataCfg) -> tuple[DataCfg, list[str]]:
    """data.num_workers clamped to this process's share of the machine's cores (torch only warns, per worker pool)."""
    cores = distributed.cores()
    share = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if cfg.loader != "workers" or cfg.num_workers <= share:
        return cfg, []
    return replace(cfg, num_workers=share), [f"data.num_workers = {cfg.num_workers} but this process has {share} of "
                                             f"the machine's {cores} cores: using {share} workers"]


def _random_batches(data: RunData, micro_batch: int, seed: int, device: torch.device, prec: Precision):
    """A callable giving a fresh micro-batch of un-augmented training images each call (for LSUV)."""
    gen = rng.generator(seed, rng.LSUV)
    images = torch.from_numpy(data.train.x)

    def next_batch() -> torch.Tensor:
        idx = torch.randint(0, len(images), (micro_batch,), generator=gen)
        return normalize(images[idx], data.mean, data.std).to(device, memory_format=prec.memory_format)
    return next_batch
