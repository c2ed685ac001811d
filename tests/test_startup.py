"""What a user sees around the loop: where a run resumes, a signal during start-up, one run per directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fastres import checkpoint, config, train
from fastres.log import read_metrics

from conftest import ROOT, killed_after_first_checkpoint

CLI = ["--data.source=synthetic", "--data.subset=450", "--data.test_subset=100", "--model.depth=8",
       "--optim.batch_size=50", "--data.loader=gpu", "--run.device=cpu"]
# LSUV that never meets its tolerance: every layer takes all t_max tries, a start-up of minutes before step 1
SLOW_START = ["--model.init=lsuv", "--model.lsuv_tol_var=1e-9", "--model.lsuv_t_max=10000"]


def start(out, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fastres.train", *CLI, f"--run.out_dir={out}", *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})


def wait_until(check, proc, timeout=120.0) -> None:
    t0 = time.monotonic()
    while not check():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.05)


def held(out) -> bool:
    """Has a run taken out's lock (and written who it is)?"""
    lock = out / train.LOCK
    return lock.exists() and lock.read_text().startswith("process ")


def test_a_run_stopped_inside_its_first_epoch_says_where_it_resumes(tmp_path, monkeypatch, capsys):
    cfg = config.load(None, [*CLI, f"--run.out_dir={tmp_path / 'run'}", "--run.epochs=2",
                             "--run.checkpoint_every_s=1e-9"])  # a checkpoint after every step
    killed_after_first_checkpoint(monkeypatch, lambda: train.main(cfg))  # after step 1 of epoch 1
    capsys.readouterr()
    train.main(cfg)
    err = capsys.readouterr().err
    assert "fastres: resuming from epoch 0 (step 1, inside epoch 1)" in err, err


def test_a_run_resumed_at_an_epoch_end_says_so_too(tmp_path, monkeypatch, capsys):
    cfg = config.load(None, [*CLI, f"--run.out_dir={tmp_path / 'run'}", "--run.epochs=2"])
    killed_after_first_checkpoint(monkeypatch, lambda: train.main(cfg))  # the checkpoint of epoch 1
    capsys.readouterr()
    train.main(cfg)
    assert "fastres: resuming from epoch 1 (step 9)\n" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_start_up_is_one_line_and_leaves_nothing(tmp_path, sig, code):
    out = tmp_path / "run"
    proc = start(out, *SLOW_START)
    wait_until(lambda: held(out), proc)  # train() has begun: LSUV comes after the lock
    time.sleep(1.0)  # inside build: staging, then LSUV
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [f"fastres: interrupted during start-up ({signal.Signals(sig).name}), before any training step: "
                     "nothing was saved or changed; run the same command to start again"], err
    assert sorted(f.name for f in out.iterdir()) == [train.LOCK]  # no checkpoint, config, metrics or events


@pytest.mark.slow
def test_a_second_process_on_the_same_run_directory_is_refused_naming_the_first(tmp_path, capsys):
    """The first run is a process of its own; the second is the command line's entry point in this one."""
    out = tmp_path / "run"
    first = start(out, "--run.epochs=3")
    wait_until(lambda: held(out), first)
    assert train.cli([*CLI, f"--run.out_dir={out}", "--run.epochs=3"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"fastres: error: run.out_dir {out} is in use by process {first.pid} on {os.uname().nodename}: wait for "
        "that run to end (or stop it), or choose another --run.out_dir"], err
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # one writer: no duplicate rows
    assert json.loads((out / "summary.json").read_text())["steps"] == 3 * 9


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, capsys):
    """A process holds the lock and is killed (-9); the command line's entry point, in this process, is refused
    while it lives and takes the lock over once it is gone."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                               "from fastres import train\ntrain.lock_run_dir(Path(sys.argv[1]))\ntime.sleep(600)",
                               str(out)], cwd=ROOT)
    try:
        wait_until(lambda: held(out), holder)
        assert train.cli([*CLI, f"--run.out_dir={out}", "--run.epochs=1"]) == 2
        err = capsys.readouterr().err
        assert f"in use by process {holder.pid} " in err, err
    finally:
        holder.kill()  # kill -9: no clean-up of its own; the kernel drops its lock
        holder.wait()
    assert held(out)  # the file is still there, naming the dead process
    assert train.cli([*CLI, f"--run.out_dir={out}", "--run.epochs=1"]) == 0, capsys.readouterr().err[-3000:]
    assert checkpoint.load(out / checkpoint.NAME)["progress"]["epoch"] == 1


def test_resume_never_does_not_count_the_lock_as_a_run(tmp_path):
    out = tmp_path / "run"
    os.close(train.lock_run_dir(out))  # what a run interrupted during start-up leaves
    cfg = config.load(None, [*CLI, f"--run.out_dir={out}", "--run.epochs=1", "--run.resume=never"])
    assert train.main(cfg)["epochs_trained"] == 1
