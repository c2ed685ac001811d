"""One build path: config.validate at load, fastres.build's Parts, the synthetic source, accumulation's BN."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fastres import build, checkpoint, config, distributed, step, train
from fastres.build import Parts
from fastres.config import ConfigError
from fastres.data import load
from fastres.data.base import DataError, Split
from fastres.data.cifar import NUM_CLASSES, synthetic
from fastres.data.loaders import build_loader
from fastres.model import build_model
from fastres.techniques import StochasticDepthDraws, WeightEMA, find
from fastres.tools import bench, scaling, stack

from conftest import ROOT

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------- validate

@pytest.mark.parametrize("overrides,world,match", [
    (["--optim.batch_size=100", "--optim.accum_steps=3"], 1, "does not split evenly over 1 rank"),
    (["--optim.batch_size=128"], 3, "does not split evenly over 3 rank"),
    (["--optim.batch_size=100", "--optim.accum_steps=2"], 4, "use a multiple of 8"),
    (["--eval.on_test=false"], 1, "needs a validation split"),
    (["--optim.nesterov=true", "--optim.momentum=0"], 1, "nesterov = true needs optim.momentum > 0"),
    (["--precision.step_graph=true", "--optim.impl=fused"], 2, "one rank only"),
    (["--precision.step_graph=true", "--optim.impl=fused", "--model.stochastic_depth=0.1"], 1, "stochastic depth"),
])
def test_cross_field_checks_fail_at_load(overrides, world, match):
    with pytest.raises(ConfigError, match=match):
        config.load(None, overrides, world=world)
    with pytest.raises(ConfigError, match=match):  # the same check, on a config changed after loading
        config.with_values(config.load(None), overrides=overrides, world=world)


def test_validate_passes_a_good_config_and_checks_fields_first():
    cfg = config.load(None, ["--optim.batch_size=128", "--optim.accum_steps=2"], world=4)
    config.validate(cfg, world=4)
    config.validate(cfg, world=8)  # 8 x 2 divides 128 too
    with pytest.raises(ConfigError, match="use a multiple of 6"):
        config.validate(cfg, world=3)
    cfg.model.depth = 21
    with pytest.raises(ConfigError, match="model.depth"):  # the field's own check comes before combinations
        config.validate(cfg, world=3)


def test_a_saved_config_is_read_without_cross_checks():
    """A checkpoint's config is checked for its fields; the run that reads it validates it for its own world."""
    saved = config.to_dict(config.load(None, ["--optim.batch_size=128"]))
    config.from_dict(saved)  # no world to check against here
    saved["model"]["depth"] = 21
    with pytest.raises(ConfigError, match="model.depth"):
        config.from_dict(saved)


def test_the_stack_refuses_a_row_that_cannot_run_on_its_ranks_before_any_row_runs(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text(f'[stack]\nbase = "{ROOT / "configs" / "baseline.toml"}"\n[[ladder]]\nname = "a"\n'
                 '[[ladder]]\nname = "b"\nnproc = 3\n')  # batch 128 over 3 ranks
    with pytest.raises(ConfigError, match="row 'b'.*does not split evenly over 3 rank"):
        stack.load_stack(p)


def test_train_validates_for_the_world_it_runs_in(tmp_path, monkeypatch):
    cfg = config.load(None, ["--optim.batch_size=128", "--data.source=synthetic", f"--run.out_dir={tmp_path}"])
    monkeypatch.setattr(distributed, "setup", lambda device: distributed.Dist(0, 0, 3, CPU))
    with pytest.raises(ConfigError, match="over 3 rank"):
        train.main(cfg)
    assert not any(tmp_path.iterdir())  # nothing written


# ------------------------------------------------------------------------------------------- Parts

def tiny(tmp_path, *overrides: str) -> config.Config:
    return config.load(None, ["--data.source=synthetic", "--data.subset=200", "--data.test_subset=40",
                              "--data.val_size=40", "--model.depth=8", "--optim.batch_size=40", "--run.epochs=2",
                              "--data.loader=gpu", f"--run.out_dir={tmp_path}", *overrides])


def test_build_makes_every_part_of_a_run(tmp_path):
    cfg = tiny(tmp_path, "--optim.ema_decay=0.9", "--optim.accum_steps=2", "--precision.channels_last=true")
    torch.manual_seed(cfg.run.seed)
    p = build.build(cfg, distributed.single(CPU))
    assert isinstance(p, Parts) and p.net is p.model  # one rank: no DDP
    assert len(p.loader) == 160 // 40 and p.micro_batch == 20
    assert set(p.evals) == {"test", "val"} and len(p.evals["test"][1]) == 40 and len(p.evals["val"][1]) == 40
    assert p.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 40 / 128)
    assert p.schedule(0) == pytest.approx(0.1 * 40 / 128) and p.schedule.total_steps == 2 * 4
    ema = find(p.techniques, WeightEMA)
    assert ema is not None and p.train_step.techniques == [ema] and p.train_step.captured is None
    assert p.prec.channels_last and p.prec.dtype == torch.float32
    x, y = next(iter(p.loader))
    assert x.is_contiguous(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in p.model.state_dict().items()}
    loss, correct = p.train_step(x, y, lr=0.1, global_step=0)
    assert loss.item() > 0 and 0 <= correct.item() <= 40 and ema.updates == 1
    assert any(not torch.equal(before[k], v) for k, v in p.model.state_dict().items())
    acc, extra = p.evaluate(p.evals)
    assert set(acc) == {"test", "val"} and set(extra) == {"test_acc_no_ema"}
    # the same seed builds the same model (bench and scaling time what train trains)
    torch.manual_seed(cfg.run.seed)
    again = build.build(cfg, distributed.single(CPU))
    assert all(torch.equal(before[k], v) for k, v in again.model.state_dict().items())


def test_build_resumes_from_a_checkpoint_state(tmp_path):
    cfg = tiny(tmp_path, "--optim.ema_decay=0.9")
    p = build.build(cfg, distributed.single(CPU))
    x, y = next(iter(p.loader))
    p.train_step(x, y, lr=0.1, global_step=0)
    state = checkpoint.gather(p.model, p.optimizer, p.scaler, checkpoint.Progress(step=1), config.to_dict(cfg),
                              p.techniques)
    q = build.build(cfg, distributed.single(CPU), copy.deepcopy(state))
    for k, v in p.model.state_dict().items():
        assert torch.equal(q.model.state_dict()[k], v), k
    qa, pa = find(q.techniques, WeightEMA), find(p.techniques, WeightEMA)
    assert qa.updates == 1 and all(torch.equal(a, b) for a, b in zip(qa.avg, pa.avg))
    assert q.lsuv is None


def test_train_bench_and_scaling_all_build_through_build(tmp_path, monkeypatch):
    calls = []

    def spy(module):
        real = module.build

        def recording(cfg, dist, *a, **kw):
            calls.append(module.__name__)
            return real(cfg, dist, *a, **kw)
        monkeypatch.setattr(module, "build", recording)
    for module in (train, bench, scaling):
        spy(module)
    cfg = tiny(tmp_path / "run")
    train.main(cfg)
    bench.measure_training(cfg, CPU, steps=2, warmup=1)
    assert scaling.compute_step_s(cfg, 20, CPU, steps=2, warmup=1) > 0
    assert calls == ["fastres.train", "fastres.tools.bench", "fastres.tools.scaling"]


def test_the_step_graph_form_refuses_stochastic_depth_instead_of_ignoring_the_step_index():
    cfg = config.load(None, ["--model.depth=8", "--model.stochastic_depth=0.5", "--optim.impl=fused"])
    model = build_model(cfg.model)
    from fastres.optim import build_optimizer
    s = step.TrainStep(model, model, build_optimizer(model, cfg.optim), torch.amp.GradScaler("cpu", enabled=False),
                       accum=1, amp_dtype=None, label_smoothing=0.0, techniques=[StochasticDepthDraws(model, 0)])
    with pytest.raises(ValueError, match="stochastic depth"):
        s.capture([step.random_batch(4, (3, 32, 32), 10, step.precision(cfg.precision), CPU)])


# ------------------------------------------------------------------------------------------- synthetic source

def test_synthetic_source_keeps_the_batch_contract():
    data = synthetic(0)
    assert data.train.x.shape == (50_000, 3, 32, 32) and data.train.x.dtype == np.uint8
    assert data.test.x.shape == (10_000, 3, 32, 32) and data.train.y.dtype == np.int64
    assert 0 <= data.train.y.min() and data.train.y.max() < NUM_CLASSES
    assert np.array_equal(synthetic(0).train.y, data.train.y)  # made the same way every time
    part = synthetic(0, train_images=301, test_images=7)  # data.subset, data.test_subset: the first images, no more
    assert len(part.train) == 301 and len(part.test) == 7
    for a, b in ((part.train, data.train), (part.test, data.test)):
        assert np.array_equal(a.x, b.x[:len(a)]) and np.array_equal(a.y, b.y[:len(a)])
    for too_many in (dict(subset=50_001), dict(test_subset=10_001)):  # refused as for the real set, not made up
        with pytest.raises(DataError, match="but the t"):
            load(config.DataCfg(source="synthetic", **too_many))
    small = Split(data.train.x[:300], data.train.y[:300])
    args = dict(batch_per_rank=64, seed=0, rank=0, world=1, device=CPU, dtype=torch.bfloat16, channels_last=True)
    for loader in ("gpu", "workers"):
        ld = build_loader(config.DataCfg(source="synthetic", loader=loader, num_workers=0), small, **args)
        batches = list(ld)
        assert len(batches) == len(ld) == 4
        x, y = batches[0]
        assert x.shape == (64, 3, 32, 32) and x.dtype == torch.bfloat16 and y.dtype == torch.int64
        assert x.is_contiguous(memory_format=torch.channels_last)


def test_a_synthetic_run_needs_no_data_files(tmp_path):
    s = train.main(tiny(tmp_path / "run", "--data.dir=/nonexistent", "--run.epochs=1"))
    assert s["train_images"] == 160 and s["config"]["data"]["source"] == "synthetic"


# ------------------------------------------------------------------------------------------- accumulation and BN

def test_accumulation_updates_bn_running_statistics_once_per_step_as_rank_0_does():
    """k micro-batches: every one normalizes over its own images, only micro-batch 0 (rank 0's share under DDP)
    moves the running statistics, once, as DDP's broadcast of rank 0's buffers makes it for k ranks."""
    torch.manual_seed(0)
    model = build_model(config.ModelCfg(depth=8))
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    by_hand = copy.deepcopy(model).train()
    with torch.no_grad():
        by_hand(x[0::2])  # rank 0's forward
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    step.train_on_batch(model.train(), opt, torch.amp.GradScaler("cpu", enabled=False), x, y, accum=2)
    bufs = dict(model.named_buffers())
    for k, v in by_hand.named_buffers():
        assert torch.equal(bufs[k], v), k
    assert model.stem.bn.num_batches_tracked.item() == 1
    assert all(bn.track_running_stats for bn in step._batchnorms(model))  # put back


def test_cuda_graphs_that_torch_compile_skips_are_reported(tmp_path, monkeypatch, capsys):
    """reduce-overhead runs what it cannot graph eagerly and only logs it (BatchNorm under DDP: pytorch#139207);
    the run counts inductor's skips, warns once and records them."""
    from torch._dynamo.utils import counters

    def skipping(*a, **kw):
        counters["inductor"]["cudagraph_skips"] += 2
    monkeypatch.setattr(step, "compile_net", lambda *a, **kw: None)  # what torch.compile would do: skip twice
    monkeypatch.setattr(step, "precompile", skipping)
    s = train.main(tiny(tmp_path / "run", "--precision.compile=true", "--run.epochs=1"))
    assert s["cudagraph_skips"] == 2 and "left 2 part(s) of the step out of its CUDA graphs" in capsys.readouterr().err
    assert train.main(tiny(tmp_path / "plain", "--run.epochs=1"))["cudagraph_skips"] == 0


def test_the_step_keeps_the_epochs_sums_and_its_count_on_the_device(tmp_path):
    p = build.build(tiny(tmp_path), distributed.single(CPU))
    p.train_step.start_epoch(7)
    batches = iter(p.loader)
    outs = [p.train_step(*next(batches), lr=0.05, global_step=7 + k) for k in range(2)]
    assert p.train_step.loss_sum.item() == pytest.approx(sum(o[0].item() for o in outs))
    assert p.train_step.correct.item() == sum(o[1].item() for o in outs) and p.train_step.bad_step.item() == -1
    assert p.train_step.count.item() == 9
    with pytest.raises(ValueError, match="step 3 called where step 9 is next"):
        p.train_step(*next(batches), lr=0.05, global_step=3)
    x, y = next(batches)
    p.train_step(x.fill_(float("nan")), y, lr=0.05, global_step=9)  # a non-finite loss: its step kept, no host sync
    assert p.train_step.bad_step.item() == 9
    p.train_step.start_epoch(10)
    assert (p.train_step.loss_sum.item(), p.train_step.correct.item(), p.train_step.bad_step.item()) == (0.0, 0, -1)
