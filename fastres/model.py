"""ResNet-CIFAR 6n+2 (He et al. 2015, sec. 4.2) with the speed-up techniques as flags.

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
  (the source of stochastic depth's speed-up) for the whole mini-batch, as in the paper. In eval the branch is
  scaled by its survival probability. With p_L = 0 the network is exactly the baseline.

ResNet-20 option A has 269,722 trainable parameters (the paper's 0.27M); BN running statistics are
buffers, not parameters.

model.family = "imagenet": torchvision's ResNet-18/34/50/101/152 (He 2015, Table 1; bottlenecks stride in their
3x3 conv, "ResNet v1.5"): 7x7 stride-2 stem, 3x3 max-pool, 4 stages at width x 1/2/4/8 channels, projection
shortcuts (option B) where the shape changes, the same block options (pre-activation, stochastic depth, dropout,
zero-init). At width 64 and 1000 classes the parameter counts are torchvision's (tested), and its weights load
into ours in order.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastres.config import ModelCfg
from fastres.errors import UserError, one_line

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


class PostActBottleneck(nn.Module):
    """He 2015, Fig. 5 right (torchvision's Bottleneck): relu(shortcut(x) + bn3(conv3(relu(bn2(conv2(...)))))),
    1x1 reduce, 3x3 (with the stride), 1x1 expand by 4."""
    expansion = 4

    def __init__(self, cin: int, mid: int, stride: int, death_rate: float,
                 dropout: dict[str, nn.Module] | None = None):
        super().__init__()
        cout = mid * self.expansion
        self.branch = nn.Sequential(OrderedDict(
            conv1=nn.Conv2d(cin, mid, 1, bias=False), bn1=nn.BatchNorm2d(mid), relu1=nn.ReLU(inplace=True),
            conv2=conv3x3(mid, mid, stride), bn2=nn.BatchNorm2d(mid), relu2=nn.ReLU(inplace=True), **(dropout or {}),
            conv3=nn.Conv2d(mid, cout, 1, bias=False), bn3=nn.BatchNorm2d(cout)))
        self.shortcut = make_shortcut("B", cin, cout, stride)
        self.death_rate = death_rate

    forward = PostActBlock.forward

    def zero_init(self) -> None:
        nn.init.zeros_(self.branch.bn3.weight)


class PreActBottleneck(nn.Module):
    """He 2016: shortcut + conv3(relu(bn3(conv2(relu(bn2(conv1(relu(bn1(x))))))))), split as PreActBlock."""
    expansion = 4

    def __init__(self, cin: int, mid: int, stride: int, death_rate: float, split_after_preact: bool,
                 dropout: dict[str, nn.Module] | None = None):
        super().__init__()
        cout = mid * self.expansion
        self.bn1 = nn.BatchNorm2d(cin)
        self.branch = nn.Sequential(OrderedDict(
            conv1=nn.Conv2d(cin, mid, 1, bias=False), bn2=nn.BatchNorm2d(mid), relu2=nn.ReLU(inplace=True),
            conv2=conv3x3(mid, mid, stride), bn3=nn.BatchNorm2d(mid), relu3=nn.ReLU(inplace=True), **(dropout or {}),
            conv3=nn.Conv2d(mid, cout, 1, bias=False)))
        self.shortcut = make_shortcut("B", cin, cout, stride)
        self.death_rate = death_rate
        self.split_after_preact = split_after_preact or self.shortcut is not None

    forward = PreActBlock.forward

    def zero_init(self) -> None:
        nn.init.zeros_(self.branch.conv3.weight)


def death_rates(num_blocks: int, p_last: float, mode: str) -> list[float]:
    """Per-block death rates p_l, l = 1..L (Huang 2016, eq. 4 for linear decay)."""
    if mode == "uniform":
        return [p_last] * num_blocks
    return [p_last * (i + 1) / num_blocks for i in range(num_blocks)]


class ResNet(nn.Module):
    """What both families share: a stem, residual blocks, the last BN-ReLU of pre-activation nets, a global average
    pool and the classifier; stochastic depth's draws. Each family makes its stem and blocks, then calls this."""

    def __init__(self, stem: nn.Module, blocks: list[nn.Module], *, pre: bool, channels: int, num_classes: int):
        super().__init__()
        self.pre = pre
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.head_bn = nn.BatchNorm2d(channels) if pre else None
        self.fc = nn.Linear(channels, num_classes)  # made last: its default init draws after every conv's
        self.death_rates = [blk.death_rate for blk in blocks]
        # Stochastic-depth draws: a CPU generator, so deciding costs no device sync; seeded the same on every rank
        # per step (fastres.techniques.StochasticDepthDraws), all ranks drop the same blocks.
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


class ResNetCifar(ResNet):
    """He 2015, sec. 4.2: a 3x3 stem, 3 stages of n = (depth - 2) / 6 basic blocks at 16/32/64 channels."""

    def __init__(self, depth: int = 20, block: str = "post", shortcut: str = "A",
                 stochastic_depth: float = 0.0, sd_mode: str = "linear", num_classes: int = 10,
                 dropout: float = 0.0, dropout_kind: str = "standard"):
        n, pre = (depth - 2) // 6, block == "pre"
        stem = nn.Sequential(OrderedDict(conv=conv3x3(3, WIDTHS[0])))
        if not pre:
            stem.add_module("bn", nn.BatchNorm2d(WIDTHS[0]))
            stem.add_module("relu", nn.ReLU(inplace=True))
        rates = death_rates(3 * n, stochastic_depth, sd_mode)
        blocks, cin = [], WIDTHS[0]
        for stage, cout in enumerate(WIDTHS):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                p = rates[len(blocks)]
                drop = make_dropout(dropout, dropout_kind)
                if pre:
                    blocks.append(PreActBlock(cin, cout, stride, shortcut, p, split_after_preact=not blocks,
                                              dropout=drop))
                else:
                    blocks.append(PostActBlock(cin, cout, stride, shortcut, p, dropout=drop))
                cin = cout
        super().__init__(stem, blocks, pre=pre, channels=cin, num_classes=num_classes)


# blocks per stage and whether they are bottlenecks (He 2015, Table 1)
IMAGENET_STAGES = {18: ((2, 2, 2, 2), False), 34: ((3, 4, 6, 3), False), 50: ((3, 4, 6, 3), True),
                   101: ((3, 4, 23, 3), True), 152: ((3, 8, 36, 3), True)}


class ResNetImageNet(ResNet):
    """torchvision's ResNet layout (7x7 stride-2 stem and max-pool, 4 stages) with the blocks above."""

    def __init__(self, depth: int = 50, block: str = "post", stochastic_depth: float = 0.0, sd_mode: str = "linear",
                 num_classes: int = 1000, dropout: float = 0.0, dropout_kind: str = "standard", width: int = 64):
        counts, bottleneck = IMAGENET_STAGES[depth]
        pre = block == "pre"
        stem = nn.Sequential(OrderedDict(  # conv-BN-ReLU-pool in both: the block kind starts after the pool
            conv=nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False), bn=nn.BatchNorm2d(width),
            relu=nn.ReLU(inplace=True), pool=nn.MaxPool2d(3, stride=2, padding=1)))
        rates = death_rates(sum(counts), stochastic_depth, sd_mode)
        blocks, cin = [], width
        for stage, n in enumerate(counts):
            mid = width * 2 ** stage
            for i in range(n):
                stride, p = (2 if stage > 0 and i == 0 else 1), rates[len(blocks)]
                drop = make_dropout(dropout, dropout_kind)
                if bottleneck:
                    blk = (PreActBottleneck(cin, mid, stride, p, split_after_preact=not blocks, dropout=drop)
                           if pre else PostActBottleneck(cin, mid, stride, p, dropout=drop))
                else:
                    blk = (PreActBlock(cin, mid, stride, "B", p, split_after_preact=not blocks, dropout=drop)
                           if pre else PostActBlock(cin, mid, stride, "B", p, dropout=drop))
                blocks.append(blk)
                cin = mid * (4 if bottleneck else 1)
        super().__init__(stem, blocks, pre=pre, channels=cin, num_classes=num_classes)
        self.tv_names = _torchvision_names(self, counts)
        self.register_state_dict_post_hook(_keys_to_torchvision)
        self.register_load_state_dict_pre_hook(_keys_from_torchvision)


# The ImageNet family's state dict carries torchvision's keys (conv1, bn1, layerS.I.convK / bnK, downsample.0/1, fc),
# so a file saved from torchvision.models.resnet50() loads as it is, and ours load into torchvision. The modules
# keep fastres's layout (stem, blocks, each block's branch and shortcut), which stochastic depth and the
# pre-activation blocks need; the two hooks below rename at the boundary. Pre-activation nets, which torchvision
# lacks, are named in the same pattern (their final BN stays head_bn).

def _torchvision_names(model: ResNet, counts: tuple[int, ...]) -> dict[str, str]:
    """Each module's name in fastres's layout -> its name in torchvision's."""
    names = {"stem.conv": "conv1", "stem.bn": "bn1", "fc": "fc", "head_bn": "head_bn"}
    places = [(s, i) for s, n in enumerate(counts) for i in range(n)]
    for k, blk in enumerate(model.blocks):
        layer = f"layer{places[k][0] + 1}.{places[k][1]}"
        for name, _ in blk.named_modules():
            if name:  # branch.conv1 -> conv1, shortcut.conv -> downsample.0, a pre-act block's bn1 -> bn1
                part = name.removeprefix("branch.").replace("shortcut.conv", "downsample.0").replace(
                    "shortcut.bn", "downsample.1")
                names[f"blocks.{k}.{name}"] = f"{layer}.{part}"
    return names


def _rename(state_dict: dict, prefix: str, names: dict[str, str]) -> None:
    """Rename ``state_dict``'s keys under ``prefix`` by module (``names``), in place, keeping their order."""
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        if key.startswith(prefix):
            module, _, leaf = key[len(prefix):].rpartition(".")
            key = prefix + f"{names.get(module, module)}.{leaf}"
        state_dict[key] = value


def _keys_to_torchvision(model: ResNetImageNet, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    _rename(state_dict, prefix, model.tv_names)


def _keys_from_torchvision(model: ResNetImageNet, state_dict: dict, prefix: str, *args) -> None:
    # fastres's own names (a checkpoint written before the renaming) pass through: they are in no torchvision name
    _rename(state_dict, prefix, {tv: ours for ours, tv in model.tv_names.items()})


def build_model(cfg: ModelCfg) -> ResNet:
    """The network ``cfg`` describes, initialized with the global torch RNG (seed it first).

    With ``init = "lsuv"`` the weights are orthonormal; :func:`lsuv_` then scales them on data. num_classes = 0 (the
    data's, which fastres.build puts in) is the family's own data set's here: CIFAR-10's 10, ImageNet's 1000.
    """
    if cfg.family == "imagenet":
        model = ResNetImageNet(cfg.depth, cfg.block, cfg.stochastic_depth, cfg.sd_mode, cfg.num_classes or 1000,
                               cfg.dropout, cfg.dropout_kind, cfg.width)
    else:
        model = ResNetCifar(cfg.depth, cfg.block, cfg.shortcut, cfg.stochastic_depth, cfg.sd_mode,
                            cfg.num_classes or 10, cfg.dropout, cfg.dropout_kind)
    if cfg.init == "lsuv":  # orthonormal now; the data-driven scaling needs batches: init.lsuv_ (train.py)
        orthonormal_init(model)
    else:
        kaiming_init(model)
    if cfg.zero_init_residual:  # Goyal et al. 2017, sec. 5.1: each block starts as the identity
        for blk in model.blocks:
            blk.zero_init()
    if cfg.blurpool:
        blurpool_(model)
    return model


# ----------------------------------------------------------------------------------------------------
# BlurPool (Zhang 2019, "Making Convolutional Networks Shift-Invariant Again"; FFCV's and Composer's ImageNet
# recipes): low-pass filter an input before subsampling it. model.blurpool = true puts it in every strided
# convolution with at least BLUR_MIN_CHANNELS inputs (the 3-channel stem conv excepted, as FFCV and Composer do) and
# every max-pool. The parameters and their names stay the plain model's (torchvision's weights still load).

BLUR_SIZE = 3  # the binomial filter [1, 2, 1] (x) [1, 2, 1] / 16: FFCV's and Composer's
BLUR_MIN_CHANNELS = 16


class BlurPool2d(nn.Module):
    """antialiased-cnns' BlurPool (Zhang 2019): reflect-pad, then the depthwise binomial filter at ``stride``."""

    def __init__(self, channels: int, stride: int = 2, size: int = BLUR_SIZE):
        super().__init__()
        row = torch.tensor([math.comb(size - 1, k) for k in range(size)], dtype=torch.float32)
        filt = row[:, None] * row[None, :]
        self.register_buffer("filt", (filt / filt.sum()).expand(channels, 1, size, size).clone(), persistent=False)
        self.stride, self.pads = stride, [(size - 1) // 2, size // 2] * 2  # left, right, top, bottom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, self.pads, mode="reflect"), self.filt.to(x.dtype), stride=self.stride,
                        groups=x.shape[1])


class BlurConv2d(nn.Conv2d):
    """A strided convolution whose input is blurred first (BlurPool at stride 1; FFCV's BlurPoolConv2d, Composer's
    BlurConv2d with blur_first), with the plain convolution's parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.blur(x))


def blurpool_(model: nn.Module) -> None:
    """Put BlurPool in ``model`` in place (see above): a strided convolution becomes a :class:`BlurConv2d` holding the
    same parameters, a max-pool a max-pool at stride 1 followed by BlurPool at its stride (Composer's
    MaxBlurPool2d)."""
    for parent in list(model.modules()):
        for name, m in list(parent.named_children()):
            if isinstance(m, nn.Conv2d) and max(m.stride) > 1 and m.in_channels >= BLUR_MIN_CHANNELS:
                conv = torch.nn.utils.skip_init(BlurConv2d, m.in_channels, m.out_channels, m.kernel_size, m.stride,
                                                m.padding, m.dilation, m.groups, m.bias is not None,
                                                device=m.weight.device)
                conv.weight, conv.bias, conv.blur = m.weight, m.bias, BlurPool2d(m.in_channels, stride=1)
                setattr(parent, name, conv)
            elif isinstance(m, nn.MaxPool2d):  # the ImageNet stem's: its channels are those of the BN before it
                before = list(parent.children())[:list(parent.children()).index(m)]
                channels = next(c.num_features for c in reversed(before) if isinstance(c, nn.BatchNorm2d))
                setattr(parent, name, nn.Sequential(nn.MaxPool2d(m.kernel_size, 1, m.padding),
                                                    BlurPool2d(channels, stride=m.stride)))


def load_weights(model: ResNet, path: str) -> list[str]:
    """Load the state dict in ``path`` into ``model``: torchvision's keys or fastres's, or a fastres checkpoint's
    model part. A classifier of another shape (another class count) is left at its init. Notes for the log; a
    UserError naming the file and what does not fit."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"model.weights = {path}: no such file: give a file saved with "
                        "torch.save(model.state_dict(), PATH)") from None
    except Exception as e:  # not a torch file, truncated, pickled code that weights_only refuses
        raise UserError(f"model.weights = {path} cannot be read ({one_line(e, 120)}): give a file saved with "
                        "torch.save(model.state_dict(), PATH)") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a fastres checkpoint.pt
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"model.weights = {path} holds no state dict (a dict of tensors by name)")
    notes, own = [], model.state_dict()
    if "fc.weight" in state and state["fc.weight"].shape != own["fc.weight"].shape:  # another class count
        notes.append(f"model.weights: the file's classifier has {state['fc.weight'].shape[0]} classes and the "
                     f"model's {own['fc.weight'].shape[0]}: the classifier starts from its own init")
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    dropped = [k for k in own if k.startswith("fc.") and k not in state]
    missing, unexpected = (sorted(set(own) - set(state) - set(dropped)), sorted(set(state) - set(own)))
    if missing or unexpected:
        raise UserError(f"model.weights = {path} does not fit the model ({len(missing)} of its keys missing"
                        + (f", e.g. {missing[0]}" if missing else "") + f"; {len(unexpected)} unexpected"
                        + (f", e.g. {unexpected[0]}" if unexpected else "") + "): check model.family, depth and block")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of another shape
        raise UserError(f"model.weights = {path} does not fit the model ({one_line(e, 160)}): check model.width "
                        "and depth") from None
    return notes + [f"model.weights: started from {path} ({len(state)} tensors)"]


def count_params(model: nn.Module) -> int:
    """Trainable parameters only: BN running statistics are buffers and do not count."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------------
# Weight initialization: He (the baseline) and LSUV.
#
# - kaiming: He et al. 2015 (the ResNet paper's [13]): conv weights ~ N(0, 2 / (k*k*c_out)), as
#   fb.resnet.torch does; BN at identity (weight 1, bias 0); the fc layer keeps PyTorch's default.
# - lsuv: "All you need is a good init" (Mishkin & Matas 2016, Algorithm 1): orthonormal weights (Saxe et al.
#   2014), then, layer by layer in forward order (the order a forward pass runs them, not the order they are
#   registered in), divide the weights by the standard deviation of the layer's output on a mini-batch until
#   its variance is within ``tol_var`` of 1 or ``t_max`` tries are spent, a fresh mini-batch each try.
#   BatchNorm normalizes with batch statistics meanwhile, as in training; its running averages are put back
#   afterwards. A layer whose output is all zeros (a zero-initialized residual branch) is left as it is.

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
