"""The stateful techniques: each one class behind one small interface, registered in one list (fastres/build.py).

A technique is what acts once per optimizer step and may keep state across steps: the weight average (EMA),
Lookahead's slow weights, one-cycle's scheduled momentum, stochastic depth's per-step draws. Each follows
:class:`Technique`:

- ``prepare(step)`` on the host before global step ``step``: fills the device scalars ``apply()`` reads (a fill is
  no host sync) and says whether ``apply()`` changes anything this step;
- ``apply()`` on the device after the optimizer update: the same kernels every step, reading only device tensors,
  so a captured step graph (fastres/step.py) replays it; the eager step calls it only when ``prepare`` said so;
- ``graph_state()``: the tensors ``apply()`` changes, which a step graph keeps in place and restores after its
  capture warm-up;
- ``part`` with ``state_dict()`` / ``load_state_dict()``: its part of a checkpoint ("" when its state is a
  function of the step and nothing is saved).

The step forms (eager, compiled, captured) and the checkpoint loop over the list and name no technique. Adding
one: a class here, one line in fastres.build.build_techniques, its config fields (off by default: off is the
baseline) and its test; docs/layout.md walks through it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from fastres import rng


class Technique:
    """The interface; every method's default does nothing, so a technique writes only what it uses."""
    name = "a technique"  # what messages call it
    part = ""  # its checkpoint part; "" saves nothing
    graphable = True  # can a captured step graph hold it? (config.validate refuses step_graph where not)

    def prepare(self, step: int) -> bool:
        """Host, before global step ``step`` (the count of steps taken before it): fill what apply() reads.
        Whether apply() changes anything this step."""
        return False

    def apply(self) -> None:
        """Device, after the optimizer update; graph-safe."""

    def graph_state(self) -> list[torch.Tensor]:
        """The tensors apply() changes (a step graph's state beside the model's and the optimizer's)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s values; ValueError, TypeError or RuntimeError if they do not fit."""


def find(techniques: list[Technique], kind: type) -> Any:
    """The technique of type ``kind`` in the list, or None."""
    return next((t for t in techniques if isinstance(t, kind)), None)


# ----------------------------------------------------------------------------------------------------
# Scheduled momentum: one-cycle's momentum (optim.schedule = "onecycle"), a 0-dim device tensor.

class ScheduledMomentum(Technique):
    """SGD's momentum read from a 0-dim device tensor (:attr:`value`), filled each step by :meth:`prepare`.

    torch's SGD takes momentum as a Python float, and fused SGD's kernel too (aten::_fused_sgd_ has a tensor-lr
    overload, none for momentum), so a captured step graph would keep the capture's value. Instead the groups keep
    momentum 0 and no weight decay, and this optimizer pre-hook (it runs inside opt.step, so inside the graph)
    turns each gradient into the direction torch's SGD would step along: g + wd * p, buf = m * buf + that, then
    that + m * buf (Nesterov) or buf. SGD then applies only p -= lr * d (fused: one kernel, a device lr in the
    graph). The buffers stay in opt.state[p]["momentum_buffer"], where checkpoints and the graph's state find them;
    a parameter without a gradient (a dropped branch) is skipped, as torch's SGD skips it. With fp16, fused SGD
    would unscale inside its kernel, after this hook: config.validate refuses that pair. Make it before a
    checkpoint's optimizer state is loaded: it reads the groups' weight decay and Nesterov flag, then zeroes them."""
    name = "one-cycle's scheduled momentum"

    def __init__(self, opt: torch.optim.SGD, momentum_at: Callable[[int], float]):
        self.momentum_at = momentum_at
        self.terms = [(g["weight_decay"], g["nesterov"]) for g in opt.param_groups]
        for g in opt.param_groups:
            g["weight_decay"], g["momentum"], g["nesterov"] = 0.0, 0.0, False
        first = opt.param_groups[0]["params"][0]
        self.value = torch.tensor(momentum_at(0), dtype=first.dtype, device=first.device)
        opt.register_step_pre_hook(self._direction)

    def prepare(self, step: int) -> bool:
        self.value.fill_(self.momentum_at(step))  # read inside opt.step: nothing to apply after it
        return False

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


# ----------------------------------------------------------------------------------------------------
# Stochastic depth's draws (Huang et al. 2016: a block is dropped for the whole mini-batch).

class StochasticDepthDraws(Technique):
    """The step's drops drawn from (seed, step): the model draws them from its ``sd_gen`` in every training
    forward, and a forward pre-hook reseeds that generator with the step's seed first, so every micro-batch and
    every rank drops the same blocks (a CPU generator: deciding costs no device sync). Python branches in the
    forward: no step graph can hold them."""
    name = "stochastic depth's per-step drops"
    graphable = False

    def __init__(self, model: torch.nn.Module, seed: int):
        self.seed, self.step_seed, self.gen = seed, None, model.sd_gen
        model.register_forward_pre_hook(self._reseed)

    def prepare(self, step: int) -> bool:
        self.step_seed = rng.derive_seed(self.seed, rng.STOCHASTIC_DEPTH, step)
        return False

    def _reseed(self, module: torch.nn.Module, args: Any) -> None:
        if module.training and self.step_seed is not None:
            self.gen.manual_seed(self.step_seed)


# ----------------------------------------------------------------------------------------------------
# Lookahead (Zhang et al. 2019): ``optim.lookahead_k``, ``optim.lookahead_alpha``.
#
# Slow weights start as the model's; after every k-th optimizer step (and the run's last, so a run ends on slow
# weights, as cifar10-airbench's final lookahead update does) slow += alpha * (fast - slow), and the fast weights
# (the model) restart from them. Like airbench's lookahead_state it covers every floating-point tensor of the
# state dict, BN's running statistics too. prepare() decides on the host and fills a 0/1 factor on the device
# (only when it changes: two fills every k steps); apply() multiplies by it, which leaves every finite value as it
# was on the other steps, so a replayed graph has no host branch and the eager step applies it on due steps only.

class Lookahead(Technique):
    name, part = "Lookahead", "lookahead"

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
        self.on = torch.zeros((), dtype=torch.float32, device=device)  # 1 on a step that syncs, else 0
        self.on_host = 0.0  # what self.on holds
        self.steps = 0  # optimizer steps taken, this one included once prepared

    def prepare(self, step: int) -> bool:
        self.steps = step + 1
        due = self.steps % self.k == 0 or self.steps == self.total_steps
        if float(due) != self.on_host:
            self.on_host = float(due)
            self.on.fill_(self.on_host)
        return due

    @torch.no_grad()
    def apply(self) -> None:
        """slow += on * alpha * (fast - slow); fast = (1 - on) * fast + on * slow."""
        diff = torch._foreach_sub(self.live, self.slow)
        torch._foreach_mul_(diff, self.alpha * self.on)
        torch._foreach_add_(self.slow, diff)
        torch._foreach_mul_(self.live, 1.0 - self.on)
        torch._foreach_add_(self.live, torch._foreach_mul(self.slow, self.on))

    def graph_state(self) -> list[torch.Tensor]:
        return self.slow

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "slow": dict(zip(self.names, self.slow))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = _copied_in(state, "lookahead", "steps", "slow", self.names, self.slow)


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
# kernels every step: a CUDA graph of the whole step holds it, and no step waits on the host. The averages live
# beside the model (a few hundred kB for ResNet-20) and go into the checkpoint.

DECAY_RAMP = 10  # d_t = min(d, (1 + t) / (DECAY_RAMP + t)): TensorFlow's ExponentialMovingAverage num_updates rule


class WeightEMA(Technique):
    """The average of ``model``'s floating-point state (parameters and BN statistics), started at its current
    values. Per step: :meth:`prepare` (host: the step's weight into a device scalar), then :meth:`apply`
    (device only, graph-safe); :meth:`update` does both, for the next step."""
    name, part = "the weight average", "ema"

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

    def prepare(self, step: int) -> bool:
        self.weight.fill_(1.0 - self.decay_at(step))  # every step averages: t is the global step
        self.updates = step + 1
        return True

    @torch.no_grad()
    def apply(self) -> None:
        """avg += (1 - d_t) * (w - avg): three foreach ops whose factor is a 0-dim device tensor, so a captured
        graph replays them with each step's factor and the host never reads a device value."""
        diff = torch._foreach_sub(self.live, self.avg)
        torch._foreach_mul_(diff, self.weight)
        torch._foreach_add_(self.avg, diff)

    def update(self) -> None:
        self.prepare(self.updates)
        self.apply()

    def graph_state(self) -> list[torch.Tensor]:
        return self.avg

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
        if torch.distributed.is_initialized():
            for t in self.avg:
                torch.distributed.broadcast(t, src=0)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "avg": dict(zip(self.names, self.avg))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = _copied_in(state, "ema", "updates", "avg", self.names, self.avg)


def _copied_in(state: dict[str, Any], part: str, count: str, saved: str, names: list[str],
               tensors: list[torch.Tensor]) -> int:
    """Copy ``state[saved]`` (tensors by name) into ``tensors`` and return the step count ``state[count]``; a
    TypeError, ValueError or RuntimeError (another shape) naming ``part`` where they do not fit the model."""
    n, by_name = state[count], state[saved]
    if not isinstance(n, int) or n < 0 or not isinstance(by_name, dict):
        raise TypeError(f"{part}.{count} is {n!r:.40}" if not isinstance(n, int) or n < 0
                        else f"{part}.{saved} is not a dict")
    if sorted(by_name) != sorted(names):
        raise ValueError(f"{part}.{saved} holds {len(by_name)} tensors where the model has {len(names)}")
    with torch.no_grad():
        for name, t in zip(names, tensors):
            t.copy_(by_name[name])  # RuntimeError on another shape
    return n
