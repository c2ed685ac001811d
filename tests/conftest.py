"""Shared fixtures: CIFAR-10 files in the official layout (synthetic or the real set) and a CLI runner."""

from __future__ import annotations

import os
import pickle
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from fastres import checkpoint
from fastres.data import cifar

# torch.compile on a CPU: inductor's C++ kernels without SIMD compile in about half the time (the first ResNet-8
# run's 31 -> 18 s on 2 cores); the graphs and what the tests compare are the same, and a GPU compiles Triton anyway
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------- pytest -m quick
# A newcomer's first look (under a minute on 2 CPU cores, against ~6 for the whole suite): a few tests from each
# area they meet first, keyed by file and test name ("[id]" for one case of a parametrized test, else all of its
# cases). tests/test_quick.py checks each area keeps a test that pytest still collects.
QUICK = {
    "config": ["test_config.py::test_baseline_is_the_seed_recipe",
               "test_config.py::test_overrides_are_typed_from_the_dataclass",
               "test_config.py::test_every_shipped_config_loads", "test_config.py::test_toml_round_trip"],
    "model": ["test_model.py::test_parameter_counts_equal_the_paper", "test_model.py::test_shapes[A-post]",
              "test_model.py::test_every_flag_off_is_the_plain_resnet20"],
    "training step": ["test_train.py::test_one_bf16_step", "test_optim.py::test_step_schedule_is_the_papers",
                      "test_train.py::test_curves_png_names_the_run_with_error_in_percent_by_whole_epoch"],
    "resume": ["test_train.py::test_resume_equals_uninterrupted[gpu]"],
    "errors": ["test_config.py::test_bad_overrides_name_the_key",
               "test_config.py::test_cli_config_error_is_one_line_and_exit_2",
               "test_environment.py::test_values_a_run_cannot_use_are_one_line",
               "test_data.py::test_a_failed_download_leaves_no_folder_it_made"],
    "the quick set itself": ["test_quick.py::test_quick_set_covers_every_area"],
}
COLLECTED: dict[str, list[str]] = {}  # this session's test ids by file, before -m deselects any
MARKED: dict[str, list[str]] = {}  # QUICK's entries -> the test ids they marked


@pytest.hookimpl(tryfirst=True)  # before -m quick deselects what is not marked
def pytest_collection_modifyitems(config, items):
    wanted = {entry for entries in QUICK.values() for entry in entries}
    for item in items:
        file = item.path.name
        COLLECTED.setdefault(file, []).append(item.name)
        for key in (f"{file}::{item.name}", f"{file}::{getattr(item, 'originalname', item.name)}"):
            if key in wanted:
                item.add_marker(pytest.mark.quick)
                MARKED.setdefault(key, []).append(item.nodeid)
                break
    # the slow tests first (a stable sort: each file's order kept): under -n they start early, spread over the
    # workers (one at a time, pytest_configure), instead of leaving one worker with a minute-long test at the end
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_configure(config):
    """Under pytest-xdist (-n N) each worker gets its share of the cores for torch's threads, and so do the
    processes its tests start (OMP_NUM_THREADS): N workers at the default thread count each oversubscribe the
    machine, and OpenMP's spinning threads then make the suite slower than one worker."""
    if os.environ.get("CI"):  # CI installs torchvision beside torch (launch/install.sh): no test skips for want of it
        try:
            import torchvision  # noqa: F401
        except Exception as e:  # absent, or built for another torch
            raise pytest.UsageError(f"CI: torchvision does not import ({e}): launch/install.sh pairs it") from e
    if getattr(config.option, "numprocesses", None) and getattr(config.option, "maxschedchunk", 0) is None:
        config.option.maxschedchunk = 1  # tests handed out one at a time: no worker gets a batch of slow ones
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG states, so none depends on which tests ran before it
    (a test that draws with torch.randn unseeded sees the same numbers alone, in -k, and in CI)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def write_batch(path: Path, x: np.ndarray, y, **extra) -> None:
    """One batch file as the official set writes it: a dict of bytes keys, uint8 (N, 3072), list labels."""
    d = {b"batch_label": b"synthetic", b"labels": list(map(int, y)), b"data": x,
         b"filenames": [f"{i}.png".encode() for i in range(len(y))], **extra}
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)


def write_cifar(folder: Path, per_file: int, seed: int = 0) -> Path:
    """A synthetic CIFAR-10 folder (5 train batches + test) with ``per_file`` images each; returns it."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in cifar.TRAIN_FILES + (cifar.TEST_FILE,):
        x = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
        write_batch(folder / name, x, rng.integers(0, 10, size=per_file))
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"num_cases_per_batch": per_file, b"label_names": [b"c%d" % i for i in range(10)],
                     b"num_vis": 3072}, f, protocol=2)
    return folder


@pytest.fixture
def small_cifar(tmp_path, monkeypatch) -> Path:
    """A synthetic set of 100 images per file; the reader is told to expect that many."""
    monkeypatch.setattr(cifar, "PER_FILE", 100)
    return write_cifar(tmp_path / "cifar-10-batches-py", per_file=100)


def real_dir() -> Path | None:
    for cand in (os.environ.get("FASTRES_DATA"), ROOT / "data" / "cifar10"):
        if cand and cifar.find(cand) is not None:
            return cifar.find(cand)
    return None


@pytest.fixture(scope="session")
def real_cifar() -> Path:
    d = real_dir()
    if d is None:
        pytest.skip("the real CIFAR-10 set is not here: set FASTRES_DATA to the folder holding cifar-10-batches-py")
    return d


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    """Full-size files for end-to-end runs: the real set when present, else synthetic (10000 per file)."""
    return real_dir() or write_cifar(tmp_path_factory.mktemp("data") / "cifar-10-batches-py", cifar.PER_FILE)


def run_cli(args: list[str], *, env: dict | None = None, timeout: int = 600, module: str = "fastres.train",
            torchrun: int = 0) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` (or under torchrun with that many processes) from the repo root."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               "-m", module, *args]
    else:
        cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def killed_after_first_checkpoint(monkeypatch, run: Callable[[], object]) -> None:
    """``run()`` as a process killed right after writing its first checkpoint (checkpoint.save is itself
    again afterwards)."""
    real_save = checkpoint.save

    def save_then_die(path, state):
        real_save(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(checkpoint, "save", real_save)
