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
    assert "fastres: resuming at epoch 1 step 1\n" in err, err


def test_a_run_resumed_at_an_epoch_end_says_so_too(tmp_path, monkeypatch, capsys):
    cfg = config.load(None, [*CLI, f"--run.out_dir={tmp_path / 'run'}", "--run.epochs=2"])
    killed_after_first_checkpoint(monkeypatch, lambda: train.main(cfg))  # the checkpoint of epoch 1
    capsys.readouterr()
    train.main(cfg)
    assert "fastres: resuming after epoch 1 (step 9)\n" in capsys.readouterr().err


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
    assert not out.exists()  # the start made it: no lock, checkpoint, config, metrics or events left behind


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


LIBRARY = '''
import sys, time
from fastres import train

def build(cfg, dist, state=None):  # a start-up phase inside a library that {how} the handler's exception
    try:
        time.sleep(120)
    except BaseException as e:
        {then}

train.build = build
sys.exit(train.cli(sys.argv[1:]))
'''
WAYS = {"wraps": "raise RuntimeError('the library failed') from e", "swallows": "time.sleep(120)"}


@pytest.mark.parametrize("how", sorted(WAYS))
def test_a_start_up_signal_ends_the_run_in_one_line_whatever_a_library_does_with_it(tmp_path, how):
    """The handler's exception comes back wrapped by the library it interrupted (inductor's InductorError), or the
    library catches it and goes on: the run still ends with the one line and 130, within train.GRACE_S."""
    script, out = tmp_path / "run.py", tmp_path / "run"
    script.write_text(LIBRARY.format(how=how, then=WAYS[how]))
    proc = subprocess.Popen([sys.executable, str(script), *CLI, f"--run.out_dir={out}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
    wait_until(lambda: held(out), proc)
    time.sleep(0.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.monotonic() - t0 < train.GRACE_S + 10, err[-2000:]
    assert [line for line in err.splitlines() if line.strip()] == [
        "fastres: interrupted during start-up (SIGINT), before any training step: nothing was saved or changed; "
        "run the same command to start again"], err[-2000:]
    assert not out.exists()


@pytest.mark.slow
def test_ctrl_c_inside_the_compile_warm_up_is_one_line_and_leaves_nothing(tmp_path):
    """SIGINT while inductor generates and compiles code for the compile warm-up (a fresh cache: it compiles)."""
    out, cache = tmp_path / "run", tmp_path / "inductor"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    proc = subprocess.Popen([sys.executable, "-m", "fastres.train", *CLI, f"--run.out_dir={out}",
                             "--precision.compile=true"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    wait_until(lambda: cache.exists() and any(p.suffix in (".py", ".cpp") for p in cache.rglob("*")), proc, 300)
    time.sleep(1.0)  # inside code generation
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "InductorError" not in err, err[-3000:]
    # torch's own log lines may precede it (a CUDA build without a GPU warns about CUDA_HOME when inductor compiles)
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == ("fastres: interrupted during start-up (SIGINT), before any training step: nothing was saved "
                         "or changed; run the same command to start again"), err[-3000:]
    assert sum(line.startswith("fastres:") for line in lines) == 1, err[-3000:]
    assert not out.exists()


PHASE = '''
import io, sys, time, urllib.request
from fastres import train
from fastres.data import folder

def slow_header(path):  # a slow disk: a header a second, 16 at a time
    time.sleep(1.0)
    return real_header(path)

class SlowArchive(io.RawIOBase):  # a slow server: a chunk a second, endless
    def read(self, n=-1):
        time.sleep(1.0)
        return b"x" * 1024
    def __enter__(self):
        return self
    def __exit__(self, *a):
        return False

real_header = folder._header
folder._header = slow_header
urllib.request.urlopen = lambda url, timeout: SlowArchive()
sys.exit(train.cli(sys.argv[1:]))
'''


@pytest.mark.parametrize("phase", ["indexing", "download"])
def test_a_signal_while_indexing_a_folder_or_downloading_stops_at_once_and_leaves_nothing(tmp_path, phase):
    """A folder of 400 images whose headers take a second each (25 s with 16 threads), or an archive that never ends:
    SIGINT stops the run within seconds with the one line, no half-written index, no partial download."""
    from test_folder import make_folder
    data = make_folder(tmp_path / "imgs", per_class=100) if phase == "indexing" else tmp_path / "cifar"
    source = ["--data.source=folder", "--data.loader=workers", "--model.num_classes=4", "--data.image_size=32"] \
        if phase == "indexing" else ["--data.source=cifar10"]
    script, out = tmp_path / "run.py", tmp_path / "run"
    script.write_text(PHASE)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(script), *CLI, *source, f"--data.dir={data}", f"--run.out_dir={out}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_until(lambda: held(out), proc)
    time.sleep(2.0)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.monotonic() - t0 < 5.0, err[-2000:]
    assert [line for line in err.splitlines() if line.strip()] == [
        "fastres: interrupted during start-up (SIGINT), before any training step: nothing was saved or changed; "
        "run the same command to start again"], err[-2000:]
    assert not out.exists()  # no lock, no index, whole or partial
    if phase == "download":
        assert not data.exists()  # the folders the download made, and its .part file, are gone
