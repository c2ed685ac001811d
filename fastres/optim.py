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

The one-cycle momentum, Lookahead and the weight average are techniques with per-step state: fastres/techniques.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

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


def build_optimizer(model: torch.nn.Module, cfg: OptimCfg) -> torch.optim.Optimizer:
    """SGD over every trainable parameter, weight decay as :func:`decay_groups` says, or :class:`LARS` (``cfg``
    validated at load)."""
    if cfg.name == "lars":
        groups = decay_groups(model, replace(cfg, wd_bn_bias=False))  # MLPerf: BN and biases, no decay, no trust
        groups[1]["lars"] = False
        return LARS(groups, lr=scaled_lr(cfg), momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                    nesterov=cfg.nesterov, trust=cfg.lars_trust)
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


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (You et al. 2017) with momentum, as MLPerf's ResNet-50 reference steps it
    (TensorFlow's LARSOptimizer): per parameter tensor of a group with ``lars`` (the default),

        trust = trust_coefficient * |w| / (|g| + wd * |w|)   (1 where |w| or |g| is 0)
        v = momentum * v + lr * trust * (g + wd * w);   w -= v   (Nesterov: w -= momentum * v + lr * trust * (...))

    and in a group with ``lars = False`` (BatchNorm parameters and biases) the same with trust 1 and that group's
    weight decay (0). The norms, the trust ratios and the update are foreach ops over the group on the device, and
    ``lr`` may be a 0-dim device tensor, so a step graph captures it. Momentum buffers are made up front."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, nesterov: bool = False,
                 trust: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                                      trust=trust, lars=True))
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads, bufs = [p.grad for p in params], [self.state[p]["momentum_buffer"] for p in params]
            wd, m, lr = group["weight_decay"], group["momentum"], group["lr"]
            steps = torch._foreach_add(grads, params, alpha=wd) if wd else [g.clone() for g in grads]
            if group["lars"]:
                w_norm = torch.stack(torch._foreach_norm(params))
                g_norm = torch.stack(torch._foreach_norm(grads))
                trust = torch.where((w_norm > 0) & (g_norm > 0), group["trust"] * w_norm / (g_norm + wd * w_norm),
                                    torch.ones_like(w_norm))
                torch._foreach_mul_(steps, list((lr * trust).unbind()))  # lr * trust * (g + wd * w)
            else:
                torch._foreach_mul_(steps, lr)
            torch._foreach_mul_(bufs, m)
            torch._foreach_add_(bufs, steps)
            if group["nesterov"]:
                torch._foreach_add_(steps, torch._foreach_mul(bufs, m))
                torch._foreach_sub_(params, steps)
            else:
                torch._foreach_sub_(params, bufs)

