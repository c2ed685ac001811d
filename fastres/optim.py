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
from collections.abc import Iterator
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
    config.check_optim(cfg)
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
