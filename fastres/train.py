"""Train a ResNet: ``python -m fastres.train`` or ``torchrun --nproc_per_node=N -m fastres.train``.

    python -m fastres.train --config configs/smoke.toml     # the whole path in about a minute on 2 CPU cores
    python -m fastres.train                                 # He et al. 2015's ResNet-20 recipe (configs/baseline.toml)
    torchrun --nproc_per_node=4 -m fastres.train --optim.batch_size=1024 --optim.warmup_epochs=5 --data.loader=gpu
    torchrun --nproc_per_node=8 -m fastres.train --config configs/imagenet-resnet50.toml --data.dir=/data/imagenet

The network is a CIFAR ResNet (6n+2 layers, He 2015 sec. 4.2) or torchvision's ResNet-18..152 (model.family); the
data CIFAR-10/100 or an ImageNet-style folder of images (data.source).

Setup, build (fastres.build), one flat loop, summary (nanoGPT's shape). What is timed (train_time_s): from the
first batch request of an epoch to the end of its last optimizer step, device-synchronized (CUDA events on a GPU),
summed over epochs; the timer stops around a checkpoint inside an epoch, and evaluations are outside it.
time_to_target_s is that sum at the first evaluation whose accuracy on the target split (test; val for tuning
runs) reaches run.target_acc.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastres import checkpoint, config, distributed, rng
from fastres.build import Parts, build, data_record
from fastres.checkpoint import Progress
from fastres.config import Config, parse_args
from fastres.errors import Interrupted, UserError, entry, read_json, say, shown, write_text, writing
from fastres.evaluate import target_split
from fastres.log import EXTRA_ACCS, SUMMARY, RunLog, code_hash, device_name, git_sha
from fastres.model import count_params
from fastres.step import Timer, forbid_host_sync, sync_allowed

ESTIMATE_AFTER_STEPS = 20  # steps timed (host clock) before saying how long a long run will take
LONG_RUN_S = 1800.0  # what "long" is
LOCK = ".lock"  # in the run directory: held (fcntl) by the one process that writes there


def main(cfg: Config, notes: Sequence[str] = ()) -> dict[str, Any]:
    """Train as ``cfg`` says (joining torchrun's process group if launched by it); the run's summary. ``notes``:
    what the process entry decided (its threads), for the start-up log."""
    pauses = Pauses()  # from here a signal stops the run with one line, during start-up too
    try:
        dist = distributed.setup(cfg.run)
        try:
            with distributed.failures_named(dist):  # a rank that stops answering: one line, then torchrun restarts
                return train(cfg, dist, pauses, notes)
        finally:
            distributed.teardown()
    except BaseException as e:
        # the library the start-up signal interrupted (inductor, DALI) may have wrapped the handler's exception
        if pauses.startup_signum is not None and not isinstance(e, Interrupted):
            raise pauses.startup_interrupted(pauses.startup_signum) from None
        raise
    finally:
        pauses.close()


def train(cfg: Config, dist: distributed.Dist, pauses: Pauses, notes: Sequence[str] = ()) -> dict[str, Any]:
    # ---------------------------------------------------------------- setup + build
    config.validate(cfg, dist.world)  # for the world it runs in (a config loads for torchrun's), before any write
    distributed.same_config(config.to_dict(cfg))  # every rank one recipe, or one line naming what differs
    dev, out, target = dist.device, Path(cfg.run.out_dir), target_split(cfg.eval)
    _check_device(cfg, dev)
    code = dict(git_sha=git_sha(), code_hash=code_hash())  # what runs, read at start
    fresh = dist.is_main and not out.exists()  # this start makes the run directory
    lock = lock_run_dir(out) if dist.is_main else None  # one run per directory: a second is refused
    pauses.forget = out if fresh else None
    began = False
    try:
        state = open_run_dir(cfg, dist)
        progress = checkpoint.restore_progress(out / checkpoint.NAME, state) if state else Progress()
        if state is not None and (out / SUMMARY).exists() and (progress.epoch >= cfg.run.epochs or (
                cfg.run.stop_at_target and progress.time_to_target_s is not None)):
            if dist.is_main:  # started again: nothing to train, and no "resuming" or second done line
                print(f"fastres: {out} holds a finished run ({progress.epoch} of {cfg.run.epochs} epochs): nothing "
                      f"to train; its results are in {out / SUMMARY} (train again with another --run.out_dir)",
                      file=sys.stderr, flush=True)
            return read_json(out / SUMMARY)
        random.seed(cfg.run.seed)
        np.random.seed(cfg.run.seed)
        torch.manual_seed(cfg.run.seed)
        p = build(cfg, dist, state)
        p.notes[:0] = notes
        log = RunLog(out, enabled=dist.is_main, total_steps=len(p.loader) * cfg.run.epochs, step=progress.step,
                     epoch=progress.epoch, t0=progress.t0, every_steps=cfg.log.every_steps,
                     momentum_at=p.schedule.momentum_at if p.schedule.cycles_momentum else None)
        try:
            if dist.is_main:
                _announce(cfg, p, dist, progress, log, resumed=state is not None)
            pauses.start(cfg.run.checkpoint_every_s, dist.world, dev, dist.is_main)
            began, pauses.forget = True, None
            train_loop(cfg, p, dist, progress, state, log, pauses)
        finally:
            log.close()

        # ------------------------------------------------------------ summary
        summary = _summary(cfg, p, dist, progress, code)
        if dist.is_main:
            write_text(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
            ttt = summary["time_to_target_s"]
            log.info(f"fastres: done: {target} {progress.last[target + '_acc']:.2%}, train "
                     f"{summary['train_time_s']:.1f} s (+ eval {summary['eval_time_s']:.1f} s, staging "
                     f"{p.staging_s:.1f} s, compile {p.compile_s:.1f} s), time to {cfg.run.target_acc:.0%}: "
                     + (f"{ttt:.1f} s" if ttt is not None else "not reached"))
            if bad := sorted(getattr(p.loader, "skipped", ())):  # data.skip_bad's decode-time stand-ins, named
                log.info(f"fastres: data.skip_bad: {len(bad)} training file(s) did not decode and trained as grey "
                         f"images: " + "; ".join(shown(p.data.train.root / b) for b in bad[:5])
                         + (" ..." if len(bad) > 5 else ""))
        return summary
    except BaseException:
        if fresh and not began:  # a start that failed leaves no run directory behind (its .lock, a file index)
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            os.close(lock)  # releases the lock


def train_loop(cfg: Config, p: Parts, dist: distributed.Dist, progress: Progress, state: dict[str, Any] | None,
               log: RunLog, pauses: Pauses) -> None:
    """The epochs from ``progress`` on: for epoch, for batch (airbench's start/stop timer around the steps)."""
    dev, timer, global_step = dist.device, Timer(dist.device), progress.step  # global_step: optimizer steps taken
    steps_per_epoch, t_loop = len(p.loader), time.perf_counter()
    estimate_at = progress.step + min(ESTIMATE_AFTER_STEPS, steps_per_epoch)
    for epoch in range(progress.epoch, cfg.run.epochs):
        if cfg.run.stop_at_target and progress.time_to_target_s is not None:
            log.info(f"fastres: {target_split(cfg.eval)} accuracy reached {cfg.run.target_acc:.0%} at epoch "
                     f"{progress.epoch}: stopping (run.stop_at_target)")
            break
        epoch_end = (epoch + 1) * steps_per_epoch
        batches = _waited(_start_epoch(cfg, p, dist, progress, state, epoch, global_step), progress)
        timer.start()
        with forbid_host_sync(dev, cfg.run.sync_debug):  # nothing in the loop waits for the device
            for x, y in batches:
                # -------------------------------------------- forward, backward, update
                # global_step counts the steps taken: train_step refuses one that does not follow on the last
                batch_loss, _ = p.train_step(x, y, lr=p.schedule(global_step), global_step=global_step)
                global_step += 1

                # -------------------------------------------- logging (TensorBoard reads the loss without waiting)
                log.advance()
                if cfg.log.every_steps and global_step % cfg.log.every_steps == 0:
                    log.batch(global_step, batch_loss, len(y), p.schedule(global_step - 1),
                              progress.train_time_s + timer.host_elapsed())
                if global_step == estimate_at and (line := _duration_line(
                        time.perf_counter() - t_loop, global_step - progress.step,
                        steps_per_epoch * cfg.run.epochs - global_step)):
                    log.info(line)

                # -------------------------------------------- a checkpoint inside the epoch, or a signal
                if pauses.due(global_step) and global_step < epoch_end:
                    with sync_allowed(dev):
                        progress.train_time_s += _slowest(timer.stop(), dev)  # the clock stops for the save
                        _save(cfg, p, dist, progress, global_step, mid_epoch=True)
                        pauses.saved()
                    if pauses.signum is not None:
                        raise _interrupted(pauses.signum, epoch, global_step)
                    timer.start()
        progress.train_time_s += _slowest(timer.stop(), dev)
        _end_epoch(cfg, p, dist, progress, log, pauses, epoch, global_step)


def _end_epoch(cfg: Config, p: Parts, dist: distributed.Dist, progress: Progress, log: RunLog, pauses: Pauses,
               epoch: int, global_step: int) -> None:
    """After an epoch's last step (untimed): the divergence check, then, when due, evaluation and checkpoint."""
    done = epoch + 1
    loss_sum, correct, bad = _epoch_sums(p)  # once an epoch: the host reads the device's sums
    seen = len(p.loader) * cfg.optim.batch_size  # the epoch's training images, over every rank
    if bad >= 0:
        kept = Path(cfg.run.out_dir) / checkpoint.NAME
        raise UserError(f"the training loss became NaN/inf at step {bad} (epoch {done}): lower "
                        f"optim.lr_per_128 or raise optim.warmup_epochs (fp16: try precision.amp=bf16); "
                        + ("the last checkpoint is kept: a resume starts from it" if kept.exists() else
                           "no checkpoint had been written, so nothing is kept"))
    progress.epoch = done  # a checkpoint inside the next epoch resumes there
    stopping = pauses.stopping()
    if done % cfg.run.eval_every == 0 or done == cfg.run.epochs or stopping:
        row = _evaluation(p, dist, progress, global_step, done, loss_sum / seen, correct / seen, seen)
        if progress.time_to_target_s is None and row[f"{target_split(cfg.eval)}_acc"] >= cfg.run.target_acc:
            progress.reached(done)
        log.evaluation(row)
        progress.last = row
        log.curves(cfg.run.name, last=done == cfg.run.epochs or stopping or (
            cfg.run.stop_at_target and progress.time_to_target_s is not None))
        _save(cfg, p, dist, progress, global_step, mid_epoch=False)
        pauses.saved()
    if stopping:
        raise _interrupted(pauses.signum, epoch, global_step)


def _waited(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], progress: Progress):
    """The batches, each one's wait added to progress.data_wait_s: the host's time blocked on the loader (this
    rank's), inside the timed epoch. A loader that keeps up costs next to none; one that does not, the difference."""
    while True:
        t = time.perf_counter()
        batch = next(batches, None)
        progress.data_wait_s += time.perf_counter() - t
        if batch is None:
            return
        yield batch


def _slowest(seconds: float, dev: torch.device) -> float:
    """The slowest rank's time for the same steps (the group waits for it); on dev: nccl needs CUDA tensors."""
    return distributed.all_reduce(torch.tensor(seconds, dtype=torch.float64, device=dev), op="max").item()


def _epoch_sums(p: Parts) -> tuple[float, int, int]:
    """The epoch's (summed loss, correct, first non-finite step or -1) so far, over every rank."""
    ts = p.train_step
    return (distributed.all_reduce(ts.loss_sum.clone()).item(), int(distributed.all_reduce(ts.correct.clone()).item()),
            int(distributed.all_reduce(ts.bad_step.clone(), op="max").item()))


def _evaluation(p: Parts, dist: distributed.Dist, progress: Progress, global_step: int, done: int, train_loss: float,
                train_acc: float, seen: int) -> dict:
    """The metrics row of the evaluation after ``done`` epochs (its time goes to progress.eval_time_s); the training
    loss and accuracy are the epoch's, on augmented batches as trained."""
    t_eval = time.perf_counter()
    distributed.broadcast_buffers(p.model)
    acc, extra = p.evaluate(p.evals)
    if dist.device.type == "cuda":
        torch.cuda.synchronize(dist.device)
    eval_s = time.perf_counter() - t_eval
    progress.eval_time_s += eval_s
    last = progress.last or dict(epoch=0, train_time_s=0.0)
    since = max(1e-9, progress.train_time_s - last["train_time_s"])
    waited = progress.data_wait_s - (last.get("data_wait_s") or 0.0)  # since the last evaluation, as img_per_s
    return dict(epoch=done, step=global_step, train_loss=train_loss, train_acc=train_acc, test_acc=acc.get("test"),
                val_acc=acc.get("val"), lr=p.schedule(global_step - 1), train_time_s=progress.train_time_s,
                img_per_s=(done - last["epoch"]) * seen / since, data_wait_s=progress.data_wait_s,
                data_wait_frac=min(1.0, waited / since), eval_s=eval_s, **extra)


def _save(cfg: Config, p: Parts, dist: distributed.Dist, progress: Progress, global_step: int, *,
          mid_epoch: bool) -> None:
    """A checkpoint at ``global_step`` (every rank takes part; rank 0 writes). Inside an epoch it also keeps the
    epoch's sums so far, over every rank, and every rank's random streams, so the epoch goes on exactly."""
    progress.step = global_step
    rng_ranks = None
    if mid_epoch:
        progress.epoch_loss_sum, progress.epoch_correct, progress.epoch_bad_step = _epoch_sums(p)
        rng_ranks = distributed.all_gather_object(checkpoint.rng_state())
    else:
        progress.epoch_loss_sum, progress.epoch_correct, progress.epoch_bad_step = 0.0, 0, -1
    if dist.is_main:
        checkpoint.save(Path(cfg.run.out_dir) / checkpoint.NAME, checkpoint.gather(
            p.model, p.optimizer, p.scaler, progress, config.to_dict(cfg), p.techniques, rng_ranks,
            data_record(p.data)))
    distributed.barrier()  # no rank goes on (or exits) before the checkpoint is whole


def _interrupted(signum: int, epoch: int, global_step: int) -> Interrupted:
    return Interrupted(f"interrupted at epoch {epoch + 1} step {global_step}; checkpoint kept; run the same command "
                       "to resume", signum)


def _check_device(cfg: Config, dev: torch.device) -> None:
    if cfg.precision.amp == "fp16" and dev.type == "cpu" and cfg.run.device != "cpu":
        raise UserError("precision.amp = fp16 on a CPU (run.device = auto found no GPU) runs many times slower than "
                        "fp32 there (no fast fp16 kernels): use precision.amp = bf16 or off, or --run.device=cpu to "
                        "run fp16 on the CPU anyway")


def _announce(cfg: Config, p: Parts, dist: distributed.Dist, progress: Progress, log: RunLog, *,
              resumed: bool) -> None:
    """Rank 0, before training: the resolved config, LSUV's records, and what the run is, in the log."""
    out = Path(cfg.run.out_dir)
    write_text(out / "config.toml", config.to_toml(cfg))
    if p.lsuv is not None:
        write_text(out / "lsuv.json", json.dumps(p.lsuv, indent=1) + "\n")
    log.info(_start_line(cfg, p, dist, progress, resumed))
    for note in p.notes:
        log.info(f"fastres: {note}")
    if p.train_step.cudagraph_skips:
        log.info(f"fastres: warning: torch.compile left {p.train_step.cudagraph_skips} part(s) of the step out of its "
                 "CUDA graphs, which then run eagerly (TORCH_LOGS=cudagraphs says why); see cudagraph_skips")


def _start_epoch(cfg: Config, p: Parts, dist: distributed.Dist, progress: Progress, state: dict[str, Any] | None,
                 epoch: int, global_step: int):
    """The epoch's batches from ``global_step`` on: from its start, or (a checkpoint inside it) where it stopped, with
    the checkpoint's random streams and the epoch's sums so far."""
    first = global_step - epoch * len(p.loader)
    if first == 0:
        torch.manual_seed(rng.derive_seed(cfg.run.seed, rng.EPOCH, epoch, dist.rank))  # dropout: per rank
    else:
        checkpoint.restore_rng_ranks(Path(cfg.run.out_dir) / checkpoint.NAME, state, dist.rank, dist.world)
    sums = (progress.epoch_loss_sum, progress.epoch_correct, progress.epoch_bad_step) if first and dist.is_main else ()
    p.loader.set_epoch(epoch, first)
    p.model.train()
    p.train_step.start_epoch(global_step, *sums)  # the epoch's loss, accuracy and first non-finite step, on the device
    return iter(p.loader)


def _duration_line(seconds: float, steps_timed: int, steps_left: int) -> str | None:
    """After the first steps: how long the rest takes at this speed, when that is long (host clock: approximate)."""
    left = seconds / max(1, steps_timed) * steps_left
    if left < LONG_RUN_S:
        return None
    return (f"fastres: about {left / 3600:.1f} h to go at this speed ({seconds / max(1, steps_timed):.2f} s a step, "
            f"{steps_left} steps left); configs/smoke.toml shows the whole path in a minute")


def lock_run_dir(out: Path) -> int:
    """Hold ``out``'s lock for this process's life (an fcntl lock: the kernel drops it when the holder dies, so a
    killed run's lock is taken over); a UserError naming the holder if another process has it."""
    _check_dir(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise UserError(f"cannot write to run.out_dir {out} ({e.strerror}): choose another --run.out_dir") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UserError(f"run.out_dir {out} is in use by {holder}: wait for that run to end (or stop it), or "
                        "choose another --run.out_dir") from None
    try:
        with writing(out / LOCK):  # a full disk: one line
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    except BaseException:
        os.close(fd)  # the lock goes with it
        raise
    return fd


def _check_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"run.out_dir {out} is a file, not a directory: choose another --run.out_dir")


def open_run_dir(cfg: Config, dist: distributed.Dist) -> dict[str, Any] | None:
    """Apply run.resume to out_dir; the checkpoint's state to continue from, or None to start fresh."""
    out = Path(cfg.run.out_dir)
    ckpt = out / checkpoint.NAME
    _check_dir(out)
    distributed.check_shared_dir(out, dist)  # several nodes: every rank sees what rank 0 writes, or one line
    if cfg.run.resume == "never" and out.is_dir() and any(f.name != LOCK for f in out.iterdir()):
        raise UserError(f"run.resume = 'never' but {out} is not empty: choose another --run.out_dir or "
                        "--run.name, or delete it")
    if cfg.run.resume == "require" and not ckpt.exists():
        raise UserError(f"run.resume = 'require' but there is no {ckpt} to resume from")
    if dist.is_main:
        try:
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
                        "values to resume, or start a new run with another --run.out_dir (or --run.name)")
    return state


def _start_line(cfg: Config, p: Parts, dist: distributed.Dist, progress: Progress, resumed: bool) -> str:
    line = (f"fastres: {cfg.run.name}: ResNet-{cfg.model.depth} ({count_params(p.model):,} params) on "
            f"{device_name(dist.device)} x{dist.world}, {len(p.data.train)} train images, batch "
            f"{cfg.optim.batch_size}, {len(p.loader)} steps/epoch, {cfg.run.epochs} epochs -> {cfg.run.out_dir}")
    if resumed:  # at an epoch's end, or (a checkpoint inside an epoch) at a step inside the next one
        inside = progress.step > progress.epoch * len(p.loader)  # counted as "interrupted at epoch E step S" is
        line += (f"\nfastres: resuming at epoch {progress.epoch + 1} step {progress.step}" if inside else
                 f"\nfastres: resuming after epoch {progress.epoch} (step {progress.step})")
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
        device=device_name(dist.device), world_size=dist.world, seed=cfg.run.seed,
        train_images=len(p.data.train), cudagraph_skips=p.train_step.cudagraph_skips, config=config.to_dict(cfg),
        skipped_files=len(p.data.skipped) + len(getattr(p.loader, "skipped", ())))  # data.skip_bad (rank 0's decodes)


# ---------------------------------------------------------------------------------------------------- signals
# SIGINT and SIGTERM (Ctrl-C; SLURM, Kubernetes and torchrun's agent stop jobs with SIGTERM): during start-up
# (indexing, download, staging, LSUV, compile, a DALI pipeline's build) there is nothing to save, so the run stops
# at once with one line: the handler raises, and whatever a library makes of that exception (inductor wraps it, or
# catches it and compiles on) the run ends with the same line and 128 + the signal, GRACE_S later at the latest (a
# thread hears the signal through signal.set_wakeup_fd, even while the main thread sits in C code). In the loop a
# signal sets a flag: the loop finishes its step, writes a checkpoint at that step and exits 128 + the signal. A
# second Ctrl-C exits at once (the previous checkpoint is whole: saves are atomic); a second SIGTERM changes nothing:
# SLURM signals every process of a step, torchrun's agent among them, which sends its workers SIGTERM again. With one
# rank the loop reads the flags every step, a host value; with several, every CHECK_EVERY steps the ranks agree
# on them in one small all-reduce (a host sync every CHECK_EVERY steps, the only one in the loop), so every rank
# stops after the same step.

CHECK_EVERY = 16  # steps between the ranks' agreements (world > 1)
SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACE_S = 5.0  # a start-up signal: how long the run may take to unwind before it is ended at once


class Pauses:
    """When the loop stops between two steps: a signal, or a checkpoint due inside an epoch (every_s)."""

    def __init__(self):
        self.every_s, self.world, self.device, self.is_main = 0.0, 1, torch.device("cpu"), True
        self.training = False  # until start(): start-up, where a signal ends the run at once
        self.signum: int | None = None  # the first signal received in the loop
        self.startup_signum: int | None = None  # ... or during start-up
        self.last_save = time.monotonic()
        self.old, self.wakeup = {}, None
        self.closed = threading.Event()
        self.forget: Path | None = None  # a run directory this start made: gone if start-up is cut short
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self.old[s] = signal.signal(s, self._received)
            self._watch_startup()

    def start(self, every_s: float, world: int, device: torch.device, is_main: bool) -> None:
        """The loop begins: from now on a signal is a flag read between steps."""
        if self.startup_signum is not None:  # a library caught the handler's exception and went on
            raise self.startup_interrupted(self.startup_signum)
        self.every_s, self.world, self.device, self.is_main = every_s, world, device, is_main
        self.last_save, self.training = time.monotonic(), True

    @staticmethod
    def startup_interrupted(signum: int) -> Interrupted:
        return Interrupted(f"interrupted during start-up ({signal.Signals(signum).name}), before any training "
                           "step: nothing was saved or changed; run the same command to start again", signum)

    def _watch_startup(self) -> None:
        """A thread that hears every signal at once (the wakeup fd gets its number from the C-level handler) and,
        for one during start-up, ends the process GRACE_S later unless the run has unwound by then (close())."""
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self.wakeup = (read_fd, write_fd, signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False))
        threading.Thread(target=self._watch, args=(read_fd,), name="fastres-startup-signals", daemon=True).start()

    def _watch(self, read_fd: int) -> None:
        try:
            while not self.closed.is_set():
                heard = [s for s in os.read(read_fd, 64) if s in SIGNALS]
                if heard and not self.training and not self.closed.wait(GRACE_S):
                    self._forget()
                    os._exit(say(self.startup_interrupted(heard[0])))  # still starting up: a library held on
        finally:
            os.close(read_fd)

    def _received(self, signum: int, frame) -> None:
        if not self.training:
            if self.startup_signum is not None:  # a second one while unwinding: at once
                self._forget()
                os._exit(say(self.startup_interrupted(self.startup_signum)))
            self.startup_signum = signum
            raise self.startup_interrupted(signum)
        if self.signum is not None and signum == signal.SIGINT:
            os._exit(128 + signum)  # a second Ctrl-C: at once
        self.signum = self.signum or signum  # SIGTERM again: the same stop (from SLURM, then from torchrun's agent)

    def _forget(self) -> None:
        if self.forget is not None:
            shutil.rmtree(self.forget, ignore_errors=True)

    def _checkpoint_due(self) -> bool:
        return bool(self.every_s) and time.monotonic() - self.last_save >= self.every_s

    def due(self, step: int) -> bool:
        """After ``step`` steps: stop here (a signal) or checkpoint here (run.checkpoint_every_s)? The same answer on
        every rank."""
        if self.world == 1:
            return self.signum is not None or self._checkpoint_due()
        if step % CHECK_EVERY:
            return False
        return any(self.agree())

    def agree(self) -> tuple[int, int]:
        """(the signal any rank received or 0, whether rank 0's clock says a checkpoint is due), on every rank."""
        with sync_allowed(self.device):
            signum, due = distributed.agree([self.signum or 0, int(self.is_main and self._checkpoint_due())],
                                            self.device)
        if signum and self.signum is None:
            self.signum = signum  # another rank's: stop with it
        return signum, due

    def stopping(self) -> bool:
        """At an epoch's end: has any rank received a signal?"""
        return bool(self.agree()[0]) if self.world > 1 else self.signum is not None

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def close(self) -> None:
        for s, handler in self.old.items():
            signal.signal(s, handler)
        if self.wakeup is not None:
            _, write_fd, before = self.wakeup
            signal.set_wakeup_fd(before)  # first: no signal writes to the pipe once the thread may close it
            self.closed.set()
            try:
                os.write(write_fd, b"\0")  # the watching thread wakes, sees closed, and ends
            except OSError:  # it has ended already
                pass
            os.close(write_fd)
            self.wakeup = None
        self.closed.set()


def cli(argv: list[str] | None = None) -> int:
    def body(args: list[str]) -> None:
        path, overrides = parse_args(args)
        cfg = config.load(path, overrides, world=distributed.env_world())
        # a process-wide choice, made where the process starts (a caller of main() keeps its own threads)
        decoding = cfg.data.num_workers if (cfg.data.source, cfg.data.loader) == ("folder", "workers") else 0
        main(cfg, [distributed.choose_threads(cfg.run.threads, decoding)])
    return entry(body, argv, config.help_text("python -m fastres.train"))


if __name__ == "__main__":
    sys.exit(cli())
