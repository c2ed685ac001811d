"""ResNet-CIFAR 6n+2 (He et al. 2015, sec. 4.2) with the seed's techniques as flags.

- 3 stages of n basic blocks at 16/32/64 channels on 32/16/8 pixels, global average pool, 10-way fc.
- block "post": conv-BN-ReLU-conv-BN, add, ReLU (He 2015); "pre": BN-ReLU-conv-BN-ReLU-conv, add
  (He 2016, "Identity Mappings"), with the extra BN-ReLU after the last block. As in He 2016 (appendix)
  and fb.resnet.torch's preresnet, the first block and every block that changes shape split the two paths
  after their BN-ReLU; the others add the raw input.
- shortcut "A": stride-2 subsampling + zero channels (parameter-free; the paper's CIFAR choice);
  "B": 1x1 conv + BN projection where the shape changes.
- dropout (off by default): inverted dropout ("standard") or SpatialDropout of whole channels ("spatial",
  Tompson et al. 2015) between the two convolutions of every residual branch, where Wide ResNets
  (Zagoruyko & Komodakis 2016) put it. Eval mode is deterministic; rate 0 adds no module at all.
- stochastic depth (Huang et al. 2016): block l of L survives training with probability 1 - p_l,
  p_l = p_L (uniform) or p_L * l / L (linear decay); a dropped block skips its residual branch entirely
  (the source of the seed's speed-up) for the whole mini-batch, as in the paper. In eval the branch is
  scaled by its survival probability. With p_L = 0 the network is exactly the baseline.

ResNet-20 option A has 269,722 trainable parameters (the paper's 0.27M); BN running statistics are
buffers, not parameters.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastres.config import ModelCfg
from fastres.init import kaiming_init, orthonormal_init

WIDTHS = (16, 32, 64)


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class ShortcutA(nn.Module):
    """Parameter-free: subsample by the stride, zero-pad the new channels (half before, half after)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride, self.extra = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


def make_shortcut(kind: str, cin: int, cout: int, stride: int) -> nn.Module | None:
    """None where the shape is unchanged (identity); option A or B where it changes."""
    if stride == 1 and cin == cout:
        return None
    if kind == "A":
        return ShortcutA(cin, cout, stride)
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                     bn=nn.BatchNorm2d(cout)))


def make_dropout(p: float, kind: str) -> dict[str, nn.Module]:
    """{"drop": module} to splice into a branch, or {} when off (so off is the baseline, key for key)."""
    if not p:
        return {}
    return {"drop": nn.Dropout2d(p) if kind == "spatial" else nn.Dropout(p)}


class PostActBlock(nn.Module):
    """He 2015: relu(shortcut(x) + bn2(conv2(relu(bn1(conv1(x))))))."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut: str, death_rate: float,
                 dropout: dict[str, nn.Module] | None = None):
        super().__init__()
        self.branch = nn.Sequential(OrderedDict(
            conv1=conv3x3(cin, cout, stride), bn1=nn.BatchNorm2d(cout), relu=nn.ReLU(inplace=True),
            **(dropout or {}), conv2=conv3x3(cout, cout), bn2=nn.BatchNorm2d(cout)))
        self.shortcut = make_shortcut(shortcut, cin, cout, stride)
        self.death_rate = death_rate

    def forward(self, x: torch.Tensor, keep: bool = True) -> torch.Tensor:
        s = x if self.shortcut is None else self.shortcut(x)
        if not keep:
            return F.relu(s)
        f = self.branch(x)
        if not self.training and self.death_rate:
            f = f * (1.0 - self.death_rate)  # Huang 2016: expected contribution at test time
        return F.relu(s + f)

    def zero_init(self) -> None:
        nn.init.zeros_(self.branch.bn2.weight)


class PreActBlock(nn.Module):
    """He 2016: shortcut + conv2(relu(bn2(conv1(relu(bn1(x))))))."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut: str, death_rate: float,
                 split_after_preact: bool, dropout: dict[str, nn.Module] | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.branch = nn.Sequential(OrderedDict(
            conv1=conv3x3(cin, cout, stride), bn2=nn.BatchNorm2d(cout), relu=nn.ReLU(inplace=True),
            **(dropout or {}), conv2=conv3x3(cout, cout)))
        self.shortcut = make_shortcut(shortcut, cin, cout, stride)
        self.death_rate = death_rate
        self.split_after_preact = split_after_preact or self.shortcut is not None

    def forward(self, x: torch.Tensor, keep: bool = True) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        s = pre if self.split_after_preact else x
        if self.shortcut is not None:
            s = self.shortcut(s)
        if not keep:
            return s
        f = self.branch(pre)
        if not self.training and self.death_rate:
            f = f * (1.0 - self.death_rate)
        return s + f

    def zero_init(self) -> None:
        nn.init.zeros_(self.branch.conv2.weight)  # pre-act branches end in a conv, not a BN


def death_rates(num_blocks: int, p_last: float, mode: str) -> list[float]:
    """Per-block death rates p_l, l = 1..L (Huang 2016, eq. 4 for linear decay)."""
    if mode == "uniform":
        return [p_last] * num_blocks
    return [p_last * (i + 1) / num_blocks for i in range(num_blocks)]


class ResNetCifar(nn.Module):
    def __init__(self, depth: int = 20, block: str = "post", shortcut: str = "A",
                 stochastic_depth: float = 0.0, sd_mode: str = "linear", num_classes: int = 10,
                 dropout: float = 0.0, dropout_kind: str = "standard"):
        super().__init__()
        n = (depth - 2) // 6
        self.pre = block == "pre"
        self.stem = nn.Sequential(OrderedDict(conv=conv3x3(3, WIDTHS[0])))
        if not self.pre:
            self.stem.add_module("bn", nn.BatchNorm2d(WIDTHS[0]))
            self.stem.add_module("relu", nn.ReLU(inplace=True))
        rates = death_rates(3 * n, stochastic_depth, sd_mode)
        blocks, cin = [], WIDTHS[0]
        for stage, cout in enumerate(WIDTHS):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                p = rates[len(blocks)]
                drop = make_dropout(dropout, dropout_kind)
                if self.pre:
                    blocks.append(PreActBlock(cin, cout, stride, shortcut, p, split_after_preact=not blocks,
                                              dropout=drop))
                else:
                    blocks.append(PostActBlock(cin, cout, stride, shortcut, p, dropout=drop))
                cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.head_bn = nn.BatchNorm2d(cin) if self.pre else None
        self.fc = nn.Linear(cin, num_classes)
        self.death_rates = rates
        # Stochastic-depth draws: a CPU generator, so deciding costs no device sync; seed it the same on
        # every rank (the train loop does, per step) and all ranks drop the same blocks.
        self.sd_gen = torch.Generator()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = [True] * len(self.blocks)
        if self.training and any(self.death_rates):
            u = torch.rand(len(self.blocks), generator=self.sd_gen).tolist()
            keep = [ui >= p for ui, p in zip(u, self.death_rates)]
        x = self.stem(x)
        for blk, k in zip(self.blocks, keep):
            x = blk(x, keep=k)
        if self.head_bn is not None:
            x = F.relu(self.head_bn(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build_model(cfg: ModelCfg) -> ResNetCifar:
    """The network ``cfg`` describes, initialized with the global torch RNG (seed it first).

    With ``init = "lsuv"`` the weights are orthonormal; :func:`fastres.init.lsuv_` then scales them on data.
    """
    model = ResNetCifar(cfg.depth, cfg.block, cfg.shortcut, cfg.stochastic_depth, cfg.sd_mode,
                        cfg.num_classes, cfg.dropout, cfg.dropout_kind)
    if cfg.init == "lsuv":  # orthonormal now; the data-driven scaling needs batches: init.lsuv_ (train.py)
        orthonormal_init(model)
    else:
        kaiming_init(model)
    if cfg.zero_init_residual:  # Goyal et al. 2017, sec. 5.1: each block starts as the identity
        for blk in model.blocks:
            blk.zero_init()
    return model


def count_params(model: nn.Module) -> int:
    """Trainable parameters only: BN running statistics are buffers and do not count."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
