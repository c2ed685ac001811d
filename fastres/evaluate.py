"""Evaluation: accuracy sharded over ranks and summed exactly; precise BatchNorm statistics."""

from __future__ import annotations

import torch

from fastres import distributed
from fastres.data import normalize, to_batch
from fastres.model import batchnorm_train_mode

EVAL_BATCH = {"cuda": 1024, "cpu": 256}  # 256 is the fastest forward batch on our 2-core CPU


TTA = ("off", "flip")


@torch.no_grad()
def accuracies(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *, rank: int = 0,
               world: int = 1, amp_dtype: torch.dtype | None = None, channels_last: bool = False,
               tta: str = "off") -> dict[str, float]:
    """Top-1 accuracy of ``model`` (in eval mode) on uint8 ``images`` (N, 3, 32, 32) on the model's device.

    Rank r scores images r, r + world, ...; the counts are summed over ranks, so every image counts once.
    ``tta = "flip"``: each image's logits are averaged with those of its mirror image (test-time
    augmentation with the training's own flip, as cifar10-airbench evaluates). The result maps "off" to
    the plain accuracy and, with tta on, ``tta`` to the augmented one: both from the same forward passes.
    """
    if tta not in TTA:
        raise ValueError(f"tta {tta!r} is not one of {TTA}")
    was_training = model.training
    model.eval()
    x, y = images[rank::world], labels[rank::world]
    correct = torch.zeros(2, dtype=torch.int64, device=images.device)  # plain, augmented
    dtype = amp_dtype or torch.float32
    bs = EVAL_BATCH.get(images.device.type, 1024)
    for i in range(0, len(y), bs):
        xb = to_batch(normalize(x[i:i + bs]), dtype, channels_last)
        with torch.autocast(images.device.type, dtype=dtype, enabled=amp_dtype is not None):
            logits = model(xb).float()
            augmented = (logits + model(xb.flip(3)).float()) / 2 if tta == "flip" else logits
        yb = y[i:i + bs]
        correct += torch.stack([(logits.argmax(1) == yb).sum(), (augmented.argmax(1) == yb).sum()])
    counts = distributed.all_reduce(torch.cat([correct, torch.tensor([len(y)], device=images.device)]))
    model.train(was_training)
    n = max(1, counts[2].item())
    out = {"off": counts[0].item() / n}
    if tta != "off":
        out[tta] = counts[1].item() / n
    return out


def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *, tta: str = "off",
             **kw) -> float:
    """The accuracy :func:`accuracies` gives for ``tta``."""
    return accuracies(model, images, labels, tta=tta, **kw)[tta]


@torch.no_grad()
def precise_bn_(model: torch.nn.Module, images: torch.Tensor, *, batch: int, batches: int, rank: int = 0,
                world: int = 1, amp_dtype: torch.dtype | None = None, channels_last: bool = False) -> int:
    """Replace BN running averages by statistics of the current weights; the number of images used per rank.

    As fvcore's update_bn_stats (the "precise BN" of Wu & Johnson 2021, "Rethinking Batch in BatchNorm"):
    reset the statistics, forward ``batches`` un-augmented training batches of ``batch`` images with BN on
    batch statistics and a cumulative average (momentum None) instead of the exponential one, then
    average over ranks (each rank uses its own images r, r + world, ...). Every block is kept (stochastic
    depth in its eval form) and dropout is off: the network is the one that is evaluated.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    x = images[rank::world]
    n = min(batches * batch, (len(x) // batch) * batch or len(x))
    dtype = amp_dtype or torch.float32
    with batchnorm_train_mode(model):
        for i in range(0, n, batch):
            with torch.autocast(images.device.type, dtype=dtype, enabled=amp_dtype is not None):
                model(to_batch(normalize(x[i:i + batch]), dtype, channels_last))
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
        for buf in (bn.running_mean, bn.running_var):
            distributed.all_reduce(buf).div_(world)
    return n
