"""The optimizer levers, each against its reference: one-cycle (torch's OneCycleLR), the linear triangle (a
hand-written schedule), Lookahead (a plain-Python loop), no weight decay on BN and biases (the groups' members);
each off leaves the baseline as it was, and a run with them on resumes exactly."""

from __future__ import annotations

import math

import pytest
import torch

from fastres import build, checkpoint, config, distributed, train
from fastres.config import ConfigError, ModelCfg, OptimCfg
from fastres.log import read_metrics
from fastres.model import build_model
from fastres.optim import build_optimizer, build_schedule, decay_groups, scaled_lr
from fastres.step import TrainStep
from fastres.techniques import Lookahead, ScheduledMomentum, StochasticDepthDraws

from conftest import killed_after_first_checkpoint

CPU = torch.device("cpu")


def torch_one_cycle(steps: int, peak: float, stop_at: int | None = None, **kw):
    """(lr, momentum) at every step as OneCycleLR sets them on a real SGD, resumed from its state dicts at
    ``stop_at`` if given (a scheduler's own way to continue)."""
    def fresh():
        opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=peak, momentum=0.9)
        return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=peak, total_steps=steps, **kw)
    opt, sched = fresh()
    out = []
    for t in range(steps):
        if t == stop_at:
            saved = opt.state_dict(), sched.state_dict()
            opt, sched = fresh()
            opt.load_state_dict(saved[0])
            sched.load_state_dict(saved[1])
        out.append((opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]))
        opt.step()
        if t < steps - 1:
            sched.step()
    return out


@pytest.mark.parametrize("steps_per_epoch,epochs", [(1, 1), (3, 1), (7, 3), (98, 5), (391, 2)])
def test_one_cycle_is_torchs_one_cycle_lr_at_every_step(steps_per_epoch, epochs):
    cfg = OptimCfg(schedule="onecycle", batch_size=512)
    s = build_schedule(cfg, steps_per_epoch, epochs)
    steps = steps_per_epoch * epochs
    ref = torch_one_cycle(steps, scaled_lr(cfg))
    for t, (lr, m) in enumerate(ref):
        assert abs(s(t) - lr) <= 1e-12 and abs(s.momentum_at(t) - m) <= 1e-12, t
    # evaluated from step k on (a resumed run), it is the uninterrupted schedule, and torch's resumed scheduler
    k = steps // 2
    resumed = torch_one_cycle(steps, scaled_lr(cfg), stop_at=k)
    again = build_schedule(cfg, steps_per_epoch, epochs)
    assert all(abs(again(t) - lr) <= 1e-12 and abs(again.momentum_at(t) - m) <= 1e-12
               for t, (lr, m) in enumerate(resumed) if t >= k)


def test_one_cycle_knobs_are_one_cycle_lrs_arguments():
    cfg = OptimCfg(schedule="onecycle", batch_size=256, onecycle_pct_start=0.25, onecycle_div_factor=10.0,
                   onecycle_final_div_factor=100.0, momentum_min=0.8, momentum_max=0.9)
    s = build_schedule(cfg, 50, 4)
    ref = torch_one_cycle(200, 0.2, pct_start=0.25, div_factor=10.0, final_div_factor=100.0, base_momentum=0.8,
                          max_momentum=0.9)
    assert max(max(abs(s(t) - lr), abs(s.momentum_at(t) - m)) for t, (lr, m) in enumerate(ref)) <= 1e-12
    assert s(0) == pytest.approx(0.02) and s(199) == pytest.approx(0.02 / 100, rel=1e-3)
    assert build_schedule(OptimCfg(), 10, 2).momentum_at(7) == 0.9  # the other schedules: optim.momentum


@pytest.mark.parametrize("warmup_epochs,mode", [(0.0, "gradual"), (2.0, "gradual"), (1.0, "constant")])
def test_linear_is_the_hand_written_triangle(warmup_epochs, mode):
    cfg = OptimCfg(schedule="linear", batch_size=512, warmup_epochs=warmup_epochs, warmup_mode=mode)
    s = build_schedule(cfg, 10, 8)
    peak, start, w, total = 0.4, 0.1, round(10 * warmup_epochs), 80

    def ref(t):
        if t < w:
            return start if mode == "constant" else start + (peak - start) * t / w
        return peak * (1 - (t - w) / (total - w))
    assert all(s(t) == pytest.approx(ref(t), rel=0, abs=1e-15) for t in range(total + 1))
    assert s(total) == 0.0 and s(w) == peak


@pytest.mark.parametrize("overrides,match", [
    (["--optim.warmup_epochs=2"], r"onecycle is its own warm-up .* set optim.warmup_epochs = 0"),
    (["--optim.momentum_min=0.95", "--optim.momentum_max=0.85"], "swap them"),
    (["--optim.nesterov=true", "--optim.momentum_min=0", "--optim.momentum_max=0.9"], "momentum_min > 0"),
    (["--precision.amp=fp16", "--optim.impl=fused"], "use precision.amp = bf16 or optim.impl = foreach"),
])
def test_what_one_cycle_cannot_combine_with_is_refused_at_load(overrides, match):
    with pytest.raises(ConfigError, match=match):
        config.load(None, ["--optim.schedule=onecycle", *overrides])
    config.load(None, ["--optim.schedule=onecycle", "--optim.momentum=0", "--optim.nesterov=true"])  # its own range


@pytest.mark.parametrize("impl", ["default", "foreach", "fused"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_scheduled_momentum_steps_as_torchs_sgd_with_that_momentum(impl, nesterov):
    """The momentum tensor's update equals torch's own SGD whose group["momentum"] is set each step, with two
    weight-decay groups and a parameter without a gradient on step 0 (a dropped branch)."""
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 4))
              for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    cfg = OptimCfg(schedule="onecycle", nesterov=nesterov, impl=impl, wd_bn_bias=False, weight_decay=5e-4)
    s = build_schedule(cfg, 5, 2)
    ours = build_optimizer(models[0], cfg)
    hook = ScheduledMomentum(ours, s.momentum_at)
    groups = [{"params": g["params"], "weight_decay": g.get("weight_decay", 5e-4)}
              for g in decay_groups(models[1], cfg)]
    ref = torch.optim.SGD(groups, lr=0.1, momentum=0.95, nesterov=nesterov)  # torch's single-tensor loop
    for t in range(10):
        x = torch.randn(16, 8)
        hook.prepare(t)
        for g in ours.param_groups:
            g["lr"] = s(t)
        for g in ref.param_groups:
            g["lr"], g["momentum"] = s(t), s.momentum_at(t)
        for m, o in ((models[0], ours), (models[1], ref)):
            h = m[0](x).detach() if t == 0 else m[0](x)
            m[2](m[1](h)).square().mean().backward()
            o.step()
            o.zero_grad()
    assert all(g["momentum"] == 0 and g["weight_decay"] == 0 for g in ours.param_groups)  # the hook does both
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_no_weight_decay_group_is_exactly_the_bn_parameters_and_biases(shortcut):
    model = build_model(ModelCfg(depth=8, shortcut=shortcut))
    names = {id(p): n for n, p in model.named_parameters()}
    opt = build_optimizer(model, OptimCfg(wd_bn_bias=False, weight_decay=5e-4))
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in opt.param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0]
    bn = {n for mod_name, mod in model.named_modules() if isinstance(mod, torch.nn.BatchNorm2d)
          for n in (f"{mod_name}.weight", f"{mod_name}.bias")}
    assert no_decay == bn | {"fc.bias"} and len(bn) >= 7 * 2  # BN's gamma and beta, the classifier's bias
    assert decay == {n for n, p in model.named_parameters() if p.ndim > 1}  # every conv and the fc weight
    assert decay.isdisjoint(no_decay) and len(decay) + len(no_decay) == len(list(model.parameters()))


def tiny(out, *overrides: str) -> config.Config:
    return config.load(None, ["--data.source=synthetic", "--data.subset=200", "--data.test_subset=40",
                              "--data.val_size=40", "--model.depth=8", "--optim.batch_size=40", "--run.epochs=2",
                              "--data.loader=gpu", f"--run.out_dir={out}", *overrides])


def test_every_new_flag_off_is_the_baseline_optimizer_bit_for_bit(tmp_path):
    """Defaults: one group of every parameter, no hook, no slow weights, no extra checkpoint part; the steps equal
    a plain torch SGD's."""
    cfg = tiny(tmp_path)
    torch.manual_seed(0)
    p = build.build(cfg, distributed.single(CPU))
    assert p.techniques == [] and p.train_step.techniques == []
    assert len(p.optimizer.param_groups) == 1 and not p.optimizer._optimizer_step_pre_hooks
    assert p.optimizer.param_groups[0]["params"] == list(p.model.parameters())
    ref_model = build_model(cfg.model)
    ref_model.load_state_dict(p.model.state_dict())
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for i, (x, y) in zip(range(3), p.loader):
        p.train_step(x, y, lr=p.schedule(i), global_step=i)
        torch.nn.functional.cross_entropy(ref_model(x), y).backward()
        for g in ref.param_groups:
            g["lr"] = p.schedule(i)
        ref.step()
        ref.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(p.model.state_dict().values(), ref_model.state_dict().values()))
    assert "lookahead" not in checkpoint.gather(p.model, p.optimizer, p.scaler, checkpoint.Progress(), {}, p.techniques)


def reference_lookahead(model: torch.nn.Module, slow: dict, k: int, alpha: float, steps: int, total: int) -> None:
    """Zhang et al. 2019, as airbench's lookahead_state: slow moves alpha toward fast, fast restarts from slow."""
    if steps % k == 0 or steps == total:
        for name, fast in model.state_dict().items():
            if fast.is_floating_point():
                slow[name] += (fast - slow[name]) * alpha
                fast.copy_(slow[name])


def test_lookahead_is_the_plain_python_loop_with_stochastic_depth_and_accumulation():
    torch.manual_seed(0)
    mcfg = ModelCfg(depth=8, stochastic_depth=0.5)
    models = [build_model(mcfg) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    cfg, total, k, alpha = OptimCfg(nesterov=True), 50, 3, 0.8
    steps = []
    lookahead = Lookahead(models[0], k, alpha, total)
    for m, la in ((models[0], [lookahead]), (models[1], [])):
        opt = build_optimizer(m, cfg)
        steps.append(TrainStep(m, m, opt, torch.amp.GradScaler("cpu", enabled=False), accum=2, amp_dtype=None,
                               label_smoothing=0.0, techniques=[StochasticDepthDraws(m, 3), *la]))
    slow = {n: t.clone() for n, t in models[1].state_dict().items() if t.is_floating_point()}
    gen = torch.Generator().manual_seed(1)
    for i in range(total):
        x, y = torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen)
        steps[0](x, y, lr=0.05, global_step=i)
        steps[1](x, y, lr=0.05, global_step=i)
        reference_lookahead(models[1], slow, k, alpha, i + 1, total)
    a, b = models[0].state_dict(), models[1].state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert all(torch.equal(s, slow[n]) for n, s in zip(lookahead.names, lookahead.slow))
    assert lookahead.steps == total


def test_lookahead_on_the_device_equals_the_host_decided_one():
    """apply() every step (the graph's form: the factor prepare() filled decides) leaves what apply() on the due steps
    alone (the eager form) leaves."""
    torch.manual_seed(0)
    m = [torch.nn.Linear(6, 6) for _ in range(2)]
    m[1].load_state_dict(m[0].state_dict())
    la = [Lookahead(mi, 4, 0.3, 11) for mi in m]
    for _ in range(11):
        for mi in m:
            with torch.no_grad():
                mi.weight.add_(torch.randn(6, 6, generator=torch.Generator().manual_seed(_)))
        la[0].prepare(_)
        la[0].apply()
        if la[1].prepare(_):
            la[1].apply()
    assert la[0].steps == 11 and la[0].on.item() == 1.0
    assert all(torch.equal(a, b) for a, b in zip(la[0].slow, la[1].slow))
    assert torch.equal(m[0].weight, m[1].weight) and torch.equal(m[0].weight, la[0].slow[0])  # 11: the last syncs


ALL_ON = ["--optim.lookahead_k=5", "--optim.lookahead_alpha=0.6", "--optim.wd_bn_bias=false", "--optim.nesterov=true",
          "--optim.impl=fused", "--model.stochastic_depth=0.3", "--optim.accum_steps=2", "--optim.ema_decay=0.9",
          "--data.flip=alternate", "--eval.tta=flip-translate", "--log.every_steps=2", "--run.epochs=3"]


@pytest.mark.parametrize("schedule", [["--optim.schedule=onecycle"], ["--optim.schedule=linear",
                                                                      "--optim.warmup_epochs=1"]],
                         ids=["onecycle", "linear"])
@pytest.mark.slow
def test_a_run_with_every_lever_on_resumes_exactly(tmp_path, monkeypatch, schedule):
    """Killed after its first checkpoint (step 4: not a Lookahead sync step), resumed: the weights, momentum
    buffers, slow weights and metrics of a run never stopped; train/momentum logged beside train/lr (one-cycle)."""
    extra = [*ALL_ON, *schedule]
    whole = train.main(tiny(tmp_path / "whole", *extra))
    killed_after_first_checkpoint(monkeypatch, lambda: train.main(tiny(tmp_path / "cut", *extra)))
    cut = checkpoint.load(tmp_path / "cut" / checkpoint.NAME)
    assert cut["lookahead"]["steps"] == 4 and any(not torch.equal(cut["lookahead"]["slow"][n], cut["model"][n])
                                                  for n in cut["lookahead"]["slow"])
    resumed = train.main(tiny(tmp_path / "cut", *extra))
    a, b = (checkpoint.load(tmp_path / r / checkpoint.NAME) for r in ("whole", "cut"))
    assert all(torch.equal(a["model"][n], b["model"][n]) for n in a["model"])
    assert all(torch.equal(a["lookahead"]["slow"][n], b["lookahead"]["slow"][n]) for n in a["lookahead"]["slow"])
    assert all(torch.equal(a["lookahead"]["slow"][n], a["model"][n]) for n in a["lookahead"]["slow"])  # ends synced
    for i in a["optimizer"]["state"]:
        assert torch.equal(a["optimizer"]["state"][i]["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"])
    keys = ("step", "train_loss", "train_acc", "test_acc", "val_acc", "lr")
    assert [[r[k] for k in keys] for r in read_metrics(tmp_path / "whole")] == \
           [[r[k] for k in keys] for r in read_metrics(tmp_path / "cut")]
    assert whole["final_test_acc"] == resumed["final_test_acc"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(tmp_path / "cut" / "tb"))
    ea.Reload()
    s = build_schedule(tiny(tmp_path / "x", *extra).optim, 4, 3)
    if schedule[0].endswith("onecycle"):
        got = {e.step: e.value for e in ea.Scalars("train/momentum")}
        assert sorted(got) == list(range(2, 13, 2)) and all(v == pytest.approx(s.momentum_at(t - 1))
                                                            for t, v in got.items())
    else:
        assert "train/momentum" not in ea.Tags()["scalars"]


def test_a_checkpoint_from_before_the_levers_resumes_as_levers_off(tmp_path, monkeypatch):
    """A checkpoint whose saved config lacks every new key (written before them) resumes as the same run."""
    train.main(tiny(tmp_path / "a"))
    killed_after_first_checkpoint(monkeypatch, lambda: train.main(tiny(tmp_path / "b")))
    path = tmp_path / "b" / checkpoint.NAME
    state = checkpoint.load(path)
    for key in ("onecycle_pct_start", "onecycle_div_factor", "onecycle_final_div_factor", "momentum_min",
                "momentum_max", "lookahead_k", "lookahead_alpha", "wd_bn_bias"):
        del state["config"]["optim"][key]
    checkpoint.save(path, state)
    train.main(tiny(tmp_path / "b"))
    a, b = checkpoint.load(tmp_path / "a" / checkpoint.NAME), checkpoint.load(path)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_schedule_values_are_finite_past_the_end():
    s = build_schedule(OptimCfg(schedule="onecycle"), 3, 2)
    assert s(6) == s(5) and s.momentum_at(9) == s.momentum_at(5) and math.isfinite(s(100))
