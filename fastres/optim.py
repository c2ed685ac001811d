"""SGD with momentum and the learning-rate schedule, a pure function of the optimizer step.

- Linear scaling (Goyal et al. 2017): lr = lr_per_128 * global_batch / 128.
- Gradual warmup (Goyal et al. 2017, sec. 2.2): over ``warmup_epochs`` the lr rises by a constant amount
  per iteration from warmup_start * lr_per_128 (Goyal: 1, the batch-128 rate) to the scaled lr; with
  batch <= 128 and warmup_start = 1 there is nothing to warm up from and the warmup is flat.
  Constant warmup (He 2015, ResNet-110: 0.01 until training error < 80%, ~400 iterations, then 0.1): the lr
  stays at warmup_start * lr_per_128 for the warmup, then the schedule starts.
- "step": multiply by ``gamma`` at each milestone, a fraction of all steps (He 2015: /10 at 50% and 75%).
  "cosine": half-cosine from the scaled lr to 0 over the steps after warmup.
  "linear": a straight line from the scaled lr to 0 over the steps after warmup; with a gradual warmup it is
  cifar10-airbench's triangle (a linear rise over ``warmup_epochs``, then a linear fall to 0 at the last step).
  "onecycle": torch.optim.lr_scheduler.OneCycleLR's lr and momentum (cosine, two phases; Smith & Topin 2019),
  recomputed with its formula from the step alone; max_lr is the scaled lr.
Being a function of the step, the schedule needs no state in a checkpoint to resume exactly.

The one-cycle momentum is a 0-dim device tensor read by :class:`ScheduledMomentum` (fused SGD takes its momentum
only as a float, which a captured graph would freeze); Lookahead and the weight average follow the same rule:
their per-step factors live on the device, so the step graph (fastres/step.py) replays them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fastres import config
from fastres.config import OptimCfg


def scaled_lr(cfg: OptimCfg) -> float:
    return cfg.lr_per_128 * cfg.batch_size / 128


@dataclass(frozen=True)
class Schedule:
    peak: float
    start: float
    constant_warmup: bool
    total_steps: int
    warmup_steps: int
    kind: str
    milestone_steps: tuple[int, ...]
    gamma: float
    momentum: float = 0.9  # every schedule but onecycle: SGD's constant momentum
    pct_start: float = 0.3  # onecycle: OneCycleLR's pct_start, div_factor, final_div_factor, base/max_momentum
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    momentum_min: float = 0.85
    momentum_max: float = 0.95

    def __call__(self, step: int) -> float:
        if self.kind == "onecycle":
            return self._one_cycle(step)[0]
        if step < self.warmup_steps:
            if self.constant_warmup:
                return self.start
            return self.start + (self.peak - self.start) * step / self.warmup_steps
        if self.kind in ("cosine", "linear"):
            span = max(1, self.total_steps - self.warmup_steps)
            t = min(1.0, (step - self.warmup_steps) / span)
            return self.peak * (1.0 - t) if self.kind == "linear" else self.peak * 0.5 * (1.0 + math.cos(math.pi * t))
        return self.peak * self.gamma ** sum(step >= m for m in self.milestone_steps)

    @property
    def cycles_momentum(self) -> bool:
        return self.kind == "onecycle"

    def momentum_at(self, step: int) -> float:
        """SGD's momentum at ``step``: one-cycle's, else the constant optim.momentum."""
        return self._one_cycle(step)[1] if self.cycles_momentum else self.momentum

    def _one_cycle(self, step: int) -> tuple[float, float]:
        """(lr, momentum) at ``step`` as OneCycleLR.get_lr computes them after ``step`` scheduler steps (its default
        two phases, cosine annealing), operation for operation, so they agree to the last bit; past the last step,
        the last step's values."""
        initial = self.peak / self.div_factor
        phases = ((float(self.pct_start * self.total_steps) - 1, initial, self.peak, self.momentum_max,
                   self.momentum_min),
                  (self.total_steps - 1, self.peak, initial / self.final_div_factor, self.momentum_min,
                   self.momentum_max))
        step, start_step = min(step, self.total_steps - 1), 0.0
        for i, (end_step, lr0, lr1, m0, m1) in enumerate(phases):
            if step <= end_step or i == len(phases) - 1:
                pct = (step - start_step) / (end_step - start_step) if end_step != start_step else 1.0
                return _annealing_cos(lr0, lr1, pct), _annealing_cos(m0, m1, pct)
            start_step = end_step
        raise AssertionError("unreachable: the last phase always answers")


def _annealing_cos(start: float, end: float, pct: float) -> float:
    """OneCycleLR._annealing_cos: cosine from ``start`` to ``end`` as pct goes from 0 to 1."""
    cos_out = math.cos(math.pi * pct) + 1
    return end + (start - end) / 2.0 * cos_out


def build_schedule(cfg: OptimCfg, steps_per_epoch: int, epochs: int) -> Schedule:
    total = steps_per_epoch * epochs
    peak = scaled_lr(cfg)
    start = cfg.warmup_start * cfg.lr_per_128
    return Schedule(peak=peak, start=start if cfg.warmup_mode == "constant" else min(start, peak),
                    constant_warmup=cfg.warmup_mode == "constant", total_steps=total,
                    warmup_steps=min(total, round(cfg.warmup_epochs * steps_per_epoch)), kind=cfg.schedule,
                    milestone_steps=tuple(round(m * total) for m in cfg.milestones), gamma=cfg.gamma,
                    momentum=cfg.momentum, pct_start=cfg.onecycle_pct_start, div_factor=cfg.onecycle_div_factor,
                    final_div_factor=cfg.onecycle_final_div_factor, momentum_min=cfg.momentum_min,
                    momentum_max=cfg.momentum_max)


def decay_groups(model: torch.nn.Module, cfg: OptimCfg) -> list[dict[str, Any]]:
    """SGD's parameter groups: one holding every trainable parameter (He 2015: weight decay on all); with
    optim.wd_bn_bias = false, the normalization layers' weights and biases and every other bias in a second group
    without weight decay (Goyal et al. 2017 sec. 5.1; torchvision references' --norm-weight-decay 0)."""
    if cfg.wd_bn_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    norms = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm)
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                (no_decay if isinstance(module, norms) or name == "bias" else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimCfg) -> torch.optim.SGD:
    """SGD over every trainable parameter, weight decay as :func:`decay_groups` says."""
    config.check_optim(cfg)
    groups = decay_groups(model, cfg)
    params = [p for g in groups for p in g["params"]]
    impl = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[cfg.impl]
    momentum = cfg.momentum_max if cfg.schedule == "onecycle" else cfg.momentum  # one-cycle starts at its max
    opt = torch.optim.SGD(groups, lr=scaled_lr(cfg), momentum=momentum, nesterov=cfg.nesterov,
                          weight_decay=cfg.weight_decay, **impl)
    if momentum or cfg.schedule == "onecycle":
        # Momentum buffers made up front, as zeros (buf = 0 * momentum + grad is torch's first step): fused SGD
        # raises on a missing buffer, which a branch stochastic depth dropped on step 0 leaves (tests/test_optim.py)
        # and the step graph needs its state to exist before capture.
        for p in params:
            opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return opt


class ScheduledMomentum:
    """SGD's momentum read from a 0-dim device tensor (:attr:`value`), set each step by :meth:`prepare`: one-cycle.

    torch's SGD takes momentum as a Python float, and fused SGD's kernel too (aten::_fused_sgd_ has a tensor-lr
    overload, none for momentum), so a captured step graph would keep the capture's value. Instead the groups keep
    momentum 0 and no weight decay, and this optimizer pre-hook (it runs inside opt.step, so inside the graph)
    turns each gradient into the direction torch's SGD would step along: g + wd * p, buf = m * buf + that, then
    that + m * buf (Nesterov) or buf. SGD then applies only p -= lr * d (fused: one kernel, a device lr in the
    graph). The buffers stay in opt.state[p]["momentum_buffer"], where checkpoints and the graph's state find them;
    a parameter without a gradient (a dropped branch) is skipped, as torch's SGD skips it. With fp16, fused SGD
    would unscale inside its kernel, after this hook: config.validate refuses that pair."""

    def __init__(self, opt: torch.optim.SGD, momentum_at: Callable[[int], float]):
        self.momentum_at = momentum_at
        self.terms = [(g["weight_decay"], g["nesterov"]) for g in opt.param_groups]
        for g in opt.param_groups:
            g["weight_decay"], g["momentum"], g["nesterov"] = 0.0, 0.0, False
        first = opt.param_groups[0]["params"][0]
        self.value = torch.tensor(momentum_at(0), dtype=first.dtype, device=first.device)
        opt.register_step_pre_hook(self._direction)

    def prepare(self, step: int) -> None:
        """The momentum of global step ``step`` into :attr:`value` (a fill: no sync)."""
        self.value.fill_(self.momentum_at(step))

    @torch.no_grad()
    def _direction(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group, (wd, nesterov) in zip(opt.param_groups, self.terms):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads, bufs = [p.grad for p in params], [opt.state[p]["momentum_buffer"] for p in params]
            if wd:
                torch._foreach_add_(grads, params, alpha=wd)
            torch._foreach_mul_(bufs, self.value)
            torch._foreach_add_(bufs, grads)
            if nesterov:
                torch._foreach_add_(grads, torch._foreach_mul(bufs, self.value))
            else:
                torch._foreach_copy_(grads, bufs)


def scheduled_momentum(opt: torch.optim.SGD, schedule: Schedule) -> ScheduledMomentum | None:
    """A :class:`ScheduledMomentum` on ``opt`` when the schedule varies the momentum, else None (torch's SGD as is)."""
    return ScheduledMomentum(opt, schedule.momentum_at) if schedule.cycles_momentum else None


# ----------------------------------------------------------------------------------------------------
# Lookahead (Zhang et al. 2019): ``optim.lookahead_k``, ``optim.lookahead_alpha``.
#
# Slow weights start as the model's; after every k-th optimizer step (and the run's last, so a run ends on slow
# weights, as cifar10-airbench's final lookahead update does) slow += alpha * (fast - slow), and the fast weights
# (the model) restart from them. Like airbench's lookahead_state it covers every floating-point tensor of the
# state dict, BN's running statistics too. Eager steps decide on the host (:meth:`prepare` counts steps there);
# the step graph runs :meth:`apply`, which decides on the device from its own step counter, with factors 0/1 that
# leave the tensors exactly as they were on the other steps, so a replay has no host branch.

class Lookahead:
    def __init__(self, model: torch.nn.Module, k: int, alpha: float, total_steps: int):
        if k < 1 or not 0.0 < alpha <= 1.0:
            raise ValueError(f"Lookahead needs k >= 1 and alpha in (0, 1], got {k}, {alpha}")
        self.k, self.total_steps = k, total_steps
        self.names = [n for n, t in model.state_dict().items() if t.is_floating_point()]
        live = model.state_dict()
        self.live = [live[n] for n in self.names]
        self.slow = [t.detach().clone() for t in self.live]
        device = self.slow[0].device
        self.alpha = torch.tensor(alpha, dtype=torch.float32, device=device)
        self.steps = 0  # optimizer steps taken, on the host
        self.count = torch.zeros((), dtype=torch.int64, device=device)  # ... and on the device (graph path)

    def prepare(self) -> bool:
        """Count a step on the host; whether it ends with a sync (eager: then call :meth:`sync`)."""
        self.steps += 1
        return self.steps % self.k == 0 or self.steps == self.total_steps

    @torch.no_grad()
    def sync(self) -> None:
        """slow += alpha * (fast - slow); fast = slow."""
        diff = torch._foreach_sub(self.live, self.slow)
        torch._foreach_mul_(diff, self.alpha)
        torch._foreach_add_(self.slow, diff)
        torch._foreach_copy_(self.live, self.slow)

    @torch.no_grad()
    def apply(self) -> None:
        """:meth:`sync` on the steps it is due, decided on the device (graph-safe: the same kernels every step);
        the other steps multiply by 0 and 1, which leaves every finite value as it was."""
        self.count += 1
        due = (self.count % self.k == 0) | (self.count == self.total_steps)
        on = due.to(torch.float32)
        diff = torch._foreach_sub(self.live, self.slow)
        torch._foreach_mul_(diff, self.alpha * on)
        torch._foreach_add_(self.slow, diff)
        torch._foreach_mul_(self.live, 1.0 - on)
        torch._foreach_add_(self.live, torch._foreach_mul(self.slow, on))

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "slow": dict(zip(self.names, self.slow))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s values; ValueError, TypeError or RuntimeError if they do not fit."""
        steps, slow = state["steps"], state["slow"]
        if not isinstance(steps, int) or steps < 0 or not isinstance(slow, dict):
            raise TypeError(f"lookahead.steps is {steps!r:.40}" if not isinstance(steps, int) or steps < 0
                            else "lookahead.slow is not a dict")
        if sorted(slow) != sorted(self.names):
            raise ValueError(f"lookahead.slow holds {len(slow)} tensors where the model has {len(self.names)}")
        with torch.no_grad():
            for name, t in zip(self.names, self.slow):
                t.copy_(slow[name])  # RuntimeError on another shape
        self.steps = steps
        self.count.fill_(steps)


# ----------------------------------------------------------------------------------------------------
# An exponential moving average of the weights, scored at every evaluation: ``optim.ema_decay``.
#
# Polyak averaging (Polyak & Juditsky 1992) as cifar10-airbench's predecessor hlb-cifar10 and timm's ModelEmaV2
# use it for short runs: after each optimizer step ``avg = d * avg + (1 - d) * w`` over every parameter and
# every floating-point buffer (BN's running mean and variance, as timm does), with the decay ramped up as
# TensorFlow's ExponentialMovingAverage(num_updates) does, ``d_t = min(d, (1 + t) / (10 + t))``, so the first
# steps' random weights fade quickly. Evaluation swaps the average into the model (one copy each way) and
# puts the trained weights back: training never sees the average, only what is scored does.
#
# The update reads its weight ``1 - d_t`` from a device tensor filled before each step, so it is the same
# kernels every step: a CUDA graph of the whole step (fastres/step.py) holds it, and no step waits on the
# host. The averages live beside the model (a few hundred kB for ResNet-20) and go into the checkpoint.

DECAY_RAMP = 10  # d_t = min(d, (1 + t) / (DECAY_RAMP + t)): TensorFlow's ExponentialMovingAverage num_updates rule


class WeightEMA:
    """The average of ``model``'s floating-point state (parameters and BN statistics), started at its current
    values. Per step: :meth:`prepare` (host: the step's weight into a device scalar), then :meth:`apply`
    (device only, graph-safe); :meth:`update` does both."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"an EMA decay is in (0, 1), got {decay}")
        self.decay = decay
        self.names = [k for k, t in model.state_dict().items() if t.is_floating_point()]
        live = model.state_dict()  # detached tensors that share the parameters' and buffers' storage
        self.live = [live[k] for k in self.names]
        self.avg = [t.detach().clone() for t in self.live]
        self.updates = 0  # steps averaged so far: the t of d_t
        self.weight = torch.zeros((), dtype=torch.float32, device=self.avg[0].device)  # 1 - d_t

    def decay_at(self, t: int) -> float:
        return min(self.decay, (1 + t) / (DECAY_RAMP + t))

    def prepare(self) -> None:
        self.weight.fill_(1.0 - self.decay_at(self.updates))
        self.updates += 1

    @torch.no_grad()
    def apply(self) -> None:
        """avg += (1 - d_t) * (w - avg): three foreach ops whose factor is a 0-dim device tensor, so a captured
        graph replays them with each step's factor and the host never reads a device value."""
        diff = torch._foreach_sub(self.live, self.avg)
        torch._foreach_mul_(diff, self.weight)
        torch._foreach_add_(self.avg, diff)

    def update(self) -> None:
        self.prepare()
        self.apply()

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model holds the average inside the block, its own weights again after it (whatever the
        block changed in between, e.g. precise BN's statistics, is dropped)."""
        saved = [t.clone() for t in self.live]
        with torch.no_grad():
            torch._foreach_copy_(self.live, self.avg)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.live, saved)

    def broadcast(self) -> None:
        """Give every rank rank 0's average. The parameters' averages agree anyway; the BN statistics' do not
        (each rank updates them on its own images), so every rank must score the same average."""
        if dist.is_initialized():
            for t in self.avg:
                dist.broadcast(t, src=0)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "avg": dict(zip(self.names, self.avg))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s values; ValueError, TypeError or RuntimeError if they do not fit."""
        updates, avg = state["updates"], state["avg"]
        if not isinstance(updates, int) or updates < 0 or not isinstance(avg, dict):
            raise TypeError(f"ema.updates is {updates!r:.40}" if not isinstance(updates, int) or updates < 0
                            else "ema.avg is not a dict")
        if sorted(avg) != sorted(self.names):
            raise ValueError(f"ema.avg holds {len(avg)} tensors where the model has {len(self.names)}")
        with torch.no_grad():
            for name, t in zip(self.names, self.avg):
                t.copy_(avg[name])  # RuntimeError on another shape
        self.updates = updates
