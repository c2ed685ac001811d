"""Failures the environment causes are one line too: a full disk at any write, filesystem oddities in the data
path, values the config takes but a run cannot use, a run directory spelled or placed differently."""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from fastres import checkpoint, config, log, train
from fastres.log import read_metrics


def tiny(data_dir, out, *overrides: str) -> list[str]:
    return [f"--data.dir={data_dir}", f"--run.out_dir={out}", "--model.depth=8", "--optim.batch_size=50",
            "--run.epochs=3", "--data.loader=gpu", "--data.val_size=50", "--log.every_steps=3", *overrides]


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fastres: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------------------- a full disk

@pytest.fixture
def small_disk(tmp_path):
    """A 6 MB tmpfs (skipped where mounting is not allowed), and a way to fill it to the brim."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")

    def fill() -> Path:
        filler = mnt / f"filler-{uuid.uuid4().hex}"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        finally:
            os.close(fd)
        return filler
    yield mnt, fill
    subprocess.run(["umount", "-l", str(mnt)], check=False)


# TensorBoard's writer thread failing on the full disk must not print its own traceback beside the one line
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("when", ["at start", "after the first checkpoint"])
def test_a_disk_that_fills_up_is_one_line_keeps_the_last_checkpoint_and_a_rerun_resumes(
        small_cifar, small_disk, monkeypatch, capsys, when):
    mnt, fill = small_disk
    out = mnt / "run"
    fillers, real_save = [], checkpoint.save
    if when == "at start":
        fillers.append(fill())
    else:
        def save_then_fill(path, state):
            real_save(path, state)
            if not fillers:
                fillers.append(fill())
        monkeypatch.setattr(checkpoint, "save", save_then_fill)
    assert train.cli(tiny(small_cifar, out)) == 2
    line = one_error(capsys)
    assert "cannot write" in line and "No space left on device" in line and "MB free there" in line
    assert "free space (or fix permissions) there and run the same command again" in line
    if when != "at start":
        assert checkpoint.load(out / checkpoint.NAME)["progress"]["epoch"] >= 1  # whole, loadable
        assert read_metrics(out)  # readable
    for f in fillers:
        f.unlink()
    monkeypatch.setattr(checkpoint, "save", real_save)
    assert train.cli(tiny(small_cifar, out)) == 0  # space freed: the same command finishes the run
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2, 3]


def _no_space(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("site,words", [
    ("checkpoint", "checkpoint.pt ([enforce fail at inline_container.cc:659] . unexpected pos 64 vs 0"),
    ("metrics", "metrics.jsonl (No space left on device"),
    ("curves", "curves.png (No space left on device"),
    ("tensorboard", "tb (No space left on device"),
    ("summary", "summary.json (No space left on device"),
    ("config", "config.toml (No space left on device"),
])
def test_enospc_at_each_write_site_is_one_line(small_cifar, tmp_path, monkeypatch, capsys, site, words):
    out = tmp_path / "run"
    if site == "checkpoint":  # torch's own words for a full disk
        def full(*a, **k):
            raise RuntimeError("[enforce fail at inline_container.cc:659] . unexpected pos 64 vs 0")
        monkeypatch.setattr(torch, "save", full)
    elif site == "metrics":
        real_open = open
        monkeypatch.setattr(log, "open", lambda p, mode="r", *a, **k: _Full(real_open(p, mode, *a, **k)),
                            raising=False)
    elif site == "curves":
        import matplotlib.figure
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", _no_space)
    elif site == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        monkeypatch.setattr(SummaryWriter, "flush", _no_space)
    else:
        name = {"summary": "summary.json", "config": "config.toml"}[site]
        real = Path.write_text
        monkeypatch.setattr(Path, "write_text", lambda p, *a, **k: _no_space() if p.name == name else real(p, *a, **k))
    assert train.cli(tiny(small_cifar, out, "--run.epochs=1")) == 2
    assert words in one_error(capsys)
    assert not (out / "checkpoint.pt.tmp").exists()


class _Full:
    """A file whose writes fail as on a full disk."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        _no_space()

    def __getattr__(self, name):
        return getattr(self.f, name)


# ------------------------------------------------------------------------------------------- filesystem oddities

def test_a_symlink_loop_among_the_data_directories_is_one_line(tmp_path, capsys):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert train.cli(tiny(tmp_path / "a", tmp_path / "run")) == 2
    line = one_error(capsys)
    assert "cannot be followed" in line and "point --data.dir at the folder" in line


def test_data_dir_that_is_a_file_or_unreadable_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert train.cli(tiny(tmp_path / "file", tmp_path / "run")) == 2
    one_error(capsys)


# ------------------------------------------------------------------------------------------- values

@pytest.mark.parametrize("override,words", [
    ("--run.seed=4294967296", "run.seed = 4294967296 is out of range: must be <= 4294967295"),
    ("--data.split_seed=99999999999999999999", "data.split_seed"),
    ("--optim.warmup_epochs=1e308", "optim.warmup_epochs = 1e+308 is out of range"),
    ("--run.epochs=10000000", "run.epochs = 10000000 is out of range"),
    ("--model.depth=60002", "at most 10,000"),
    ("--optim.batch_size=100000000", "optim.batch_size = 100000000 is out of range"),
    ("--model.num_classes=5", "model.num_classes = 5 but the data's labels go up to"),
])
def test_values_a_run_cannot_use_are_one_line(small_cifar, tmp_path, capsys, override, words):
    assert train.cli(tiny(small_cifar, tmp_path / "run", override)) == 2
    assert words in one_error(capsys)


def test_every_numeric_key_has_an_upper_bound():
    """Each int or float key says how large it may be (a bound, a choice list or its own check), so a typo that
    would overflow a step count, a seed or a tensor's size stops at load."""
    unbounded = []
    for section, cls in config.SECTIONS.items():
        for f in dataclasses.fields(cls):
            m = f.metadata
            if f.type in ("int", "float", int, float) and not (m.get("le") is not None or m.get("lt") is not None
                                                               or m.get("check") or m.get("choices")):
                unbounded.append(f"{section}.{f.name}")
    assert not unbounded, unbounded


# ------------------------------------------------------------------------------------------- where a run lives

def test_a_run_resumes_whatever_its_directory_is_called_or_where_it_moved(small_cifar, tmp_path, monkeypatch, capsys):
    """Killed after each checkpoint, then resumed as runs/r, ./runs/r, its absolute path, and after a move."""
    monkeypatch.chdir(tmp_path)
    real_save = checkpoint.save

    def save_then_die(path, state):
        real_save(path, state)
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "save", save_then_die)
    for spelled in ("runs/r", "./runs/r", str(tmp_path / "runs" / "r")):
        with pytest.raises(KeyboardInterrupt):
            train.cli(tiny(small_cifar, spelled))
    monkeypatch.setattr(checkpoint, "save", real_save)
    shutil.move(tmp_path / "runs" / "r", tmp_path / "moved")
    assert train.cli(tiny(small_cifar, tmp_path / "moved")) == 0  # moved elsewhere: it finishes there
    assert [r["epoch"] for r in read_metrics(tmp_path / "moved")] == [1, 2, 3]
    err = capsys.readouterr().err
    assert "resuming after epoch 1" in err and "resuming after epoch 2" in err and "different config" not in err


def test_the_bad_input_sweep_finds_no_traceback(small_cifar, tmp_path):
    """tests/sweep_bad_inputs.py: many bad inputs, each must end in one line and a non-zero exit."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("sweep", Path(__file__).with_name("sweep_bad_inputs.py"))
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    failures = sweep.run(small_cifar, tmp_path)
    assert not failures, "\n".join(failures)
    assert len(sweep.CASES) >= 40
