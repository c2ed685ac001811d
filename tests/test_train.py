"""The training path end to end: in-process on tiny synthetic sets, and through the CLI and torchrun."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import pytest
import torch

from fastres import build, checkpoint, config, evaluate, log, optim, train
from fastres.errors import UserError
from fastres.log import read_metrics
from fastres.model import build_model, count_params

from conftest import ROOT, killed_after_first_checkpoint, run_cli


def tiny(small_cifar, tmp_path, *overrides: str) -> config.Config:
    return config.load(None, [f"--data.dir={small_cifar}", f"--run.out_dir={tmp_path / 'run'}",
                              "--model.depth=8", "--optim.batch_size=50", "--run.epochs=2",
                              "--data.loader=gpu", "--data.val_size=50", *overrides])


def weights(out_dir) -> dict[str, torch.Tensor]:
    return checkpoint.load(out_dir / checkpoint.NAME)["model"]


def test_one_bf16_step(small_cifar, tmp_path):
    cfg = tiny(small_cifar, tmp_path, "--precision.amp=bf16", "--run.epochs=1", "--data.subset=150",
               "--data.test_subset=20", "--precision.channels_last=true")
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in build_model(cfg.model).state_dict().items()}
    s = train.main(cfg)
    assert s["steps"] == 2 and s["final_test_acc"] is not None
    after = weights(tmp_path / "run")
    moved = [k for k in init if k.endswith("weight") and not torch.equal(init[k], after[k])]
    assert len(moved) == sum(k.endswith("weight") for k in init)  # every layer was updated
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())


def test_fp16_on_a_cpu_it_was_not_asked_for_is_refused(small_cifar, tmp_path):
    with pytest.raises(UserError, match="fp16 on a CPU .* --run.device=cpu to run fp16 on the CPU anyway"):
        train.main(tiny(small_cifar, tmp_path, "--precision.amp=fp16", "--run.device=auto"))
    assert not (tmp_path / "run").exists()


def test_fp16_uses_a_grad_scaler(small_cifar, tmp_path):
    s = train.main(tiny(small_cifar, tmp_path, "--precision.amp=fp16", "--run.device=cpu", "--run.epochs=1",
                        "--data.subset=70", "--optim.batch_size=10", "--data.test_subset=20"))  # fp16: slow on a CPU
    assert s["steps"] == 2
    state = checkpoint.load(tmp_path / "run" / checkpoint.NAME)
    assert state["scaler"]["scale"] > 1  # the scaler ran (it starts at 2**16)


def test_outputs_of_a_run(small_cifar, tmp_path):
    cfg = tiny(small_cifar, tmp_path, "--run.target_acc=0.01")
    s = train.main(cfg)
    out = tmp_path / "run"
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert set(r) >= {"epoch", "step", "train_loss", "test_acc", "val_acc", "lr", "train_time_s", "img_per_s"}
        assert 0 <= r["test_acc"] <= 1 and 0 <= r["val_acc"] <= 1
    assert rows[1]["train_time_s"] > rows[0]["train_time_s"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(json.dumps(s))
    assert (out / "curves.png").exists()
    for key in ("time_to_target_s", "final_test_acc", "train_time_s", "epochs", "params", "git_sha",
                "torch_version", "device", "world_size", "seed", "config"):
        assert key in summary
    # target 1%: reached at the first evaluation, at that evaluation's training time
    assert summary["time_to_target_s"] == rows[0]["train_time_s"] and summary["epochs_to_target"] == 1
    assert summary["final_test_acc"] == rows[-1]["test_acc"]
    assert summary["params"] == count_params(build_model(cfg.model))
    assert summary["world_size"] == 1 and summary["steps"] == 2 * (450 // 50)
    assert config.load(out / "config.toml") == cfg  # the resolved config, saved


def test_target_never_reached_is_null(small_cifar, tmp_path):
    s = train.main(tiny(small_cifar, tmp_path, "--run.target_acc=1.0", "--run.epochs=1"))
    assert s["time_to_target_s"] is None and s["epochs_to_target"] is None


def test_eval_every(small_cifar, tmp_path):
    train.main(tiny(small_cifar, tmp_path, "--run.epochs=3", "--run.eval_every=2"))
    assert [r["epoch"] for r in read_metrics(tmp_path / "run")] == [2, 3]  # every 2nd epoch and the end


@pytest.mark.parametrize("loader", ["gpu", "workers"])
def test_resume_equals_uninterrupted(small_cifar, tmp_path, monkeypatch, loader):
    """Stop right after the first checkpoint, resume: the same weights, bit for bit, as never stopping."""
    extra = [f"--data.loader={loader}", "--data.num_workers=1", "--model.stochastic_depth=0.3", "--model.dropout=0.2",
             "--optim.warmup_epochs=1", "--optim.batch_size=100"]
    train.main(tiny(small_cifar, tmp_path / "a", *extra))

    killed_after_first_checkpoint(monkeypatch, lambda: train.main(tiny(small_cifar, tmp_path / "b", *extra)))
    assert [r["epoch"] for r in read_metrics(tmp_path / "b" / "run")] == [1]
    train.main(tiny(small_cifar, tmp_path / "b", *extra))

    a, b = weights(tmp_path / "a" / "run"), weights(tmp_path / "b" / "run")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra, rb = read_metrics(tmp_path / "a" / "run"), read_metrics(tmp_path / "b" / "run")
    assert [r["epoch"] for r in rb] == [1, 2]  # no duplicated or lost rows
    assert [(r["train_loss"], r["test_acc"]) for r in ra] == [(r["train_loss"], r["test_acc"]) for r in rb]


def test_resume_modes_and_config_mismatch(small_cifar, tmp_path):
    with pytest.raises(UserError, match="no .* to resume from"):
        train.main(tiny(small_cifar, tmp_path, "--run.resume=require", "--run.epochs=1"))
    train.main(tiny(small_cifar, tmp_path, "--run.epochs=1"))
    with pytest.raises(UserError, match="is not empty"):
        train.main(tiny(small_cifar, tmp_path, "--run.resume=never", "--run.epochs=1"))
    with pytest.raises(UserError, match=r"different config \(model.depth, optim.lr_per_128\)"):
        train.main(tiny(small_cifar, tmp_path, "--run.epochs=1", "--model.depth=14", "--optim.lr_per_128=0.2"))
    # a finished run resumed again trains nothing and reports the same
    s = train.main(tiny(small_cifar, tmp_path, "--run.epochs=1", "--run.resume=require"))
    assert s["steps"] == 9 and len(read_metrics(tmp_path / "run")) == 1


def test_batch_must_split_over_ranks_and_micro_batches(small_cifar, tmp_path):
    with pytest.raises(UserError, match="does not split evenly"):
        train.main(tiny(small_cifar, tmp_path, "--optim.batch_size=50", "--optim.accum_steps=3"))


def test_out_dir_that_is_a_file(small_cifar, tmp_path):
    (tmp_path / "file").write_text("keep me")
    with pytest.raises(UserError, match="is a file"):
        train.main(tiny(small_cifar, tmp_path, f"--run.out_dir={tmp_path / 'file'}"))
    assert (tmp_path / "file").read_text() == "keep me"


def test_accumulation_of_one_is_the_plain_step(small_cifar, tmp_path):
    train.main(tiny(small_cifar, tmp_path / "a", "--run.epochs=1"))
    train.main(tiny(small_cifar, tmp_path / "b", "--run.epochs=1", "--optim.accum_steps=1"))
    a, b = weights(tmp_path / "a" / "run"), weights(tmp_path / "b" / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)



def test_alternating_flip_trains_like_random_flip_until_epoch_two(small_cifar, tmp_path):
    """data.flip = alternate draws epoch 0's flips as random does, so one epoch is the same run bit for bit;
    from epoch 1 on the flips differ, and so do the weights."""
    for epochs in (1, 2):
        for flip in ("random", "alternate"):
            train.main(tiny(small_cifar, tmp_path / f"{flip}{epochs}", f"--run.epochs={epochs}", f"--data.flip={flip}"))
        a, b = (weights(tmp_path / f"{flip}{epochs}" / "run") for flip in ("random", "alternate"))
        assert all(torch.equal(a[k], b[k]) for k in a) == (epochs == 1)


# ------------------------------------------------------------------------------------------- CLI

@pytest.mark.slow
def test_cli_smoke_run_writes_metrics_summary_and_tensorboard(cifar_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "smoke"
    r = run_cli(["--config", "configs/smoke.toml", f"--data.dir={cifar_dir}", f"--run.out_dir={out}",
                 "--data.subset=712", "--data.val_size=200", "--data.test_subset=200", "--run.epochs=2"])
    assert r.returncode == 0, r.stderr
    assert "epoch   2" in r.stderr and "fastres: done" in r.stderr and "(269,722 params)" in r.stderr
    rows = read_metrics(out)
    summary = json.loads((out / "summary.json").read_text())
    assert len(rows) == 2 and summary["final_test_acc"] == rows[-1]["test_acc"]
    assert summary["config"]["run"]["name"] == "smoke" and summary["params"] == 269_722
    ea = EventAccumulator(str(out / "tb"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"train/loss", "train/lr", "test/acc", "val/acc", "perf/img_per_s"} <= tags
    acc = ea.Scalars("test/acc")
    assert [e.step for e in acc] == [r["step"] for r in rows]
    assert [round(e.value, 6) for e in acc] == [round(r["test_acc"], 6) for r in rows]
    # event times sit at the run's start + train_time_s (the WALL axis is the training wall-clock)
    t0 = checkpoint.load(out / checkpoint.NAME)["progress"]["t0"]
    assert [e.wall_time - t0 for e in acc] == pytest.approx([r["train_time_s"] for r in rows], abs=1e-3)


def test_tensorboard_lr_holds_only_what_the_schedule_used(small_cifar, tmp_path):
    """train/lr at step s is schedule(s - 1), the lr of the s-th step, from batch() and the evaluations alike; no
    made-up (0, 0.0) point (the run has no warmup, so the schedule never used 0)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny(small_cifar, tmp_path, "--log.every_steps=4")  # 9 steps an epoch; milestones at steps 9 and 14
    train.main(cfg)
    schedule = optim.build_schedule(cfg.optim, 450 // 50, cfg.run.epochs)
    ea = EventAccumulator(str(tmp_path / "run" / "tb"))
    ea.Reload()
    lr = [(e.step, e.value) for e in ea.Scalars("train/lr")]
    assert [step for step, _ in lr] == [4, 8, 9, 12, 16, 18]  # every 4th step and each evaluation's
    assert [v for _, v in lr] == pytest.approx([schedule(step - 1) for step, _ in lr], rel=1e-6)
    assert len({v for _, v in lr}) == 3 and cfg.optim.warmup_epochs == 0 and min(v for _, v in lr) > 0


def test_curves_png_names_the_run_with_error_in_percent_by_whole_epoch():
    rows = [dict(epoch=e, train_acc=0.5 + e / 10, val_acc=0.4 + e / 10, test_acc=0.45 + e / 10) for e in (1, 2, 3)]
    fig = log.curves_figure(rows, "smoke")
    (ax,) = fig.axes
    assert "smoke" in ax.get_title() and ax.get_ylabel() == "error (%)"
    assert all(float(t).is_integer() for t in ax.get_xticks())  # no epoch 1.5
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"train (augmented batches)", "validation", "test"}


def test_help_into_a_pipe_closed_early_is_quiet():
    """``python -m fastres.train --help | head -1``, the reader gone before the usage is written: no
    BrokenPipeError traceback, exit 0."""
    proc = subprocess.Popen([sys.executable, "-m", "fastres.train", "--help"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # before the child has imported torch, let alone printed: its write meets no reader
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == ""


def test_cli_bad_data_dir_is_one_line(tmp_path):
    empty = tmp_path / "empty"
    (empty / "cifar-10-batches-py").mkdir(parents=True)
    (empty / "cifar-10-batches-py" / "test_batch").write_bytes(b"junk")
    r = run_cli([f"--data.dir={empty}", f"--run.out_dir={tmp_path / 'out'}"], timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("fastres: error:")]
    assert len(lines) == 1 and "data_batch_1" in lines[0] and "missing" in lines[0]


def _has_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.parametrize("variant", [
    ["--data.loader=gpu", "--optim.label_smoothing=0.1", "--optim.warmup_epochs=1", "--model.init=lsuv",
     "--optim.ema_decay=0.9"],
    ["--data.loader=workers", "--data.num_workers=1", "--model.stochastic_depth=0.5", "--model.block=pre"],
    pytest.param(["--data.loader=dali", "--data.num_workers=1", "--model.shortcut=B"],
                 marks=pytest.mark.skipif(not _has_dali(), reason="NVIDIA DALI is not installed")),
], ids=["gpu-loader+lsuv", "workers-loader+sd+preact", "dali-loader+shortcut-B"])
@pytest.mark.slow
def test_two_process_ddp_equals_one_process(cifar_dir, tmp_path, variant):
    """2 gloo ranks x 32 images (torchrun) == 1 process x 64 images taken as 2 micro-batches of 32 (in this one).

    BatchNorm normalizes over what one rank sees, so the single process must see the same groups: its
    micro-batch m holds every 2nd image of the batch, exactly rank m's share under DistributedSampler.
    """
    common = [f"--data.dir={cifar_dir}", "--data.subset=384", "--data.test_subset=100", "--run.epochs=2",
              "--optim.batch_size=64", "--model.depth=14", *variant]
    r2 = run_cli([*common, f"--run.out_dir={tmp_path / 'ddp'}"], torchrun=2)
    assert r2.returncode == 0, r2.stderr
    assert "FutureWarning" not in r2.stderr, r2.stderr  # DDP's deprecated broadcast_buffers printed one per rank
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs (OMP_NUM_THREADS=1): more threads sum a convolution in another order
    try:
        train.main(config.load(None, [*common, f"--run.out_dir={tmp_path / 'one'}", "--optim.accum_steps=2"]))
    finally:
        torch.set_num_threads(threads)
    a, b = weights(tmp_path / "ddp"), weights(tmp_path / "one")
    params = [k for k in a if "running" not in k and "num_batches" not in k]
    for k in params:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    for k in set(a) - set(params):  # BN's running statistics too: once a step, from rank 0's share of the batch
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    if "--optim.ema_decay=0.9" in variant:  # the weight average too, BN statistics included
        ea, eb = (checkpoint.load(tmp_path / r / checkpoint.NAME)["ema"]["avg"] for r in ("ddp", "one"))
        assert sorted(ea) == sorted(eb) and any("running" in k for k in ea)
        for k in ea:
            torch.testing.assert_close(ea[k], eb[k], rtol=1e-5, atol=1e-6, msg=k)
    s2 = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert s2["world_size"] == 2 and s2["steps"] == 2 * (384 // 64)
    m2, m1 = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "one")
    assert [r["train_loss"] for r in m2] == pytest.approx([r["train_loss"] for r in m1], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("sd", ["0", "0.5"], ids=["whole-model", "per-branch-with-sd"])
def test_compile_trains_like_eager(small_cifar, tmp_path, sd):
    """torch.compile (the whole net; or each residual branch when stochastic depth decides per step)."""
    args = ["--run.epochs=1", "--data.subset=250", "--data.test_subset=50", f"--model.stochastic_depth={sd}"]
    eager = train.main(tiny(small_cifar, tmp_path / "eager", *args))
    compiled = train.main(tiny(small_cifar, tmp_path / "compiled", *args, "--precision.compile=true"))
    a, b = weights(tmp_path / "eager" / "run"), weights(tmp_path / "compiled" / "run")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)
    assert compiled["final_test_acc"] == pytest.approx(eager["final_test_acc"], abs=0.04)


@pytest.mark.slow
def test_compile_makes_the_evaluations_graphs_before_training(small_cifar, tmp_path, monkeypatch):
    """The warm-up evaluates blank images of each split's shape (with TTA, precise BN, EMA), so the evaluations
    in the run compile nothing (on the H100 the first one took seconds, counted as evaluation time), and the
    run is the one without that warm-up evaluation: weights and BN statistics are put back."""
    from torch._dynamo.utils import counters
    args = ["--run.epochs=2", "--data.subset=250", "--data.test_subset=50", "--precision.compile=true",
            "--eval.tta=flip-translate", "--eval.precise_bn=true", "--eval.precise_bn_batches=2",
            "--optim.ema_decay=0.9"]
    compiles = []  # frames dynamo compiled during each evaluation call, in call order
    # every scoring pass goes through evaluate.accuracies (evaluate.accuracy calls it), and precise BN
    real = {name: getattr(evaluate, name) for name in ("precise_bn_", "accuracies")}

    def counting(fn):
        def call(*a, **kw):
            before = counters["frames"]["ok"]
            out = fn(*a, **kw)
            compiles.append(counters["frames"]["ok"] - before)
            return out
        return call
    for name, fn in real.items():
        monkeypatch.setattr(evaluate, name, counting(fn))
    train.main(tiny(small_cifar, tmp_path / "warm", *args))
    per_eval = 5  # the trained weights' accuracy, then the average's: running-BN accuracy, precise BN, test, val
    assert len(compiles) == 3 * per_eval  # the warm-up's evaluation, then one per epoch
    assert sum(compiles[:per_eval]) > 0 and compiles[per_eval:] == [0] * (2 * per_eval)

    for name, fn in real.items():
        monkeypatch.setattr(evaluate, name, fn)
    monkeypatch.setattr(build, "build_train_step",
                        functools.partial(_build_step_without_evaluate, build.build_train_step))
    train.main(tiny(small_cifar, tmp_path / "cold", *args))  # no warm-up evaluation at all
    a, b = weights(tmp_path / "warm" / "run"), weights(tmp_path / "cold" / "run")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)


def _build_step_without_evaluate(build_step, *a, evaluate=None, **kw):
    return build_step(*a, **kw)


def test_stop_at_target_ends_the_run_at_the_first_evaluation_at_or_above_it(small_cifar, tmp_path):
    args = ["--run.target_acc=0.01", "--run.epochs=3"]
    s = train.main(tiny(small_cifar, tmp_path / "stop", *args, "--run.stop_at_target=true"))
    assert s["stopped_at_target"] and s["epochs_trained"] == 1 and s["epochs_to_target"] == 1
    assert s["epochs"] == 3 and s["steps"] == 450 // 50 and s["time_to_target_s"] == s["train_time_s"]
    assert [r["epoch"] for r in read_metrics(tmp_path / "stop" / "run")] == [1]
    again = train.main(tiny(small_cifar, tmp_path / "stop", *args, "--run.stop_at_target=true"))  # resumes
    assert again["epochs_trained"] == 1 and again["time_to_target_s"] == s["time_to_target_s"]  # trains no more
    assert [r["epoch"] for r in read_metrics(tmp_path / "stop" / "run")] == [1]
    plain = train.main(tiny(small_cifar, tmp_path / "plain", *args))
    assert not plain["stopped_at_target"] and plain["epochs_trained"] == 3 and plain["epochs_to_target"] == 1
