from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastres import config
from fastres.config import ModelCfg
from fastres.model import PostActBlock, PreActBlock, build_model, count_params, death_rates

# He 2015, Table 6 (option A) and the 1x1-projection variant (option B) of ResNet-20.
PAPER_PARAMS = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962, 1202: 19_421_274}


@pytest.mark.parametrize("depth", sorted(PAPER_PARAMS))
def test_parameter_counts_equal_the_paper(depth):
    assert count_params(build_model(ModelCfg(depth=depth))) == PAPER_PARAMS[depth]


def test_option_b_and_preact_counts():
    assert count_params(build_model(ModelCfg(shortcut="B"))) == 272_474
    # pre-activation moves the BNs: the first block's BN1 stands in for the stem's, the shape-changing
    # blocks' BN1 see 16 and 32 channels (-96 vs post) and a final 64-channel BN is added (+128): 269,722
    assert count_params(build_model(ModelCfg(block="pre"))) == 269_722
    assert count_params(build_model(ModelCfg(block="pre", shortcut="B"))) == 272_474


def test_buffers_are_not_parameters():
    m = build_model(ModelCfg())
    n_buffers = sum(b.numel() for name, b in m.named_buffers() if "running" in name)
    assert n_buffers > 0
    assert count_params(m) == sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("block", ["post", "pre"])
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_shapes(block, shortcut):
    m = build_model(ModelCfg(depth=32, block=block, shortcut=shortcut))
    x = torch.randn(3, 3, 32, 32)
    assert m(x).shape == (3, 10)
    feats = []
    for blk in m.blocks:
        blk.register_forward_hook(lambda mod, i, o: feats.append(o.shape[1:]))
    m(x)
    assert feats[0] == (16, 32, 32) and feats[5] == (32, 16, 16) and feats[-1] == (64, 8, 8)
    assert sum(isinstance(b, PreActBlock if block == "pre" else PostActBlock) for b in m.blocks) == 15


# An independent, plain ResNet-20 (He 2015, option A, post-activation), written out the classic way.
class RefBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.pad = (cout - cin) // 2
        self.stride = stride

    def forward(self, x):
        out = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
        sc = x
        if self.stride != 1:
            sc = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + sc)


class RefResNet20(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.b = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        chans = [(16, 16, 1)] * 3 + [(16, 32, 2)] + [(32, 32, 1)] * 2 + [(32, 64, 2)] + [(64, 64, 1)] * 2
        self.blocks = nn.Sequential(*[RefBlock(*c) for c in chans])
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.blocks(F.relu(self.b(self.c(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.mark.parametrize("train", [True, False])
def test_every_flag_off_is_the_plain_resnet20(train):
    torch.manual_seed(0)
    ours = build_model(ModelCfg())
    ref = RefResNet20()
    ref.load_state_dict(dict(zip(ref.state_dict().keys(), ours.state_dict().values())))
    ours.train(train)
    ref.train(train)
    x = torch.randn(8, 3, 32, 32)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)


@pytest.mark.parametrize("block", ["post", "pre"])
def test_stochastic_depth_off_equals_the_baseline(block):
    for sd_mode in ("uniform", "linear"):
        torch.manual_seed(1)
        base = build_model(ModelCfg(block=block))
        torch.manual_seed(1)
        off = build_model(ModelCfg(block=block, stochastic_depth=0.0, sd_mode=sd_mode))
        x = torch.randn(4, 3, 32, 32)
        for train in (True, False):
            base.train(train)
            off.train(train)
            torch.testing.assert_close(base(x), off(x), rtol=0, atol=0)


def test_death_rates():
    assert death_rates(9, 0.5, "uniform") == [0.5] * 9
    lin = death_rates(9, 0.5, "linear")
    assert lin[-1] == 0.5 and lin[0] == pytest.approx(0.5 / 9)
    assert all(b > a for a, b in zip(lin, lin[1:]))


def test_stochastic_depth_drops_whole_branches_in_training_and_scales_in_eval():
    torch.manual_seed(0)
    m = build_model(ModelCfg(stochastic_depth=0.5, sd_mode="uniform"))
    calls = []
    for blk in m.blocks:
        blk.branch.register_forward_hook(lambda mod, i, o: calls.append(1))
    m.train()
    x = torch.randn(2, 3, 32, 32)
    runs = 200
    for _ in range(runs):
        m(x)
    rate = len(calls) / (runs * len(m.blocks))
    assert 0.45 < rate < 0.55  # survival probability 1 - 0.5
    # eval: every branch runs, scaled by its survival probability
    m.eval()
    calls.clear()
    out = m(x)
    assert len(calls) == len(m.blocks)
    blk = m.blocks[4]
    h = torch.randn(2, 32, 16, 16)
    expected = F.relu(h + 0.5 * blk.branch(h))
    torch.testing.assert_close(blk(h), expected)
    assert out.shape == (2, 10)


def test_dropped_block_is_its_shortcut():
    m = build_model(ModelCfg(stochastic_depth=0.5, shortcut="A"))
    blk = m.blocks[3]  # 16 -> 32 channels, stride 2
    h = torch.randn(2, 16, 32, 32).relu()
    out = blk(h, keep=False)
    assert out.shape == (2, 32, 16, 16)
    torch.testing.assert_close(out[:, 8:24], h[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


def test_stochastic_depth_draws_follow_the_generator_seed():
    m = build_model(ModelCfg(stochastic_depth=0.5))
    x = torch.randn(2, 3, 32, 32)
    m.sd_gen.manual_seed(5)
    a = m(x)
    m.sd_gen.manual_seed(5)
    b = m(x)
    torch.testing.assert_close(a, b)  # BN in train mode: same drops, same batch -> same output


@pytest.mark.parametrize("block", ["post", "pre"])
def test_zero_init_residual_makes_every_block_start_as_its_shortcut(block):
    m = build_model(ModelCfg(block=block, zero_init_residual=True))
    m.eval()
    x = torch.randn(2, 16, 32, 32).relu()
    blk = m.blocks[1]
    expected = F.relu(x) if block == "post" else x
    torch.testing.assert_close(blk(x), expected)


def test_channels_last_gives_the_same_output():
    torch.manual_seed(0)
    m = build_model(ModelCfg()).eval()
    x = torch.randn(4, 3, 32, 32)
    ref = m(x)
    m = m.to(memory_format=torch.channels_last)
    torch.testing.assert_close(m(x.to(memory_format=torch.channels_last)), ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------- BlurPool

class ReferenceBlurPool(nn.Module):
    """antialiased-cnns' BlurPool (Zhang 2019, antialiased_cnns/blurpool.py), as published: the reference."""

    def __init__(self, channels, pad_type="reflect", filt_size=4, stride=2, pad_off=0):
        super().__init__()
        self.filt_size, self.pad_off = filt_size, pad_off
        self.pad_sizes = [int(1. * (filt_size - 1) / 2), int(np.ceil(1. * (filt_size - 1) / 2)),
                          int(1. * (filt_size - 1) / 2), int(np.ceil(1. * (filt_size - 1) / 2))]
        self.pad_sizes = [pad_size + pad_off for pad_size in self.pad_sizes]
        self.stride, self.channels = stride, channels
        self.off = int((self.stride - 1) / 2.)
        a = {1: [1.], 2: [1., 1.], 3: [1., 2., 1.], 4: [1., 3., 3., 1.], 5: [1., 4., 6., 4., 1.]}[filt_size]
        a = np.array(a)
        filt = torch.Tensor(a[:, None] * a[None, :])
        filt = filt / torch.sum(filt)
        self.register_buffer("filt", filt[None, None, :, :].repeat((self.channels, 1, 1, 1)))
        self.pad = {"reflect": nn.ReflectionPad2d, "zero": nn.ZeroPad2d}[pad_type](self.pad_sizes)

    def forward(self, inp):
        if self.filt_size == 1:
            return inp[:, :, ::self.stride, ::self.stride] if self.pad_off == 0 else \
                self.pad(inp)[:, :, ::self.stride, ::self.stride]
        return F.conv2d(self.pad(inp), self.filt, stride=self.stride, groups=inp.shape[1])


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("side", [7, 8, 33])
def test_blurpool_is_antialiased_cnns_blurpool(stride, side):
    from fastres.model import BLUR_SIZE, BlurPool2d
    x = torch.randn(2, 5, side, side)
    torch.testing.assert_close(BlurPool2d(5, stride)(x), ReferenceBlurPool(5, filt_size=BLUR_SIZE, stride=stride)(x),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", [["--model.depth=20"], ["--model.family=imagenet", "--model.depth=50",
                                                            "--model.width=16", "--model.num_classes=10"]])
def test_blurpool_filters_before_every_strided_conv_and_max_pool_and_keeps_the_weights(family):
    """model.blurpool: the same parameters, names and init as without; each strided convolution (16 or more inputs)
    convolves antialiased-cnns' blur (stride 1) of its input, the max-pool is max at stride 1 then BlurPool at 2."""
    from fastres.model import BLUR_SIZE, BlurConv2d
    torch.manual_seed(0)
    plain = build_model(config.load(None, family).model)
    torch.manual_seed(0)
    blurred = build_model(config.load(None, [*family, "--model.blurpool=true"]).model)
    a, b = plain.state_dict(), blurred.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    convs = {n: m for n, m in blurred.named_modules() if isinstance(m, BlurConv2d)}
    strided = {n: m for n, m in plain.named_modules() if isinstance(m, nn.Conv2d) and max(m.stride) > 1
               and m.in_channels >= 16}
    assert convs and set(convs) == set(strided)
    for name, conv in convs.items():
        x = torch.randn(2, conv.in_channels, 16, 16)
        ref = F.conv2d(ReferenceBlurPool(conv.in_channels, filt_size=BLUR_SIZE, stride=1)(x), strided[name].weight,
                       stride=conv.stride, padding=conv.padding)
        torch.testing.assert_close(conv(x), ref, rtol=1e-5, atol=1e-5)
    if family[0].endswith("imagenet"):
        x = torch.randn(2, 16, 20, 20)
        ref = ReferenceBlurPool(16, filt_size=BLUR_SIZE, stride=2)(F.max_pool2d(x, 3, 1, 1))
        torch.testing.assert_close(blurred.stem.pool(x), ref, rtol=0, atol=1e-6)
    x = torch.randn(4, 3, 64, 64)
    assert blurred(x).shape == plain(x).shape and not torch.allclose(blurred(x), plain(x))
