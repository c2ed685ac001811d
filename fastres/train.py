"""Train a CIFAR ResNet: ``python -m fastres.train`` or ``torchrun --nproc_per_node=N -m fastres.train``.

    python -m fastres.train                                 # the seed's baseline recipe (configs/baseline.toml)
    python -m fastres.train --config configs/smoke.toml     # about a minute on 2 CPU cores
    python -m fastres.train --config X.toml --model.depth=56 --precision.amp=bf16

Setup, build, one flat loop, summary (nanoGPT's shape). What is timed: from the first batch request of an
epoch to the end of its last optimizer step (device-synchronized: CUDA events on a GPU), summed over
epochs; evaluation and checkpointing are outside it. time_to_target_s is that sum at the first evaluation
whose test accuracy reaches run.target_acc.
"""

from __future__ import annotations

import copy
import json
import os
import random
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from fastres import checkpoint, config, distributed, graph, provenance, rng
from fastres.config import Config, PrecisionCfg
from fastres.data import build_loader, cifar, normalize
from fastres.ema import WeightEMA
from fastres.errors import UserError, entry
from fastres.evaluate import accuracies, accuracy, precise_bn_
from fastres.init import lsuv_
from fastres.log import RunLog, read_metrics
from fastres.model import build_model, count_params
from fastres.optim import build_optimizer, build_schedule
from fastres.report import plot_curves
from fastres.timing import Timer, forbid_host_sync

AMP_DTYPES = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}
# Keys a resumed run may change: where things are and how they are loaded, not what is trained.
RESUME_MAY_DIFFER = ("run.resume", "run.device", "run.sync_debug", "data.dir", "data.num_workers")
SUMMARY = "summary.json"


def _random_batches(split, batch: int, seed: int, device: torch.device, fmt: torch.memory_format):
    """A callable giving a fresh batch of un-augmented training images each call (for LSUV)."""
    gen = rng.generator(seed, rng.LSUV)
    images = torch.from_numpy(split.x)

    def next_batch() -> torch.Tensor:
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        return normalize(images[idx]).to(device, memory_format=fmt)
    return next_batch


def warm_up(net, model, opt, scaler, *, batch_per_rank: int, accum: int, device: torch.device, fmt, dtype,
            amp_dtype, steps: int = 3, evaluate: Callable[[], Any] | None = None) -> None:
    """Compile (and capture CUDA graphs) before training, on random batches of the real shape (make_step
    times it); then ``evaluate()``, so the evaluation's own graphs (eval mode, its batch shapes, its TTA
    views) are compiled here too, not in the first evaluation: on the H100 that first evaluation took 1.7 to
    12 s, the later ones 0.011 s (runs of configs/tune-fast.toml, metrics.jsonl eval_s).

    Weights, optimizer and scaler state are put back afterwards, so training starts exactly where it would
    have; only the compiled code remains (as cifar10-airbench warms up before its timer starts). Every
    stochastic-depth branch is kept meanwhile, so each is compiled.
    """
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), scaler.state_dict()))
    rates, model.death_rates = model.death_rates, [0.0] * len(model.death_rates)
    x = torch.randn(batch_per_rank, 3, 32, 32, device=device).to(dtype=dtype, memory_format=fmt)
    y = torch.randint(0, 10, (batch_per_rank,), device=device)
    model.train()
    for _ in range(steps):
        train_step(net, opt, scaler, x, y, accum=accum, amp_dtype=amp_dtype)
    model.death_rates = rates
    if evaluate is not None:
        evaluate()
        model.train()
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    scaler.load_state_dict(saved[2])


def compile_model(net: torch.nn.Module, model: torch.nn.Module, cfg: PrecisionCfg, stochastic_depth: bool) -> None:
    """torch.compile as ``cfg`` says: the whole net, or each residual branch when stochastic depth is on
    (its per-step drop decisions are Python branches, which would break the whole-net graph)."""
    mode = None if cfg.compile_mode == "default" else cfg.compile_mode
    if stochastic_depth:
        for blk in model.blocks:
            blk.branch.compile(mode=mode)
    else:
        net.compile(mode=mode)


def sd_reseed(model: torch.nn.Module, seed: int, step: int, on: bool) -> Callable[[], Any] | None:
    """``before_forward`` for a step: the same stochastic-depth drops on every rank and micro-batch of the
    step (Huang 2016: per batch), drawn from (seed, step); None, and no seed derived, when it is off."""
    if not on:
        return None
    sd_seed = rng.derive_seed(seed, rng.STOCHASTIC_DEPTH, step)
    return lambda: model.sd_gen.manual_seed(sd_seed)


def train_step(net: torch.nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, x: torch.Tensor,
               y: torch.Tensor, *, accum: int = 1, amp_dtype: torch.dtype | None = None,
               label_smoothing: float = 0.0, before_forward=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch taken as ``accum`` micro-batches; (summed loss, correct) on the device.

    Micro-batch m holds every accum-th image, exactly what DDP rank m would hold, and gradients are
    all-reduced only after the last one (DDP's no_sync). Each micro-batch's mean loss is divided by accum,
    so the gradient is that of the batch mean - with one difference from a single large batch: BatchNorm
    normalizes each micro-batch over its own images (as each DDP rank does over its share).
    ``before_forward()`` runs before every forward (stochastic depth reseeds there).
    """
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for m in range(accum):
        xm, ym = (x, y) if accum == 1 else (x[m::accum], y[m::accum])
        if before_forward is not None:
            before_forward()
        sync = net.no_sync() if isinstance(net, DDP) and m < accum - 1 else nullcontext()
        with sync:
            with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = net(xm)
                loss = F.cross_entropy(logits, ym, label_smoothing=label_smoothing)
            scaler.scale(loss / accum).backward()
        loss_sum += loss.detach().float() * len(ym)
        correct += (logits.detach().argmax(1) == ym).sum()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return loss_sum, correct


def make_step(net: torch.nn.Module, model: torch.nn.Module, opt: torch.optim.Optimizer,
              scaler: torch.amp.GradScaler, cfg: Config, *, batch_per_rank: int, world: int, device: torch.device,
              evaluate: Callable[[], Any] | None = None, ema: WeightEMA | None = None):
    """(step, seconds it took to make): the step the loop calls, ``step(x, y, lr, before_forward) -> (summed
    loss, correct)``. torch.compile'd and warmed up first if precision.compile says so (with ``evaluate()``
    run in the warm-up, see :func:`warm_up`); then train_step with the lr set and ``ema`` updated after it,
    or with precision.step_graph its CUDA graph (fastres/graph.py, holding the EMA update too), captured here."""
    graph.check(cfg, world)
    timer = Timer(device)
    timer.start()
    amp_dtype = AMP_DTYPES[cfg.precision.amp]
    fmt = torch.channels_last if cfg.precision.channels_last else torch.contiguous_format
    accum = cfg.optim.accum_steps
    if cfg.precision.compile:
        compile_model(net, model, cfg.precision, cfg.model.stochastic_depth > 0)
        warm_up(net, model, opt, scaler, batch_per_rank=batch_per_rank, accum=accum, device=device, fmt=fmt,
                dtype=amp_dtype or torch.float32, amp_dtype=amp_dtype, evaluate=evaluate)
    kw = dict(accum=accum, amp_dtype=amp_dtype, label_smoothing=cfg.optim.label_smoothing)
    if not cfg.precision.step_graph:
        def step(x, y, lr: float, before_forward=None):
            for group in opt.param_groups:
                group["lr"] = lr
            out = train_step(net, opt, scaler, x, y, before_forward=before_forward, **kw)
            if ema is not None:
                ema.update()
            return out
        return step, timer.stop()

    def whole_step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = train_step(net, opt, scaler, x, y, **kw)
        if ema is not None:
            ema.apply()  # reads the weight prepare() filled: the same kernels every replay
        return out
    captured = graph.StepGraph(whole_step, model, opt, batch=batch_per_rank, dtype=amp_dtype or torch.float32,
                               device=device, memory_format=fmt, state=ema.avg if ema is not None else ())

    def graph_step(x, y, lr: float, before_forward=None):  # check() ruled out stochastic depth
        if ema is not None:
            ema.prepare()
        return captured(x, y, lr)
    return graph_step, timer.stop()


def open_run_dir(cfg: Config, dist: distributed.Dist) -> dict[str, Any] | None:
    """Apply run.resume to out_dir; the checkpoint's state to continue from, or None to start fresh."""
    out = Path(cfg.run.out_dir)
    ckpt = out / checkpoint.NAME
    if out.exists() and not out.is_dir():
        raise UserError(f"run.out_dir {out} is a file, not a directory: choose another --run.out_dir")
    if cfg.run.resume == "never" and out.is_dir() and any(out.iterdir()):
        raise UserError(f"run.resume = 'never' but {out} is not empty: choose another --run.out_dir or "
                        "--run.name, or delete it")
    if cfg.run.resume == "require" and not ckpt.exists():
        raise UserError(f"run.resume = 'require' but there is no {ckpt} to resume from")
    if dist.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise UserError(f"cannot write to run.out_dir {out} ({e.strerror}): choose another --run.out_dir") from None
    if cfg.run.resume == "never" or not ckpt.exists():
        return None
    state = checkpoint.load(ckpt, dist.device)
    changed = config.diff(state["config"], config.to_dict(cfg), ignore=RESUME_MAY_DIFFER)
    if changed:
        raise UserError(f"{ckpt} was trained with a different config ({', '.join(changed)}): restore those "
                        "values, or start a new run with another --run.out_dir / --run.resume=never")
    return state


def main(cfg: Config) -> dict[str, Any]:
    """Train as ``cfg`` says (joining torchrun's process group if launched by it); the run's summary."""
    if cfg.run.deterministic:  # before CUDA starts: cuBLAS reads this once
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(cfg.run.deterministic)
    torch.backends.cudnn.deterministic = cfg.run.deterministic
    torch.backends.cudnn.benchmark = not cfg.run.deterministic  # autotuned conv kernels vary run to run
    dist = distributed.setup(cfg.run.device)
    try:
        return _train(cfg, dist)
    finally:
        distributed.teardown()


def _train(cfg: Config, dist: distributed.Dist) -> dict[str, Any]:
    # ---------------------------------------------------------------- setup
    dev, world, out = dist.device, dist.world, Path(cfg.run.out_dir)
    batch, accum = cfg.optim.batch_size, cfg.optim.accum_steps
    if batch % (world * accum):
        raise UserError(f"optim.batch_size = {batch} does not split evenly over {world} rank(s) x "
                        f"{accum} accumulation step(s): use a multiple of {world * accum}")
    graph.check(cfg, world)  # before anything is written or staged
    code = dict(git_sha=provenance.git_sha(), code_hash=provenance.code_hash())  # what runs, read at start
    micro = batch // (world * accum)  # the images one forward sees: what BN normalizes over
    state = open_run_dir(cfg, dist)
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    amp_dtype = AMP_DTYPES[cfg.precision.amp]
    fmt = torch.channels_last if cfg.precision.channels_last else torch.contiguous_format

    # ---------------------------------------------------------------- build
    if not cfg.eval.on_test and not cfg.data.val_size:
        raise UserError("eval.on_test = false needs a validation split to measure: set data.val_size (e.g. 5000)")
    t_staging = time.perf_counter()
    if dist.is_main:
        cifar.ensure(cfg.data.dir)  # downloads once, on rank 0
    distributed.barrier()
    data = cifar.split(cifar.load(cfg.data.dir), val_size=cfg.data.val_size, split_seed=cfg.data.split_seed,
                       subset=cfg.data.subset, test_subset=cfg.data.test_subset)
    loader = build_loader(cfg.data, data.train, batch_per_rank=batch // world, seed=cfg.run.seed,
                          rank=dist.rank, world=world, device=dev, channels_last=cfg.precision.channels_last,
                          dtype=amp_dtype or torch.float32)
    target_split = "test" if cfg.eval.on_test else "val"  # tuning runs never look at the test set
    evals = {name: (torch.from_numpy(s.x).to(dev), torch.from_numpy(s.y).to(dev))
             for name, s in (("test", data.test if cfg.eval.on_test else None), ("val", data.val))
             if s is not None}
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    staging_s = time.perf_counter() - t_staging  # read, validate, split, copy to the device, build the loader
    model = build_model(cfg.model).to(dev, memory_format=fmt)
    params = count_params(model)
    opt = build_optimizer(model, cfg.optim)
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * cfg.run.epochs
    schedule = build_schedule(cfg.optim, steps_per_epoch, cfg.run.epochs)
    scaler = torch.amp.GradScaler(dev.type, enabled=cfg.precision.amp == "fp16")
    progress = dict(epoch=0, step=0, train_time_s=0.0, eval_time_s=0.0, time_to_target_s=None,
                    time_to_target_with_eval_s=None, epochs_to_target=None, t0=time.time(), last=None)
    if state is not None:
        checkpoint.restore(out / checkpoint.NAME, state, model, opt, scaler, progress)
    elif cfg.model.init == "lsuv":  # data-driven init on rank 0, then every rank takes its weights
        if dist.is_main:
            lsuv_records = lsuv_(model, _random_batches(data.train, micro, cfg.run.seed, dev, fmt),
                                 tol_var=cfg.model.lsuv_tol_var, t_max=cfg.model.lsuv_t_max)
            (out / "lsuv.json").write_text(json.dumps(lsuv_records, indent=1) + "\n")
        distributed.broadcast_state(model)
    ema = WeightEMA(model, cfg.optim.ema_decay) if cfg.optim.ema_decay else None  # from the starting weights
    if ema is not None and state is not None:
        checkpoint.restore_ema(out / checkpoint.NAME, state, ema)
    train_images = torch.from_numpy(data.train.x).to(dev) if cfg.eval.precise_bn else None
    sd_on = cfg.model.stochastic_depth > 0
    net = model
    if world > 1:  # a dropped block leaves its parameters unused on every rank that step
        net = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                  find_unused_parameters=sd_on, gradient_as_bucket_view=True)
    score = dict(rank=dist.rank, world=world, amp_dtype=amp_dtype, channels_last=cfg.precision.channels_last)

    def evaluate_all(sets: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[dict[str, float], dict[str, Any]]:
        """One evaluation as the loop logs it: (accuracy per split, the row's other accuracies)."""
        extra, tta = {}, cfg.eval.tta
        if ema is not None:  # the trained weights' own accuracy too (running BN statistics), to show what EMA adds
            extra[f"{target_split}_acc_no_ema"] = accuracy(model, *sets[target_split], tta=tta, **score)
        with ema.swapped_in() if ema is not None else nullcontext():  # the average is what is scored
            if cfg.eval.precise_bn:  # the running averages' accuracy too, to show what precise BN changes
                extra[f"{target_split}_acc_running_bn"] = accuracy(model, *sets[target_split], tta=tta, **score)
                precise_bn_(model, train_images, batch=micro, batches=cfg.eval.precise_bn_batches, **score)
            scored = {name: accuracies(model, xs, ys, tta=tta, **score) for name, (xs, ys) in sets.items()}
        if tta != "off":  # the same forward passes without the mirror images: what TTA adds
            extra.update({f"{name}_acc_no_tta": a["off"] for name, a in scored.items()})
        if tta == "flip-translate":  # and with the mirror images alone: what the moved images add
            extra.update({f"{name}_acc_flip": a["flip"] for name, a in scored.items()})
        return {name: a[tta] for name, a in scored.items()}, extra

    # compile + warm-up (with an evaluation of blank images of each split's shape; warm_up puts the weights and
    # BN statistics back), and the step graph's capture: reported as compile_s, outside the training time
    run_step, compile_s = make_step(net, model, opt, scaler, cfg, batch_per_rank=batch // world, world=world,
                                    device=dev, evaluate=lambda: evaluate_all(
                                        {name: (torch.zeros_like(xs), torch.zeros_like(ys))
                                         for name, (xs, ys) in evals.items()}), ema=ema)
    log = RunLog(out, enabled=dist.is_main, total_steps=total_steps, step=progress["step"],
                 epoch=progress["epoch"], t0=progress["t0"])
    if dist.is_main:
        (out / "config.toml").write_text(config.to_toml(cfg))
        log.info(f"fastres: {cfg.run.name}: ResNet-{cfg.model.depth} ({params:,} params) on "
                 f"{provenance.device_name(dev)} x{world}, {len(data.train)} train images, batch {batch}, "
                 f"{steps_per_epoch} steps/epoch, {cfg.run.epochs} epochs -> {out}")
        if progress["epoch"]:
            log.info(f"fastres: resuming from epoch {progress['epoch']} (step {progress['step']})")
        elif cfg.model.init == "lsuv":
            log.info("fastres: LSUV output variances (before -> after, tries): " + ", ".join(
                f"{r['layer']} {r['var_before']:.2f}->{r['var_last']:.2f} ({r['tries']})" for r in lsuv_records))

    # ---------------------------------------------------------------- train
    timer = Timer(dev)
    step = progress["step"]
    for epoch in range(progress["epoch"], cfg.run.epochs):
        torch.manual_seed(rng.derive_seed(cfg.run.seed, rng.EPOCH, epoch, dist.rank))  # dropout: per rank, resumable
        loader.set_epoch(epoch)
        model.train()
        loss_sum = torch.zeros((), device=dev)
        correct = torch.zeros((), dtype=torch.int64, device=dev)
        bad_step = torch.full((), -1, dtype=torch.int64, device=dev)  # first step with a non-finite loss
        timer.start()
        with forbid_host_sync(dev, cfg.run.sync_debug):  # nothing in the loop waits
            for x, y in loader:
                step_loss, step_correct = run_step(x, y, schedule(step), sd_reseed(model, cfg.run.seed, step, sd_on))
                loss_sum += step_loss
                correct += step_correct
                bad_step = torch.where((bad_step < 0) & ~torch.isfinite(step_loss), step, bad_step)  # no host sync
                step += 1
                log.advance()
        epoch_time = torch.tensor(timer.stop(), dtype=torch.float64, device=dev)  # on dev: nccl needs CUDA
        progress["train_time_s"] += distributed.all_reduce(epoch_time, op="max").item()  # the slowest rank's
        done = epoch + 1
        bad = distributed.all_reduce(bad_step, op="max").item()  # once an epoch: stop a diverged run
        if bad >= 0:
            raise UserError(f"the training loss became NaN/inf at step {bad} (epoch {done}): lower "
                            f"optim.lr_per_128 or raise optim.warmup_epochs (fp16: try precision.amp=bf16); "
                            f"the last good checkpoint (epoch {progress['epoch']}) is kept")
        if done % cfg.run.eval_every and done != cfg.run.epochs:
            continue

        # ------------------------------------------------------------ evaluate + checkpoint (untimed)
        t_eval = time.perf_counter()
        seen = steps_per_epoch * batch
        train_loss = distributed.all_reduce(loss_sum).item() / seen
        train_acc = distributed.all_reduce(correct).item() / seen  # on augmented batches, as trained
        distributed.broadcast_buffers(model)
        if ema is not None:
            ema.broadcast()
        acc, extra = evaluate_all(evals)
        since = progress["last"]["train_time_s"] if progress["last"] else 0.0
        epochs_since = done - (progress["last"]["epoch"] if progress["last"] else 0)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        eval_s = time.perf_counter() - t_eval
        progress["eval_time_s"] += eval_s
        row = dict(epoch=done, step=step, train_loss=train_loss, train_acc=train_acc, test_acc=acc.get("test"),
                   val_acc=acc.get("val"), lr=schedule(step - 1), train_time_s=progress["train_time_s"],
                   img_per_s=epochs_since * steps_per_epoch * batch / max(1e-9, progress["train_time_s"] - since),
                   eval_s=eval_s, **extra)
        if progress["time_to_target_s"] is None and acc[target_split] >= cfg.run.target_acc:
            progress.update(time_to_target_s=progress["train_time_s"], epochs_to_target=done,
                            time_to_target_with_eval_s=progress["train_time_s"] + progress["eval_time_s"])
        log.evaluation(row)
        progress.update(epoch=done, step=step, last=row)
        if dist.is_main:
            plot_curves(read_metrics(out), out / "curves.png")
            checkpoint.save(out / checkpoint.NAME, dict(
                model=model.state_dict(), optimizer=opt.state_dict(), scaler=scaler.state_dict(),
                rng=checkpoint.rng_state(), progress=progress, config=config.to_dict(cfg),
                **({"ema": ema.state_dict()} if ema is not None else {})))
    log.close()

    # ---------------------------------------------------------------- summary
    last = progress["last"]
    summary = dict(
        name=cfg.run.name, finished=True, target_acc=cfg.run.target_acc,
        target_split=target_split, time_to_target_s=progress["time_to_target_s"],
        time_to_target_with_eval_s=progress["time_to_target_with_eval_s"],
        epochs_to_target=progress["epochs_to_target"],
        final_test_acc=last["test_acc"], final_val_acc=last["val_acc"],
        final_test_acc_no_tta=last.get("test_acc_no_tta"), final_val_acc_no_tta=last.get("val_acc_no_tta"),
        final_test_acc_flip=last.get("test_acc_flip"), final_val_acc_flip=last.get("val_acc_flip"),
        final_test_acc_no_ema=last.get("test_acc_no_ema"), final_val_acc_no_ema=last.get("val_acc_no_ema"),
        train_time_s=progress["train_time_s"],
        eval_time_s=progress["eval_time_s"], staging_s=staging_s, compile_s=compile_s, epochs=cfg.run.epochs,
        steps=total_steps,
        img_per_s=total_steps * batch / max(1e-9, progress["train_time_s"]), params=params,
        **code, torch_version=torch.__version__,
        device=provenance.device_name(dev), world_size=world, seed=cfg.run.seed, train_images=len(data.train),
        config=config.to_dict(cfg))
    if dist.is_main:
        (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        ttt = summary["time_to_target_s"]
        log.info(f"fastres: done: {target_split} {last[target_split + '_acc']:.2%}, train "
                 f"{summary['train_time_s']:.1f} s (+ eval {summary['eval_time_s']:.1f} s, staging {staging_s:.1f} s"
                 f", compile {compile_s:.1f} s), time to {cfg.run.target_acc:.0%}: "
                 + (f"{ttt:.1f} s" if ttt is not None else "not reached"))
    return summary


def cli(argv: list[str] | None = None) -> int:
    def body(args: list[str]) -> None:
        path, overrides = config.parse_args(args)
        main(config.load(path, overrides))
    return entry(body, argv, config.help_text("python -m fastres.train"))


if __name__ == "__main__":
    sys.exit(cli())
