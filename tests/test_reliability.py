"""What survives a crash: exact resume, a killed torchrun rank, atomic checkpoints, clear errors on bad input."""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastres import build, checkpoint, config, train
from fastres.data import cifar
from fastres.errors import UserError
from fastres.log import TIMING_FIELDS, read_metrics

from conftest import ROOT, run_cli, write_batch


def tiny(data_dir, out, *overrides):
    return [f"--data.dir={data_dir}", f"--run.out_dir={out}", "--model.depth=8", "--optim.batch_size=50",
            "--run.epochs=4", "--data.loader=gpu", "--data.val_size=50", *overrides]


def weights(out) -> dict[str, torch.Tensor]:
    return checkpoint.load(Path(out) / checkpoint.NAME)["model"]


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------- exact resume

@pytest.mark.slow
@pytest.mark.parametrize("amp", ["off", "fp16"])
def test_four_epochs_equal_two_then_two_more(small_cifar, tmp_path, monkeypatch, amp):
    """Train 4 epochs; train 2, stop, resume for 2 more: the same weights, optimizer and scaler, bit for bit."""
    # 2 steps of 4 images an epoch: a CPU has no fast fp16 kernels (its backward pass takes ~90 ms an image)
    extra = [f"--precision.amp={amp}", "--model.dropout=0.1", "--model.stochastic_depth=0.2", "--data.subset=12",
             "--data.val_size=4", "--data.test_subset=8", "--optim.batch_size=4", "--optim.warmup_epochs=1",
             "--data.loader=workers", "--data.num_workers=1", "--run.device=cpu"]
    train.main(config.load(None, tiny(small_cifar, tmp_path / "a", *extra)))

    real_save, saves = checkpoint.save, []

    def save_twice_then_die(path, state):
        real_save(path, state)
        saves.append(path)
        if len(saves) == 2:
            raise KeyboardInterrupt  # the process dies right after its 2nd checkpoint (epoch 2)

    monkeypatch.setattr(checkpoint, "save", save_twice_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.main(config.load(None, tiny(small_cifar, tmp_path / "b", *extra)))
    monkeypatch.setattr(checkpoint, "save", real_save)
    assert checkpoint.load(tmp_path / "b" / checkpoint.NAME)["progress"]["epoch"] == 2
    train.main(config.load(None, tiny(small_cifar, tmp_path / "b", *extra)))

    a, b = (checkpoint.load(tmp_path / d / checkpoint.NAME) for d in ("a", "b"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])
    assert a["scaler"] == b["scaler"]
    strip = TIMING_FIELDS
    rows = [[{k: v for k, v in r.items() if k not in strip} for r in read_metrics(tmp_path / d)] for d in "ab"]
    assert rows[0] == rows[1] and [r["epoch"] for r in rows[1]] == [1, 2, 3, 4]


def test_resume_after_a_crash_between_metrics_and_checkpoint(small_cifar, tmp_path, monkeypatch):
    """metrics.jsonl got epoch 2's row but the checkpoint did not: no duplicate, none lost, TB too."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    real_save = checkpoint.save

    def die_on_second(path, state):
        if state["progress"]["epoch"] == 2:
            raise KeyboardInterrupt  # after log.evaluation(row) wrote epoch 2, before its checkpoint
        real_save(path, state)

    monkeypatch.setattr(checkpoint, "save", die_on_second)
    with pytest.raises(KeyboardInterrupt):
        train.main(config.load(None, tiny(small_cifar, tmp_path, "--run.epochs=3")))
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1, 2]
    with open(tmp_path / "metrics.jsonl", "a") as f:  # and a row torn by the kill
        f.write('{"epoch": 3, "step": 2')
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1, 2]
    monkeypatch.setattr(checkpoint, "save", real_save)
    train.main(config.load(None, tiny(small_cifar, tmp_path, "--run.epochs=3")))
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    steps = [e.step for e in ea.Scalars("test/acc")]
    assert steps == sorted(set(steps)) == [r["step"] for r in read_metrics(tmp_path)]


def test_a_bad_metrics_line_before_the_last_is_a_user_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\nnot json\n{"epoch": 2}\n')
    with pytest.raises(UserError, match="line 2 is not a metrics row"):
        read_metrics(tmp_path)


def _state(n: int, epoch: int) -> dict:
    """The smallest state with every part a checkpoint must have."""
    return {**{part: {} for part in checkpoint.PARTS}, "model": {"x": torch.arange(n)}, "progress": {"epoch": epoch}}


def test_a_crash_in_the_middle_of_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / checkpoint.NAME
    checkpoint.save(path, _state(3, 1))

    def half_written(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, _state(5, 2))
    monkeypatch.undo()
    state = checkpoint.load(path)
    assert state["progress"]["epoch"] == 1 and torch.equal(state["model"]["x"], torch.arange(3))
    checkpoint.save(path, _state(7, 2))  # the next save replaces both
    assert checkpoint.load(path)["progress"]["epoch"] == 2 and not (tmp_path / "checkpoint.pt.tmp").exists()


def test_checkpoints_load_weights_only(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save({"evil": Payload()}, tmp_path / checkpoint.NAME)
    with pytest.raises(train.UserError, match="cannot be read"):
        checkpoint.load(tmp_path / checkpoint.NAME)


# ------------------------------------------------------------------------------------------- a killed rank

def _worker_pids(agent: int) -> dict[int, int]:
    """LOCAL_RANK -> pid of the workers torchrun's agent ``agent`` started."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (d / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == agent:
            for item in env:
                if item.startswith(b"LOCAL_RANK="):
                    found[int(item.split(b"=")[1])] = int(d.name)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc to find the workers")
def test_torchrun_restarts_a_killed_rank_and_finishes_like_an_uninterrupted_run(cifar_dir, tmp_path):
    common = [f"--data.dir={cifar_dir}", "--data.subset=960", "--data.test_subset=100", "--run.epochs=4",
              "--optim.batch_size=64", "--model.depth=8", "--data.loader=gpu"]
    ref = run_cli([*common, f"--run.out_dir={tmp_path / 'ref'}"], torchrun=2)
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=2",
           "-m", "fastres.train", *common, f"--run.out_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "log", "w") as log:
        agent = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while not (out / checkpoint.NAME).exists():  # the first checkpoint (epoch 1)
            assert agent.poll() is None and time.time() < deadline, (tmp_path / "log").read_text()
            time.sleep(0.05)
        victim = _worker_pids(agent.pid).get(1)
        assert victim, "no rank-1 worker found"
        os.kill(victim, signal.SIGKILL)
        assert agent.wait(timeout=300) == 0, (tmp_path / "log").read_text()
    text = (tmp_path / "log").read_text()
    assert "fastres: resuming a" in text  # the restarted workers continued from the checkpoint
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2, 3, 4]
    a, b = weights(tmp_path / "ref"), weights(out)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------- bad input

def _bad_data(small_cifar: Path, damage: str) -> Path:
    path = small_cifar / "data_batch_2"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:5000])
    elif damage == "corrupt":
        path.write_bytes(random.Random(0).randbytes(4000))  # seeded: tests/test_data.py fuzzes many more
    elif damage == "shape":
        import numpy as np
        write_batch(path, np.zeros((100, 1000), np.uint8), [0] * 100)
    elif damage == "labels":
        import numpy as np
        write_batch(path, np.zeros((100, 3072), np.uint8), [11] * 100)
    return small_cifar


CASES = {
    # config
    "unknown key": (lambda d, o, n: tiny(d, n, "--model.dpth=20"), "unknown key 'model.dpth'"),
    "wrong type": (lambda d, o, n: tiny(d, n, "--optim.batch_size=abc"), "optim.batch_size = 'abc' has the wrong type"),
    "malformed TOML": (lambda d, o, n: ["--config", str(_write(o.parent / "bad.toml", "[model\n"))], "malformed TOML"),
    "missing config file": (lambda d, o, n: ["--config", str(o.parent / "nope.toml")], "not found"),
    "out of range": (lambda d, o, n: tiny(d, n, "--optim.momentum=1.5"), "optim.momentum = 1.5 is out of range"),
    "unknown choice": (lambda d, o, n: tiny(d, n, "--precision.amp=fp8"), "is not one of: off, fp16, bf16"),
    "bad depth": (lambda d, o, n: tiny(d, n, "--model.depth=21"), "6n+2"),
    # data
    "data missing": (lambda d, o, n: tiny(o.parent / "empty", n), "downloading"),
    "data truncated": (lambda d, o, n: tiny(_bad_data(d, "truncated"), n), "data_batch_2 is truncated"),
    "data corrupt": (lambda d, o, n: tiny(_bad_data(d, "corrupt"), n), "data_batch_2 is truncated or not a CIFAR-10"),
    "data wrong shape": (lambda d, o, n: tiny(_bad_data(d, "shape"), n), "expected uint8 (100, 3072)"),
    "labels out of range": (lambda d, o, n: tiny(_bad_data(d, "labels"), n), "labels out of range"),
    # runtime
    "batch not divisible": (lambda d, o, n: tiny(d, n, "--optim.accum_steps=3"), "does not split evenly"),
    "subset too small for a batch": (lambda d, o, n: tiny(d, n, "--data.subset=60"), "no full batch"),
    # output
    "out_dir is a file": (lambda d, o, n: tiny(d, _write(o.parent / "afile", "keep")), "is a file"),
    "out_dir not writable": (lambda d, o, n: tiny(d, _write(o.parent / "f2", "keep") / "sub"), "cannot write"),
    # resume
    "nothing to resume": (lambda d, o, n: tiny(d, n, "--run.resume=require"), "to resume from"),
    "resume never, dir in use": (lambda d, o, n: tiny(d, o, "--run.resume=never", "--run.epochs=1"), "is not empty"),
    "resume with another config": (lambda d, o, n: tiny(d, o, "--optim.lr_per_128=0.3", "--run.epochs=1"),
                                   "different config (optim.lr_per_128)"),
    "corrupt checkpoint": (lambda d, o, n: tiny(d, _corrupt_ckpt(o), "--run.epochs=1"), "cannot be read"),
    "checkpoint with a flipped bit": (lambda d, o, n: tiny(d, _damage_ckpt(o, "bit"), "--run.epochs=1"),
                                      "fails its CRC-32 check"),
    "checkpoint without a part": (lambda d, o, n: tiny(d, _damage_ckpt(o, "part"), "--run.epochs=1"),
                                  "not a whole fastres checkpoint (scaler missing"),
    "checkpoint progress damaged": (lambda d, o, n: tiny(d, _damage_ckpt(o, "progress"), "--run.epochs=1"),
                                    "does not fit this run (progress.epoch is 'one')"),
    "checkpoint of another model": (lambda d, o, n: tiny(d, _damage_ckpt(o, "model"), "--run.epochs=1"),
                                    "does not fit this run (Error(s) in loading state_dict"),
    # hardware / packages
    "DALI missing": (lambda d, o, n: tiny(d, n, "--data.loader=dali"), "pip install nvidia-dali-cuda130"),
    "CUDA absent": (lambda d, o, n: tiny(d, n, "--run.device=cuda"), "no CUDA device"),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _corrupt_ckpt(out: Path) -> Path:
    (out / checkpoint.NAME).write_bytes(b"not a checkpoint")
    return out


def _damage_ckpt(out: Path, how: str) -> Path:
    path = out / checkpoint.NAME
    if how == "bit":  # a weight's byte, deep inside the file: the zip and the pickle still read
        b = bytearray(path.read_bytes())
        b[len(b) // 2] ^= 1
        path.write_bytes(bytes(b))
        return out
    state = torch.load(path, weights_only=True)
    if how == "part":
        del state["scaler"]
    elif how == "progress":
        state["progress"]["epoch"] = "one"
    elif how == "model":
        state["model"] = {k: v[:1] if v.ndim else v for k, v in state["model"].items()}
        (out / "summary.json").unlink()  # a run stopped before its end: resuming loads the model (a finished one not)
    torch.save(state, path)
    return out


@pytest.fixture
def existing_run(small_cifar, tmp_path):
    """A finished one-epoch run in tmp_path/run: what bad input must never damage."""
    out = tmp_path / "run"
    assert train.cli(tiny(small_cifar, out, "--run.epochs=1")) == 0
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_nonzero_and_destroys_nothing(case, small_cifar, existing_run, monkeypatch, capsys):
    if case == "CUDA absent" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if case == "DALI missing":
        monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    if case == "data missing":
        def offline(*a, **k):
            raise cifar.urllib.error.URLError("offline")
        monkeypatch.setattr(cifar.urllib.request, "urlopen", offline)
    make_args, words = CASES[case]
    args = make_args(small_cifar, existing_run, existing_run.parent / "new")
    before = snapshot(existing_run) if "checkpoint" not in case else None
    capsys.readouterr()
    rc = train.cli(args)
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastres: error: ") and "Traceback" not in err, err
    assert words in lines[0], lines[0]
    if before is not None:
        assert snapshot(existing_run) == before  # nothing already written was touched


def test_nan_loss_stops_names_the_step_and_keeps_the_last_good_checkpoint(small_cifar, tmp_path, monkeypatch, capsys):
    real = build.build_schedule

    def exploding(cfg, steps_per_epoch, epochs):
        s = real(cfg, steps_per_epoch, epochs)

        class Exploding(type(s)):
            def __call__(self, step):
                return 1e30 if step >= 2 * steps_per_epoch + 3 else super().__call__(step)  # blows up in epoch 3

        return Exploding(**{f.name: getattr(s, f.name) for f in dataclasses.fields(s)})

    monkeypatch.setattr(build, "build_schedule", exploding)
    out = tmp_path / "run"
    assert train.cli(tiny(small_cifar, out)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fastres: error:")]
    assert len(err) == 1 and "NaN/inf at step" in err[0] and "(epoch 3)" in err[0], err
    bad = int(err[0].split("at step ")[1].split()[0])
    assert 2 * 9 + 3 <= bad < 3 * 9  # 9 steps per epoch; the loss goes bad within a step or two
    state = checkpoint.load(out / checkpoint.NAME)
    assert state["progress"]["epoch"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values()
                                                   if v.is_floating_point())
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2]


def test_a_full_disk_at_checkpoint_time_is_one_line(small_cifar, tmp_path, monkeypatch, capsys):
    def full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    assert train.cli(tiny(small_cifar, tmp_path / "run", "--run.epochs=1")) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "no checkpoint was written" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoint.pt.tmp").exists()


def test_batch_not_divisible_by_the_world_size_under_torchrun(cifar_dir, tmp_path):
    """Every rank stops at load. Rank 0 prints the line; each rank writes it to its TORCHELASTIC_ERROR_FILE, so
    torchrun's report ends with it as the root cause's traceback, where "To enable traceback see ..." stood."""
    r = run_cli([f"--data.dir={cifar_dir}", f"--run.out_dir={tmp_path / 'run'}", "--optim.batch_size=33",
                 "--model.depth=8", "--data.subset=500"], torchrun=2, timeout=300)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("fastres: error:")]
    assert errors and all("does not split evenly over 2 rank(s)" in e for e in errors)
    assert len(errors) == 1  # one line, from rank 0
    tail = r.stderr.strip().splitlines()[-3:]  # the root cause's "traceback : ..." line, then the border
    assert any(line.strip() == f"traceback : {errors[0]}" for line in tail), r.stderr[-3000:]
    assert "To enable traceback" not in r.stderr and "error_file: <N/A>" not in r.stderr.split("Root Cause")[-1]
    assert not (tmp_path / "run").exists()


def test_dali_missing_from_the_command_line(cifar_dir, tmp_path):
    shim = tmp_path / "shim" / "nvidia" / "dali"
    shim.mkdir(parents=True)
    (shim.parent / "__init__.py").write_text("")
    (shim / "__init__.py").write_text("raise ImportError('no DALI here')\n")
    env = {"PYTHONPATH": f"{tmp_path / 'shim'}{os.pathsep}{ROOT}"}
    r = run_cli([*tiny(cifar_dir, tmp_path / "out"), "--data.loader=dali", "--data.subset=500"], env=env,
                timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("fastres: error: data.loader = 'dali' but NVIDIA DALI does not import")
