"""Weight initialization: He (the baseline) and LSUV.

- kaiming: He et al. 2015 (the ResNet paper's [13]): conv weights ~ N(0, 2 / (k*k*c_out)), as
  fb.resnet.torch does; BN at identity (weight 1, bias 0); the fc layer keeps PyTorch's default.
- lsuv: "All you need is a good init" (Mishkin & Matas 2016, Algorithm 1): orthonormal weights (Saxe et al.
  2014), then, layer by layer in forward order (the order a forward pass runs them, not the order they are
  registered in), divide the weights by the standard deviation of the layer's output on a mini-batch until
  its variance is within ``tol_var`` of 1 or ``t_max`` tries are spent, a fresh mini-batch each try.
  BatchNorm normalizes with batch statistics meanwhile, as in training; its running averages are put back
  afterwards. A layer whose output is all zeros (a zero-initialized residual branch) is left as it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn


def kaiming_init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def orthonormal_init(model: nn.Module) -> None:
    """Orthonormal conv and fc weights (rows of the (out, in*k*k) matrix), zero biases, BN at identity."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.orthogonal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@contextmanager
def batchnorm_train_mode(model: nn.Module) -> Iterator[None]:
    """The network as evaluated (every block kept and scaled, no dropout) but BN on batch statistics, which
    also updates its running averages. For precise BN and LSUV. Modes are restored on exit."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


class _Reached(Exception):
    """Raised by the hook once the layer under scaling has produced its output: the rest is not needed."""


@torch.no_grad()
def lsuv_(model: nn.Module, next_batch: Callable[[], torch.Tensor], tol_var: float = 0.1,
          t_max: int = 10) -> list[dict]:
    """Scale ``model``'s conv and fc weights in place (Mishkin & Matas 2016); one record per layer.

    ``next_batch()`` returns a fresh input batch each call. Layers go in the order a forward pass on the first
    batch runs them (an option-B block runs its shortcut's conv before its branch's), and that batch is the
    first layer's first try. Returns, per layer, the output variance before scaling, the last one measured
    and the number of forward passes it took.
    """
    names = {m: name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    saved = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    records = []
    with batchnorm_train_mode(model):
        order: dict[nn.Module, None] = {}  # the layers in the order they first run
        handles = [m.register_forward_hook(lambda mod, inp, out: order.setdefault(mod)) for m in names]
        try:
            batch = next_batch()
            model(batch)
        finally:
            for handle in handles:
                handle.remove()
        for layer in order:
            seen: dict[str, float] = {}

            def hook(mod, inp, out, seen=seen):
                seen["var"] = out.float().var().item()
                raise _Reached

            handle = layer.register_forward_hook(hook)
            first, tries = None, 0
            try:
                while tries < t_max:
                    try:
                        model(next_batch() if batch is None else batch)
                    except _Reached:
                        pass
                    batch = None
                    tries += 1
                    var = seen["var"]
                    first = var if first is None else first
                    if var == 0.0 or not math.isfinite(var) or abs(var - 1.0) < tol_var:
                        break
                    layer.weight.div_(math.sqrt(var))
            finally:
                handle.remove()
            records.append(dict(layer=names[layer], var_before=first, var_last=seen["var"], tries=tries,
                                skipped=seen["var"] == 0.0))
    model.load_state_dict(saved, strict=False)  # BN running averages as they were
    return records
