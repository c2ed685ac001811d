"""Train a CIFAR ResNet: ``python -m fastres.train`` or ``torchrun --nproc_per_node=N -m fastres.train``.

    python -m fastres.train                                 # the seed's baseline recipe (configs/baseline.toml)
    python -m fastres.train --config configs/smoke.toml     # about a minute on 2 CPU cores
    python -m fastres.train --config X.toml --model.depth=56 --precision.amp=bf16

Setup, build (fastres.build), one flat loop, summary (nanoGPT's shape). What is timed: from the first batch
request of an epoch to the end of its last optimizer step (device-synchronized: CUDA events on a GPU), summed
over epochs; evaluation and checkpointing are outside it. time_to_target_s is that sum at the first evaluation
whose accuracy on the target split (test; val for tuning runs) reaches run.target_acc.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastres import checkpoint, config, distributed, provenance, rng
from fastres.build import Parts, build
from fastres.checkpoint import Progress
from fastres.cli import entry, parse_args
from fastres.config import Config
from fastres.errors import UserError
from fastres.evaluate import target_split
from fastres.log import EXTRA_ACCS, SUMMARY, RunLog, plot_curves, read_metrics
from fastres.model import count_params
from fastres.timing import Timer, forbid_host_sync


def main(cfg: Config) -> dict[str, Any]:
    """Train as ``cfg`` says (joining torchrun's process group if launched by it); the run's summary."""
    if cfg.run.deterministic:  # before CUDA starts: cuBLAS reads this once
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(cfg.run.deterministic)
    torch.backends.cudnn.deterministic = cfg.run.deterministic
    torch.backends.cudnn.benchmark = not cfg.run.deterministic  # autotuned conv kernels vary run to run
    dist = distributed.setup(cfg.run.device)
    try:
        return train(cfg, dist)
    finally:
        distributed.teardown()


def train(cfg: Config, dist: distributed.Dist) -> dict[str, Any]:
    # ---------------------------------------------------------------- setup + build
    config.validate(cfg, dist.world)  # before anything is written or staged
    dev, out, target = dist.device, Path(cfg.run.out_dir), target_split(cfg.eval)
    code = dict(git_sha=provenance.git_sha(), code_hash=provenance.code_hash())  # what runs, read at start
    state = open_run_dir(cfg, dist)
    progress = checkpoint.restore_progress(out / checkpoint.NAME, state) if state else Progress()
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    p = build(cfg, dist, state)
    steps_per_epoch, batch = len(p.loader), cfg.optim.batch_size
    log = RunLog(out, enabled=dist.is_main, total_steps=steps_per_epoch * cfg.run.epochs, step=progress.step,
                 epoch=progress.epoch, t0=progress.t0)
    if dist.is_main:
        (out / "config.toml").write_text(config.to_toml(cfg))
        if p.lsuv is not None:
            (out / "lsuv.json").write_text(json.dumps(p.lsuv, indent=1) + "\n")
        log.info(_start_line(cfg, p, dist, progress))
        if p.step.cudagraph_skips:
            log.info(f"fastres: warning: torch.compile left {p.step.cudagraph_skips} part(s) of the step out of its "
                     "CUDA graphs, which then run eagerly (TORCH_LOGS=cudagraphs says why); see cudagraph_skips")

    # ---------------------------------------------------------------- train
    timer, step = Timer(dev), progress.step
    for epoch in range(progress.epoch, cfg.run.epochs):
        if cfg.run.stop_at_target and progress.time_to_target_s is not None:
            log.info(f"fastres: {target} accuracy reached {cfg.run.target_acc:.0%} at epoch {progress.epoch}: "
                     "stopping (run.stop_at_target)")
            break
        torch.manual_seed(rng.derive_seed(cfg.run.seed, rng.EPOCH, epoch, dist.rank))  # dropout: per rank, resumable
        p.loader.set_epoch(epoch)
        p.model.train()
        p.step.start_epoch(step)  # the epoch's loss, accuracy and first non-finite step are summed on the device
        timer.start()
        with forbid_host_sync(dev, cfg.run.sync_debug):  # nothing in the loop waits
            for x, y in p.loader:
                p.step(x, y, p.schedule(step), step)
                step += 1
                log.advance()
        epoch_time = torch.tensor(timer.stop(), dtype=torch.float64, device=dev)  # on dev: nccl needs CUDA
        progress.train_time_s += distributed.all_reduce(epoch_time, op="max").item()  # the slowest rank's
        done = epoch + 1
        bad = distributed.all_reduce(p.step.bad_step.clone(), op="max").item()  # once an epoch: stop a diverged run
        if bad >= 0:
            raise UserError(f"the training loss became NaN/inf at step {bad} (epoch {done}): lower "
                            f"optim.lr_per_128 or raise optim.warmup_epochs (fp16: try precision.amp=bf16); "
                            f"the last good checkpoint (epoch {progress.epoch}) is kept")
        if done % cfg.run.eval_every and done != cfg.run.epochs:
            continue

        # ------------------------------------------------------------ evaluate + checkpoint (untimed)
        t_eval = time.perf_counter()
        seen = steps_per_epoch * batch
        train_loss = distributed.all_reduce(p.step.loss_sum.clone()).item() / seen
        train_acc = distributed.all_reduce(p.step.correct.clone()).item() / seen  # on augmented batches, as trained
        distributed.broadcast_buffers(p.model)
        if p.ema is not None:
            p.ema.broadcast()
        acc, extra = p.evaluate(p.evals)
        last = progress.last or dict(epoch=0, train_time_s=0.0)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        eval_s = time.perf_counter() - t_eval
        progress.eval_time_s += eval_s
        row = dict(epoch=done, step=step, train_loss=train_loss, train_acc=train_acc, test_acc=acc.get("test"),
                   val_acc=acc.get("val"), lr=p.schedule(step - 1), train_time_s=progress.train_time_s,
                   img_per_s=(done - last["epoch"]) * seen / max(1e-9, progress.train_time_s - last["train_time_s"]),
                   eval_s=eval_s, **extra)
        if progress.time_to_target_s is None and acc[target] >= cfg.run.target_acc:
            progress.reached(done)
        log.evaluation(row)
        progress.epoch, progress.step, progress.last = done, step, row
        if dist.is_main:
            plot_curves(read_metrics(out), out / "curves.png")
            checkpoint.save(out / checkpoint.NAME, checkpoint.gather(p.model, p.optimizer, p.scaler, progress,
                                                                      config.to_dict(cfg), p.ema))
    log.close()

    # ---------------------------------------------------------------- summary
    summary = _summary(cfg, p, dist, progress, code)
    if dist.is_main:
        (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        ttt = summary["time_to_target_s"]
        log.info(f"fastres: done: {target} {progress.last[target + '_acc']:.2%}, train "
                 f"{summary['train_time_s']:.1f} s (+ eval {summary['eval_time_s']:.1f} s, staging {p.staging_s:.1f} s"
                 f", compile {p.compile_s:.1f} s), time to {cfg.run.target_acc:.0%}: "
                 + (f"{ttt:.1f} s" if ttt is not None else "not reached"))
    return summary


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
    changed = config.diff(state["config"], config.to_dict(cfg), ignore=config.RESUME_MAY_DIFFER)
    if changed:
        raise UserError(f"{ckpt} was trained with a different config ({', '.join(changed)}): restore those "
                        "values, or start a new run with another --run.out_dir / --run.resume=never")
    return state


def _start_line(cfg: Config, p: Parts, dist: distributed.Dist, progress: Progress) -> str:
    line = (f"fastres: {cfg.run.name}: ResNet-{cfg.model.depth} ({count_params(p.model):,} params) on "
            f"{provenance.device_name(dist.device)} x{dist.world}, {len(p.data.train)} train images, batch "
            f"{cfg.optim.batch_size}, {len(p.loader)} steps/epoch, {cfg.run.epochs} epochs -> {cfg.run.out_dir}")
    if progress.epoch:
        line += f"\nfastres: resuming from epoch {progress.epoch} (step {progress.step})"
    elif p.lsuv is not None:
        line += "\nfastres: LSUV output variances (before -> after, tries): " + ", ".join(
            f"{r['layer']} {r['var_before']:.2f}->{r['var_last']:.2f} ({r['tries']})" for r in p.lsuv)
    return line


def _summary(cfg: Config, p: Parts, dist: distributed.Dist, progress: Progress, code: dict[str, str]) -> dict:
    """summary.json: what the report reads of a finished run, with everything needed to reproduce it."""
    last, steps = progress.last, progress.step
    finals = {f"final_{split}_acc": last[f"{split}_acc"] for split in ("test", "val")}
    finals.update({f"final_{split}_acc_{key}": last.get(f"{split}_acc_{key}")
                   for key in EXTRA_ACCS for split in ("test", "val")})
    return dict(
        name=cfg.run.name, finished=True, target_acc=cfg.run.target_acc, target_split=target_split(cfg.eval),
        time_to_target_s=progress.time_to_target_s, time_to_target_with_eval_s=progress.time_to_target_with_eval_s,
        epochs_to_target=progress.epochs_to_target, **finals, train_time_s=progress.train_time_s,
        eval_time_s=progress.eval_time_s, staging_s=p.staging_s, compile_s=p.compile_s, epochs=cfg.run.epochs,
        epochs_trained=progress.epoch, stopped_at_target=progress.epoch < cfg.run.epochs, steps=steps,
        img_per_s=steps * cfg.optim.batch_size / max(1e-9, progress.train_time_s),
        params=count_params(p.model), **code, torch_version=torch.__version__,
        device=provenance.device_name(dist.device), world_size=dist.world, seed=cfg.run.seed,
        train_images=len(p.data.train), cudagraph_skips=p.step.cudagraph_skips, config=config.to_dict(cfg))


def cli(argv: list[str] | None = None) -> int:
    def body(args: list[str]) -> None:
        path, overrides = parse_args(args)
        main(config.load(path, overrides, world=distributed.env_world()))
    return entry(body, argv, config.help_text("python -m fastres.train"))


if __name__ == "__main__":
    sys.exit(cli())
