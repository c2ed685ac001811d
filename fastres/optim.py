"""SGD with momentum and the learning-rate schedule, a pure function of the optimizer step.

- Linear scaling (Goyal et al. 2017): lr = lr_per_128 * global_batch / 128.
- Gradual warmup (Goyal et al. 2017, sec. 2.2): over ``warmup_epochs`` the lr rises by a constant amount
  per iteration from warmup_start * lr_per_128 (Goyal: 1, the batch-128 rate) to the scaled lr; with
  batch <= 128 and warmup_start = 1 there is nothing to warm up from and the warmup is flat.
  Constant warmup (He 2015, ResNet-110: 0.01 until training error < 80%, ~400 iterations, then 0.1): the lr
  stays at warmup_start * lr_per_128 for the warmup, then the schedule starts.
- "step": multiply by ``gamma`` at each milestone, a fraction of all steps (He 2015: /10 at 50% and 75%).
  "cosine": half-cosine from the scaled lr to 0 over the steps after warmup.
Being a function of the step, the schedule needs no state in a checkpoint to resume exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastres.config import OptimCfg
from fastres.errors import UserError


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

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            if self.constant_warmup:
                return self.start
            return self.start + (self.peak - self.start) * step / self.warmup_steps
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            t = min(1.0, (step - self.warmup_steps) / span)
            return self.peak * 0.5 * (1.0 + math.cos(math.pi * t))
        return self.peak * self.gamma ** sum(step >= m for m in self.milestone_steps)


def build_schedule(cfg: OptimCfg, steps_per_epoch: int, epochs: int) -> Schedule:
    total = steps_per_epoch * epochs
    peak = scaled_lr(cfg)
    start = cfg.warmup_start * cfg.lr_per_128
    return Schedule(peak=peak, start=start if cfg.warmup_mode == "constant" else min(start, peak),
                    constant_warmup=cfg.warmup_mode == "constant", total_steps=total,
                    warmup_steps=min(total, round(cfg.warmup_epochs * steps_per_epoch)), kind=cfg.schedule,
                    milestone_steps=tuple(round(m * total) for m in cfg.milestones), gamma=cfg.gamma)


def build_optimizer(model: torch.nn.Module, cfg: OptimCfg) -> torch.optim.SGD:
    """SGD over every trainable parameter, weight decay on all of them (He 2015)."""
    if cfg.nesterov and cfg.momentum == 0:
        raise UserError("optim.nesterov = true needs optim.momentum > 0")
    params = [p for p in model.parameters() if p.requires_grad]
    impl = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[cfg.impl]
    opt = torch.optim.SGD(params, lr=scaled_lr(cfg), momentum=cfg.momentum, nesterov=cfg.nesterov,
                          weight_decay=cfg.weight_decay, **impl)
    if cfg.momentum:
        # Momentum buffers made up front, as zeros (buf = 0 * momentum + grad is torch's first step): fused SGD
        # raises on a missing buffer, which a branch stochastic depth dropped on step 0 leaves (tests/test_optim.py)
        # and the step graph needs its state to exist before capture.
        for p in params:
            opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return opt
