"""Evaluation: top-1 (and top-5) accuracy sharded over ranks and summed exactly; precise BatchNorm statistics."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from fastres import distributed
from fastres.config import TTA, EvalCfg
from fastres.data.base import normalize, to_batch
from fastres.data.cifar import MEAN, STD
from fastres.model import batchnorm_train_mode
from fastres.step import Precision
from fastres.techniques import WeightEMA

Sets = dict[str, tuple[torch.Tensor, torch.Tensor]]  # split name -> (uint8 images, labels) on the device
EVAL_BATCH = {"cuda": 1024, "cpu": 256}  # 256: the fastest forward batch measured on a 2-core CPU




@torch.no_grad()
def accuracies(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *, rank: int = 0,
               world: int = 1, amp_dtype: torch.dtype | None = None, channels_last: bool = False,
               tta: str = "off", norm: tuple = (MEAN, STD), top5: bool = False) -> dict[str, float]:
    """Top-1 accuracy of ``model`` (in eval mode) on uint8 ``images`` (N, 3, H, W) on the model's device.

    Rank r scores images r, r + world, ...; the counts are summed over ranks, so every image counts once.
    ``tta = "flip"``: each image's logits are averaged with those of its mirror image (test-time
    augmentation with the training's own flip, as cifar10-airbench evaluates). ``tta = "flip-translate"``:
    half that flip average, plus a quarter each of the flip averages of the image moved one pixel up-left
    and one pixel down-right (6 forward passes; cifar10-airbench's tta_level 2). The moved images are
    two of the training's own crops (zero padding, offsets PAD - 1 and PAD + 1), where airbench pads by
    reflection. The result maps each level the passes gave ("off", then "flip" when tta is on, then
    "flip-translate" when asked) to its accuracy: the plain one and every average on the way to ``tta``.
    With ``top5`` the result also maps "top5" to the share of images whose label is among the 5 highest logits
    of the ``tta`` level (all of them with fewer than 5 classes). ``norm``: the data's (mean, std).
    """
    if tta not in TTA:
        raise ValueError(f"tta {tta!r} is not one of {TTA}")
    was_training = model.training
    model.eval()
    x, y = images[rank::world], labels[rank::world]
    levels = TTA[:TTA.index(tta) + 1]
    correct = torch.zeros(len(levels) + top5, dtype=torch.int64, device=images.device)
    dtype = amp_dtype or torch.float32
    bs = EVAL_BATCH.get(images.device.type, 1024)
    for i in range(0, len(y), bs):
        xb = to_batch(normalize(x[i:i + bs], *norm), dtype, channels_last)
        with torch.autocast(images.device.type, dtype=dtype, enabled=amp_dtype is not None):
            logits = [model(xb).float()]
            if tta != "off":
                logits.append((logits[0] + model(xb.flip(3)).float()) / 2)
            if tta == "flip-translate":  # 1/2 the flip average + 1/4 that of each moved image
                padded = F.pad(x[i:i + bs], (1, 1, 1, 1))  # uint8 zeros, as the training crops pad
                both = logits[1] / 2
                for moved in (padded[..., :-2, :-2], padded[..., 2:, 2:]):
                    xm = to_batch(normalize(moved, *norm), dtype, channels_last)
                    both = both + (model(xm).float() + model(xm.flip(3)).float()) / 8
                logits.append(both)
        yb = y[i:i + bs]
        hits = [(lg.argmax(1) == yb).sum() for lg in logits]
        if top5:
            top = logits[-1].topk(min(5, logits[-1].shape[1]), dim=1).indices
            hits.append((top == yb[:, None]).any(1).sum())
        correct += torch.stack(hits)
    counts = distributed.all_reduce(torch.cat([correct, torch.tensor([len(y)], device=images.device)]))
    model.train(was_training)
    n = max(1, counts[-1].item())
    return {level: c / n for level, c in zip((*levels, "top5"), counts[:-1].tolist())}


def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *, tta: str = "off",
             **kw) -> float:
    """The accuracy :func:`accuracies` gives for ``tta``."""
    return accuracies(model, images, labels, tta=tta, **kw)[tta]


@torch.no_grad()
def precise_bn_(model: torch.nn.Module, images: torch.Tensor, *, micro_batch: int, batches: int, rank: int = 0,
                world: int = 1, amp_dtype: torch.dtype | None = None, channels_last: bool = False,
                norm: tuple = (MEAN, STD)) -> int:
    """Replace BN running averages by statistics of the current weights; the number of images used per rank.

    Precise BN (Wu & Johnson 2021, "Rethinking Batch in BatchNorm") with the population-variance estimator of
    its appendix (fvcore's ``_PopulationVarianceEstimator``): per channel, the mean and the biased variance of
    all values seen in ``batches`` un-augmented training micro-batches of ``micro_batch`` images (what one forward
    of training sees), pooled in float64 over
    ranks (rank r uses images r, r + world, ...). Every block is kept and dropout is off, as evaluated.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    sizes: dict[torch.nn.Module, int] = {}  # values per channel each BN layer saw in this forward

    def count(bn, inputs):
        sizes[bn] = inputs[0].numel() // inputs[0].shape[1]

    hooks = [bn.register_forward_pre_hook(count) for bn in bns]
    # per layer and channel: the sum of the values, of their squares, and their number
    acc = [torch.zeros(3, bn.num_features, dtype=torch.float64, device=bn.running_mean.device) for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = 1.0  # after a forward the buffers hold that batch's mean and unbiased variance
    x = images[rank::world]
    n = min(batches * micro_batch, (len(x) // micro_batch) * micro_batch or len(x))
    dtype = amp_dtype or torch.float32
    try:
        with batchnorm_train_mode(model):
            for i in range(0, n, micro_batch):
                sizes.clear()
                with torch.autocast(images.device.type, dtype=dtype, enabled=amp_dtype is not None):
                    model(to_batch(normalize(x[i:i + micro_batch], *norm), dtype, channels_last))
                for bn, a in zip(bns, acc):
                    if bn in sizes:  # (a layer not run in this forward saw nothing)
                        size, mean, var = sizes[bn], bn.running_mean.double(), bn.running_var.double()
                        a[0] += size * mean
                        a[1] += size * mean.square() + (size - 1) * var  # N * (mean^2 + biased variance)
                        a[2] += size
    finally:
        for hook in hooks:
            hook.remove()
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
    if bns:  # summed over ranks (one collective) before dividing: the pooling is exact across ranks
        acc = distributed.all_reduce(torch.cat([a.flatten() for a in acc])).split([3 * bn.num_features for bn in bns])
    for bn, a in zip(bns, acc):
        total, squares, seen = a.view(3, -1)
        if seen[0] > 0:  # else the reset statistics stay
            mean = total / seen
            bn.running_mean.copy_(mean)
            bn.running_var.copy_((squares / seen - mean.square()).clamp_(min=0))
    return n


def target_split(cfg: EvalCfg) -> str:
    """The split whose accuracy is compared with run.target_acc: tuning runs never look at the test set."""
    return "test" if cfg.on_test else "val"


def evaluate_all(model: torch.nn.Module, cfg: EvalCfg, sets: Sets, *, ema: WeightEMA | None, prec: Precision,
                 train_images: torch.Tensor | None, micro_batch: int, rank: int = 0, world: int = 1,
                 norm: tuple = (MEAN, STD), top5: bool = False) -> tuple[dict[str, float], dict[str, float]]:
    """One evaluation as the loop logs it: (accuracy per split, the row's other accuracies, named
    ``<split>_acc_<key>`` for the keys of fastres.log.EXTRA_ACCS). With a weight average the average is scored,
    and the trained weights' own accuracy (their running BN statistics) is the "no_ema" one; with precise BN the
    running statistics' accuracy is "running_bn"; with TTA the same forward passes give "no_tta" (and "flip"
    for flip-translate); with ``top5``, each split's top-5 accuracy is "<split>_acc_top5"."""
    score = dict(rank=rank, world=world, amp_dtype=prec.amp_dtype, channels_last=prec.channels_last, norm=norm)
    extra, tta, target = {}, cfg.tta, target_split(cfg)
    if ema is not None:
        ema.broadcast()  # every rank scores rank 0's average (its BN statistics differ per rank)
        extra[f"{target}_acc_no_ema"] = accuracy(model, *sets[target], tta=tta, **score)
    with ema.swapped_in() if ema is not None else nullcontext():
        if cfg.precise_bn:
            extra[f"{target}_acc_running_bn"] = accuracy(model, *sets[target], tta=tta, **score)
            precise_bn_(model, train_images, micro_batch=micro_batch, batches=cfg.precise_bn_batches, **score)
        scored = {name: accuracies(model, xs, ys, tta=tta, top5=top5, **score) for name, (xs, ys) in sets.items()}
    if tta != "off":
        extra.update({f"{name}_acc_no_tta": a["off"] for name, a in scored.items()})
    if tta == "flip-translate":
        extra.update({f"{name}_acc_flip": a["flip"] for name, a in scored.items()})
    if top5:
        extra.update({f"{name}_acc_top5": a["top5"] for name, a in scored.items()})
    return {name: a[tta] for name, a in scored.items()}, extra
