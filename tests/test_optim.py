from __future__ import annotations

import math

import pytest
import torch

from fastres import config
from fastres.config import OptimCfg
from fastres.errors import UserError
from fastres.optim import build_optimizer, build_schedule, scaled_lr


def test_linear_scaling():
    assert scaled_lr(OptimCfg()) == pytest.approx(0.1)
    assert scaled_lr(OptimCfg(batch_size=1024)) == pytest.approx(0.8)
    assert scaled_lr(OptimCfg(batch_size=64, lr_per_128=0.2)) == pytest.approx(0.1)


def test_step_schedule_is_the_papers():
    # He 2015: 0.1, /10 at 32k and 48k of 64k iterations
    s = build_schedule(OptimCfg(), steps_per_epoch=400, epochs=160)
    assert s.total_steps == 64_000 and s.milestone_steps == (32_000, 48_000)
    assert s(0) == pytest.approx(0.1) and s(31_999) == pytest.approx(0.1)
    assert s(32_000) == pytest.approx(0.01) and s(47_999) == pytest.approx(0.01)
    assert s(48_000) == pytest.approx(0.001) and s(63_999) == pytest.approx(0.001)


def test_warmup_is_linear_per_iteration_from_the_base_rate():
    # Goyal et al. 2017: from lr_per_128 to k * lr_per_128 over the warmup epochs, per iteration
    s = build_schedule(OptimCfg(batch_size=1024, warmup_epochs=5), steps_per_epoch=48, epochs=100)
    assert s.warmup_steps == 240
    assert s(0) == pytest.approx(0.1)
    assert s(120) == pytest.approx(0.1 + 0.7 * 0.5)
    assert s(239) == pytest.approx(0.1 + 0.7 * 239 / 240)
    assert s(240) == pytest.approx(0.8)
    diffs = [s(t + 1) - s(t) for t in range(239)]
    assert max(diffs) == pytest.approx(min(diffs))  # constant increment


def test_warmup_with_small_batch_is_flat():
    s = build_schedule(OptimCfg(batch_size=64, warmup_epochs=2), steps_per_epoch=10, epochs=10)
    assert s(0) == pytest.approx(0.05) == s(15)


def test_cosine():
    s = build_schedule(OptimCfg(schedule="cosine", batch_size=256, warmup_epochs=1), steps_per_epoch=10,
                       epochs=11)
    assert s(10) == pytest.approx(0.2)
    assert s(60) == pytest.approx(0.1)
    assert s(110) == pytest.approx(0.0, abs=1e-12)
    mid = s(35)
    assert mid == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 0.25)))


def test_milestones_custom_and_gamma():
    s = build_schedule(OptimCfg(milestones=[0.3], gamma=0.2), steps_per_epoch=10, epochs=10)
    assert s(29) == pytest.approx(0.1) and s(30) == pytest.approx(0.02)


def test_optimizer_is_sgd_with_the_configured_terms():
    model = torch.nn.Linear(4, 2)
    opt = build_optimizer(model, OptimCfg(batch_size=256, momentum=0.8, nesterov=True, weight_decay=5e-4))
    g = opt.param_groups[0]
    assert isinstance(opt, torch.optim.SGD)
    assert (g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]) == (pytest.approx(0.2), 0.8, True, 5e-4)
    with pytest.raises(UserError, match="nesterov"):  # validated once, at load: the builder trusts its section
        config.load(None, ["--optim.nesterov=true", "--optim.momentum=0"])


def test_constant_warmup_is_he_2015s_resnet110_trick():
    # 0.01 for about 400 iterations (one epoch at batch 128), then the usual 0.1 and its steps
    s = build_schedule(OptimCfg(warmup_epochs=1, warmup_mode="constant", warmup_start=0.1),
                       steps_per_epoch=391, epochs=164)
    assert s(0) == pytest.approx(0.01) and s(390) == pytest.approx(0.01)
    assert s(391) == pytest.approx(0.1) and s(s.milestone_steps[0]) == pytest.approx(0.01)


def test_gradual_warmup_from_a_lower_start():
    s = build_schedule(OptimCfg(batch_size=128, warmup_epochs=1, warmup_start=0.5), steps_per_epoch=10,
                       epochs=5)
    assert s(0) == pytest.approx(0.05) and s(5) == pytest.approx(0.075) and s(10) == pytest.approx(0.1)


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_sgd_implementations_agree(impl):
    torch.manual_seed(0)
    models = [torch.nn.Linear(8, 4) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [build_optimizer(models[0], OptimCfg(nesterov=True)), build_optimizer(models[1], OptimCfg(nesterov=True,
                                                                                                     impl=impl))]
    for _ in range(3):
        x = torch.randn(16, 8)
        for m, o in zip(models, opts):
            m(x).square().mean().backward()
            o.step()
            o.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("impl", ["default", "foreach", "fused"])
def test_a_parameter_without_gradient_on_the_first_step_trains_later(impl):
    """Stochastic depth drops a branch: its parameters have no gradient on that step. torch's fused SGD then
    had no momentum buffer for them and raised on the next step; ours has zero buffers from the start, and
    matches torch's own SGD (which copies the first gradient into a missing buffer) bit for bit."""
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    ours = build_optimizer(models[0], OptimCfg(nesterov=True, impl=impl))
    torch_own = torch.optim.SGD(models[1].parameters(), lr=scaled_lr(OptimCfg()), momentum=0.9, nesterov=True,
                                weight_decay=OptimCfg().weight_decay)
    for step in range(4):
        x = torch.randn(16, 8)
        for m, o in ((models[0], ours), (models[1], torch_own)):
            skip = step == 0  # the first layer is "dropped" on step 0: no gradient reaches it
            h = m[0](x).detach() if skip else m[0](x)
            m[1](h).square().mean().backward()
            o.step()
            o.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        if impl == "default":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------- LARS

def reference_lars_step(params, grads, bufs, *, lr, momentum, wd, trust_coefficient, nesterov, lars):
    """TensorFlow's LARSOptimizer (tf.contrib.opt, MLPerf's ResNet-50 reference) for one step, tensor by tensor in
    float64: the reference."""
    for w, g, v in zip(params, grads, bufs):
        w_norm, g_norm = float(w.norm()), float(g.norm())
        trust = trust_coefficient * w_norm / (g_norm + wd * w_norm) if lars and w_norm > 0 and g_norm > 0 else 1.0
        scaled_lr = lr * trust
        d = g + wd * w
        v.mul_(momentum).add_(scaled_lr * d)
        w.sub_(momentum * v + scaled_lr * d if nesterov else v)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("lr_tensor", [False, True], ids=["float-lr", "device-lr"])
def test_lars_steps_as_tensorflows_lars_optimizer(nesterov, lr_tensor):
    """optim.name = lars over a net with BatchNorm and biases: the excluded group (BN, biases) steps as momentum SGD
    without weight decay; the rest with the trust ratio; a tensor whose gradient is zero keeps trust 1; the lr as a
    device tensor (the step graph's) gives the same steps."""
    from fastres.optim import LARS
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 5), torch.nn.Linear(5, 3, bias=False))
    cfg = OptimCfg(name="lars", nesterov=nesterov, weight_decay=5e-4, momentum=0.9, lars_trust=0.02,
                   batch_size=256)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, LARS) and [g["lars"] for g in opt.param_groups] == [True, False]
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for n, p in model.named_parameters()
                                                            if n.startswith("1.") or n.endswith("bias")}
    ref = [[p.detach().double().clone() for p in g["params"]] for g in opt.param_groups]
    ref_bufs = [[torch.zeros_like(p) for p in g] for g in ref]
    for t in range(6):
        lr = 0.1 * (t + 1) / 6
        for g in opt.param_groups:
            g["lr"] = torch.tensor(lr, dtype=torch.float64) if lr_tensor else lr
        x = torch.randn(8, 3, 8, 8)
        model(x).square().mean().backward()
        model[4].weight.grad.zero_() if t == 2 else None  # a zero gradient: trust 1
        for g, rp, rb in zip(opt.param_groups, ref, ref_bufs):
            reference_lars_step(rp, [p.grad.double() for p in g["params"]], rb, lr=lr, momentum=0.9,
                                wd=g["weight_decay"], trust_coefficient=0.02, nesterov=nesterov, lars=g["lars"])
        opt.step()
        opt.zero_grad()
    for g, rp in zip(opt.param_groups, ref):
        for p, r in zip(g["params"], rp):
            torch.testing.assert_close(p.double(), r, rtol=1e-5, atol=1e-6)
