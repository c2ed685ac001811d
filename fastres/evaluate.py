"""Evaluation: accuracy sharded over ranks and summed exactly; precise BatchNorm statistics."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastres import distributed
from fastres.data import normalize, to_batch
from fastres.model import batchnorm_train_mode

EVAL_BATCH = {"cuda": 1024, "cpu": 256}  # 256 is the fastest forward batch on our 2-core CPU


TTA = ("off", "flip", "flip-translate")


@torch.no_grad()
def accuracies(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *, rank: int = 0,
               world: int = 1, amp_dtype: torch.dtype | None = None, channels_last: bool = False,
               tta: str = "off") -> dict[str, float]:
    """Top-1 accuracy of ``model`` (in eval mode) on uint8 ``images`` (N, 3, 32, 32) on the model's device.

    Rank r scores images r, r + world, ...; the counts are summed over ranks, so every image counts once.
    ``tta = "flip"``: each image's logits are averaged with those of its mirror image (test-time
    augmentation with the training's own flip, as cifar10-airbench evaluates). ``tta = "flip-translate"``:
    half that flip average, plus a quarter each of the flip averages of the image moved one pixel up-left
    and one pixel down-right (6 forward passes; cifar10-airbench's tta_level 2). The moved images are
    two of the training's own crops (zero padding, offsets PAD - 1 and PAD + 1), where airbench pads by
    reflection. The result maps each level the passes gave ("off", then "flip" when tta is on, then
    "flip-translate" when asked) to its accuracy: the plain one and every average on the way to ``tta``.
    """
    if tta not in TTA:
        raise ValueError(f"tta {tta!r} is not one of {TTA}")
    was_training = model.training
    model.eval()
    x, y = images[rank::world], labels[rank::world]
    levels = TTA[:TTA.index(tta) + 1]
    correct = torch.zeros(len(levels), dtype=torch.int64, device=images.device)
    dtype = amp_dtype or torch.float32
    bs = EVAL_BATCH.get(images.device.type, 1024)
    for i in range(0, len(y), bs):
        xb = to_batch(normalize(x[i:i + bs]), dtype, channels_last)
        with torch.autocast(images.device.type, dtype=dtype, enabled=amp_dtype is not None):
            logits = [model(xb).float()]
            if tta != "off":
                logits.append((logits[0] + model(xb.flip(3)).float()) / 2)
            if tta == "flip-translate":  # 1/2 the flip average + 1/4 that of each moved image
                padded = F.pad(x[i:i + bs], (1, 1, 1, 1))  # uint8 zeros, as the training crops pad
                both = logits[1] / 2
                for moved in (padded[..., :-2, :-2], padded[..., 2:, 2:]):
                    xm = to_batch(normalize(moved), dtype, channels_last)
                    both = both + (model(xm).float() + model(xm.flip(3)).float()) / 8
                logits.append(both)
        yb = y[i:i + bs]
        correct += torch.stack([(lg.argmax(1) == yb).sum() for lg in logits])
    counts = distributed.all_reduce(torch.cat([correct, torch.tensor([len(y)], device=images.device)]))
    model.train(was_training)
    n = max(1, counts[-1].item())
    return {level: c / n for level, c in zip(levels, counts[:-1].tolist())}


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
