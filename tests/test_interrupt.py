"""Runs survive preemption and Ctrl-C: checkpoints inside an epoch, SIGINT / SIGTERM, honest start-up lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastres import checkpoint, config, train
from fastres.log import read_metrics

from conftest import ROOT

STEPS = 450 // 50  # steps per epoch of `tiny`


def tiny(small_cifar, out, *overrides: str) -> config.Config:
    return config.load(None, [f"--data.dir={small_cifar}", f"--run.out_dir={out}", "--model.depth=8",
                              "--optim.batch_size=50", "--run.epochs=3", "--data.val_size=50", "--log.every_steps=2",
                              *overrides])


def state(out) -> dict:
    return checkpoint.load(out / checkpoint.NAME)


def killed_after_save(monkeypatch, k: int, run) -> dict:
    """``run()`` as a process killed right after its k-th checkpoint; that checkpoint's state."""
    real_save, saves = checkpoint.save, []

    def save(path, st):
        real_save(path, st)
        saves.append(st["progress"])
        if len(saves) == k:
            raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "save", save)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(checkpoint, "save", real_save)
    return saves[-1]


def _has_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.parametrize("loader", ["gpu", "workers", pytest.param(
    "dali", marks=pytest.mark.skipif(not _has_dali(), reason="NVIDIA DALI is not installed"))])
def test_a_run_killed_inside_an_epoch_resumes_exactly(small_cifar, tmp_path, monkeypatch, loader):
    """Checkpoints after every step (run.checkpoint_every_s tiny), killed at step 12 (inside epoch 2), resumed:
    the same weights, optimizer, weight average, metrics and TensorBoard steps as a run never stopped, bit for bit,
    with stochastic depth, dropout and accumulation drawing on."""
    extra = [f"--data.loader={loader}", "--data.num_workers=1", "--model.stochastic_depth=0.3", "--model.dropout=0.1",
             "--optim.accum_steps=2", "--optim.ema_decay=0.9", "--run.device=cpu"]
    whole = train.main(tiny(small_cifar, tmp_path / "whole", *extra))
    cut = tiny(small_cifar, tmp_path / "cut", *extra, "--run.checkpoint_every_s=1e-9")
    at = killed_after_save(monkeypatch, STEPS + 3, lambda: train.main(cut))  # 8 inside epoch 1, its end, 3 more
    assert at["step"] == 12 and at["epoch"] == 1 and at["epoch_correct"] > 0  # inside epoch 2, its sums kept
    assert "rng_ranks" in state(tmp_path / "cut")
    resumed = train.main(tiny(small_cifar, tmp_path / "cut", *extra))  # the same command, default every_s
    a, b = state(tmp_path / "whole"), state(tmp_path / "cut")
    for part in ("model",):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    for p in a["optimizer"]["state"]:
        assert torch.equal(a["optimizer"]["state"][p]["momentum_buffer"], b["optimizer"]["state"][p]["momentum_buffer"])
    assert all(torch.equal(a["ema"]["avg"][k], b["ema"]["avg"][k]) for k in a["ema"]["avg"])
    assert a["ema"]["updates"] == b["ema"]["updates"] == 3 * STEPS
    ma, mb = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "cut")
    keys = ("epoch", "step", "train_loss", "train_acc", "test_acc", "val_acc")
    assert [[r[k] for k in keys] for r in ma] == [[r[k] for k in keys] for r in mb]
    assert resumed["final_test_acc"] == whole["final_test_acc"] and resumed["steps"] == whole["steps"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(tmp_path / "cut" / "tb"))
    ea.Reload()
    steps = [e.step for e in ea.Scalars("train/batch_loss")]
    assert steps == list(range(2, 3 * STEPS + 1, 2))  # every 2nd step once: none lost, none twice


@pytest.mark.slow
def test_time_saving_is_not_training_time_and_a_resumed_run_sums_its_segments(small_cifar, tmp_path, monkeypatch):
    segments = []

    class Recording(train.Timer):  # the loop's timer: its timed segments
        def stop(self):
            segments.append(super().stop())
            return segments[-1]
    monkeypatch.setattr(train, "Timer", Recording)
    real_save = checkpoint.save

    def slow_save(path, st):
        time.sleep(0.2)
        real_save(path, st)
    monkeypatch.setattr(checkpoint, "save", slow_save)
    cfg = tiny(small_cifar, tmp_path / "run", "--run.checkpoint_every_s=1e-9", "--run.target_acc=0.01")
    killed_after_save(monkeypatch, 5, lambda: train.main(cfg))
    before = sum(segments)  # the killed process's timed segments
    monkeypatch.setattr(checkpoint, "save", slow_save)
    t0 = time.perf_counter()
    s = train.main(cfg)
    wall = time.perf_counter() - t0
    assert s["train_time_s"] == pytest.approx(sum(segments), rel=1e-9)  # both processes' timed segments
    assert s["time_to_target_s"] == pytest.approx(sum(segments[:STEPS]), rel=1e-9)  # a segment a step to epoch 1
    saves_after = 3 * STEPS - 5
    assert s["train_time_s"] - before < wall - 0.2 * saves_after  # the resumed process's saves were not counted


def test_the_expected_duration_is_said_when_a_run_is_long(small_cifar, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "LONG_RUN_S", 0.0)
    train.main(tiny(small_cifar, tmp_path / "run", "--run.epochs=1"))
    lines = [line for line in capsys.readouterr().err.splitlines() if "to go at this speed" in line]
    assert len(lines) == 1 and "configs/smoke.toml shows the whole path in a minute" in lines[0]
    assert f"{STEPS - STEPS} steps left" in lines[0] or "steps left" in lines[0]
    monkeypatch.setattr(train, "LONG_RUN_S", 1e9)
    train.main(tiny(small_cifar, tmp_path / "short", "--run.epochs=1"))
    assert "to go at this speed" not in capsys.readouterr().err


def test_workers_are_clamped_to_the_cores_once(small_cifar, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    s = train.main(tiny(small_cifar, tmp_path / "run", "--run.epochs=1", "--data.loader=workers",
                        "--data.num_workers=6"))
    err = capsys.readouterr().err
    assert err.count("data.num_workers = 6 but this process has 2 of the machine's 2 cores: using 2 workers") == 1
    assert s["config"]["data"]["num_workers"] == 6  # the config is what was asked


# ------------------------------------------------------------------------------------------- signals, as processes

EPOCHS = 6  # of 9 steps: seconds of training after the first checkpoint (0.5 s in), for the signal to land in
CLI = ["--data.source=synthetic", "--data.subset=450", "--data.test_subset=100", "--model.depth=8",
       "--optim.batch_size=50", "--data.loader=gpu", "--run.device=cpu", f"--run.epochs={EPOCHS}",
       f"--run.eval_every={EPOCHS // 2}"]


def start(out, *extra, torchrun: int = 0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fastres.train", *CLI, f"--run.out_dir={out}", *extra]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               *cmd[1:]]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})


def wait_for(path, proc, timeout=240.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout, "no checkpoint in time"
        time.sleep(0.05)


def finish(out, *extra, torchrun: int = 0) -> None:
    proc = start(out, *extra, torchrun=torchrun)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


@pytest.mark.slow
def test_a_signal_checkpoints_the_step_says_one_line_and_the_same_command_resumes(tmp_path):
    """SIGINT (Ctrl-C: exit 130) and SIGTERM (a scheduler's stop: 143) inside the run: the step finishes, a checkpoint
    at it, one line; the same command resumes to the uninterrupted run's weights (that run goes on beside them)."""
    uninterrupted = start(tmp_path / "whole")
    try:
        for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
            out = tmp_path / sig.name
            proc = start(out, "--run.checkpoint_every_s=0.5")
            wait_for(out / checkpoint.NAME, proc)  # a checkpoint inside epoch 1 or 2
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == code, err[-3000:]
            assert "Traceback" not in err
            lines = [line for line in err.splitlines() if "interrupted" in line]
            assert len(lines) == 1 and lines[0].startswith("fastres: interrupted at epoch ")
            assert lines[0].endswith("; checkpoint kept; run the same command to resume")
            step = int(lines[0].split(" step ")[1].split(";")[0])
            assert state(out)["progress"]["step"] == step
            finish(out, "--run.checkpoint_every_s=0.5")
            assert json.loads((out / "summary.json").read_text())["steps"] == EPOCHS * 9
    except BaseException:
        uninterrupted.kill()  # a failed case leaves no run behind
        raise
    _, err = uninterrupted.communicate(timeout=600)
    assert uninterrupted.returncode == 0, err[-3000:]
    whole = state(tmp_path / "whole")["model"]
    for sig in (signal.SIGINT, signal.SIGTERM):
        a = state(tmp_path / sig.name)["model"]
        assert all(torch.equal(a[k], whole[k]) for k in a), sig.name


def test_a_second_ctrl_c_exits_at_once_and_the_previous_checkpoint_stays_whole(tmp_path):
    out = tmp_path / "run"
    proc = start(out, "--run.checkpoint_every_s=0.2")
    wait_for(out / checkpoint.NAME, proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    checkpoint.load(out / checkpoint.NAME)  # whole: loads and holds every part


@pytest.mark.slow
def test_two_torchrun_ranks_stopped_by_sigterm_resume_to_the_uninterrupted_weights(tmp_path):
    out = tmp_path / "ddp"
    proc = start(out, "--run.checkpoint_every_s=0.5", torchrun=2)
    wait_for(out / checkpoint.NAME, proc)
    proc.send_signal(signal.SIGTERM)  # torchrun's agent passes it to both ranks
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0 and "interrupted at epoch" in err and "Traceback" not in err.split("interrupted")[0]
    saved = state(out)["progress"]
    assert 0 < saved["step"] < EPOCHS * 9
    finish(out, torchrun=2)
    finish(tmp_path / "whole", torchrun=2)
    a, b = state(out)["model"], state(tmp_path / "whole")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
