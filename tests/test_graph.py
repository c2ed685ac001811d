"""precision.step_graph on a CPU: everything but the capture itself (tests/test_cuda.py checks that).

On a CPU the step runs eagerly on the graph's static buffers with the lr as a tensor, so a run must equal
step_graph = false bit for bit; the settings a fixed graph cannot hold are refused before anything is written.
"""

from __future__ import annotations

import pytest
import torch

from fastres import checkpoint, config, step, train
from fastres.errors import UserError
from fastres.log import read_metrics
from fastres.model import build_model
from fastres.optim import build_optimizer
from fastres.tools import bench, scaling

from conftest import killed_after_first_checkpoint

GRAPHABLE = ["--optim.impl=fused", "--optim.warmup_epochs=1", "--optim.schedule=cosine", "--optim.nesterov=true"]


def tiny(small_cifar, out, *overrides: str) -> config.Config:
    return config.load(None, [f"--data.dir={small_cifar}", f"--run.out_dir={out}", "--model.depth=8",
                              "--optim.batch_size=50", "--run.epochs=2", "--data.loader=gpu", "--data.val_size=50",
                              *GRAPHABLE, *overrides])


def state(out) -> dict:
    return checkpoint.load(out / checkpoint.NAME)


@pytest.mark.parametrize("extra", [[], ["--optim.accum_steps=2", "--model.dropout=0.2", "--optim.label_smoothing=0.1"],
                                   ["--optim.schedule=onecycle", "--optim.warmup_epochs=0", "--optim.lookahead_k=4",
                                    "--optim.wd_bn_bias=false"],
                                   ["--optim.name=lars", "--optim.impl=default", "--optim.lars_trust=0.01"]],
                         ids=["plain", "accum-dropout-smoothing", "onecycle-lookahead-wd-groups", "lars"])
def test_step_graph_run_equals_the_plain_run_on_cpu(small_cifar, tmp_path, extra):
    plain = train.main(tiny(small_cifar, tmp_path / "plain", *extra))
    graphed = train.main(tiny(small_cifar, tmp_path / "graph", *extra, "--precision.step_graph=true"))
    a, b = state(tmp_path / "plain"), state(tmp_path / "graph")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for p in a["optimizer"]["state"]:
        assert torch.equal(a["optimizer"]["state"][p]["momentum_buffer"], b["optimizer"]["state"][p]["momentum_buffer"])
    rows_a, rows_b = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "graph")
    assert [(r["train_loss"], r["train_acc"], r["lr"]) for r in rows_a] == \
           [(r["train_loss"], r["train_acc"], r["lr"]) for r in rows_b]
    assert plain["final_test_acc"] == graphed["final_test_acc"]
    if "lookahead" in a:  # its slow weights too, decided on the device in the graph's form, on the host in eager
        assert all(torch.equal(a["lookahead"]["slow"][k], b["lookahead"]["slow"][k]) for k in a["lookahead"]["slow"])


def test_step_graph_run_resumes_exactly(small_cifar, tmp_path, monkeypatch):
    """Its checkpoint holds the lr as a tensor; resuming from it continues as if never stopped."""
    extra = ["--precision.step_graph=true", "--optim.batch_size=100"]
    train.main(tiny(small_cifar, tmp_path / "a", *extra))
    killed_after_first_checkpoint(monkeypatch, lambda: train.main(tiny(small_cifar, tmp_path / "b", *extra)))
    train.main(tiny(small_cifar, tmp_path / "b", *extra))
    a, b = state(tmp_path / "a")["model"], state(tmp_path / "b")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("override,match", [
    ("--model.stochastic_depth=0.5", "cannot capture stochastic depth"),
    ("--precision.amp=fp16", "cannot capture fp16's GradScaler"),
    ("--optim.impl=foreach", "needs optim.impl = fused"),
    ("--precision.compile=true --precision.compile_mode=reduce-overhead", "makes CUDA graphs of its own"),
    ("--precision.compile=true --precision.compile_mode=max-autotune", "makes CUDA graphs of its own"),
])
def test_what_a_graph_cannot_hold_is_refused_before_anything_is_written(small_cifar, tmp_path, override, match):
    with pytest.raises(UserError, match=match):  # at config load now, before any run starts
        train.main(tiny(small_cifar, tmp_path / "run", "--precision.step_graph=true", *override.split()))
    assert not (tmp_path / "run").exists()


def test_more_than_one_rank_is_refused():
    cfg = config.load(None, ["--precision.step_graph=true", "--optim.impl=fused"])
    config.validate(cfg, world=1)
    with pytest.raises(UserError, match="one rank only"):
        config.validate(cfg, world=2)
    config.validate(config.load(None, ["--model.stochastic_depth=0.5"]), world=4)  # off: nothing to refuse


def test_step_graph_takes_only_its_batch_shape():
    model = build_model(config.load(None, ["--model.depth=8"]).model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    g = step.CapturedStep(lambda x, y: (x.sum(), y.sum()), model, opt,
                          example=(torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.int64)))
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) and g.graph is None  # nothing to capture on a CPU
    g(torch.ones(4, 3, 32, 32), torch.zeros(4, dtype=torch.int64), 0.05)
    assert opt.param_groups[0]["lr"].item() == 0.05
    with pytest.raises(ValueError, match=r"batches of \(4, 3, 32, 32\), got \(3, 3, 32, 32\)"):
        g(torch.ones(3, 3, 32, 32), torch.zeros(3, dtype=torch.int64), 0.05)


def test_step_graph_runs_its_warm_up_and_undoes_it_on_cpu():
    """The warm-up before a capture trains for a few steps; afterwards weights, BN statistics, momentum, the
    extra ``state`` (the weight average) and the random streams are as they were (the same code as on a GPU)."""
    cfg = config.load(None, ["--model.depth=8", "--model.dropout=0.2", *GRAPHABLE])
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    extra = [torch.zeros(3)]
    before = [t.clone() for t in step.state_tensors(model, opt) + extra]
    rng_before = torch.get_rng_state()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = []

    def one_step(x, y):
        extra[0].add_(1.0)
        losses.append(step.train_on_batch(model, opt, scaler, x, y)[0].item())
        return losses[-1], 0
    example = step.random_batch(8, (3, 32, 32), 10, step.precision(cfg.precision), torch.device("cpu"))
    step.CapturedStep(one_step, model, opt, example=example, state=extra)
    assert len(losses) == step.CAPTURE_WARMUP_STEPS and losses[-1] < losses[0]  # it trained...
    after = step.state_tensors(model, opt) + extra
    assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(after, before))  # ...and is undone
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_an_optimizer_whose_state_the_warm_up_creates_is_refused():
    """torch's SGD makes its momentum buffers on the first step: a graph captured after the warm-up would
    start from the warm-up's momentum (build_optimizer makes them up front)."""
    model = build_model(config.load(None, ["--model.depth=8"]).model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="warm-up created or replaced optimizer state"):
        step.CapturedStep(lambda x, y: step.train_on_batch(model, opt, scaler, x, y), model, opt,
                          example=(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.int64)))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the warm-up is undone first


@pytest.mark.parametrize("step_graph", ["false", "true"])
def test_scaling_model_times_the_configured_step(step_graph):
    cfg = config.load(None, ["--model.depth=8", *GRAPHABLE, f"--precision.step_graph={step_graph}"])
    assert 0 < scaling.compute_step_s(cfg, 8, torch.device("cpu"), steps=2, warmup=1) < 10


@pytest.mark.parametrize("ema", ["0.0", "0.9"])
def test_bench_times_the_graphed_step(small_cifar, tmp_path, ema):
    cfg = tiny(small_cifar, tmp_path / "run", "--precision.step_graph=true", f"--optim.ema_decay={ema}")
    m = bench.measure_training(cfg, torch.device("cpu"), steps=2, warmup=1)
    assert m["img_per_s"] > 0 and m["step_s"] > 0
