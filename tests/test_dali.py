"""The DALI loader on the CPU (device_id=None): the same images, shards and batches as the gpu loader."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from fastres.config import DataCfg
from fastres.data import cifar
from fastres.data.base import Split, normalize
from fastres.data.draws import PAD, aug_params, steps_per_epoch
from fastres.data.loaders import build_loader
from fastres.errors import UserError

from conftest import ROOT, run_cli

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
from fastres.data import dali as dali_mod  # noqa: E402

CPU = torch.device("cpu")


def indexed_split(n: int = 300, seed: int = 0) -> Split:
    """Random images whose label is their own index, so every output names its source image."""
    x = np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    return Split(x, np.arange(n, dtype=np.int64))


def dali(split, source="host", flip="random", **kw):
    args = dict(batch_per_rank=32, seed=5, rank=0, world=1, device=CPU)
    args.update(kw)
    return build_loader(DataCfg(loader="dali", dali_source=source, num_workers=2, flip=flip), split, **args)


def epoch(loader, e):
    loader.set_epoch(e)
    return [(x.clone(), y.clone()) for x, y in loader]


@pytest.mark.parametrize("source", ["host", "device"])
def test_unaugmented_outputs_are_the_source_images(monkeypatch, source):
    split = indexed_split()
    def center(n, seed, e, flip):
        return (torch.full((n,), PAD), torch.full((n,), PAD), torch.zeros(n, dtype=torch.int64))
    monkeypatch.setattr(dali_mod, "aug_params", center)
    for x, y in epoch(dali(split, source), 0):
        ref = normalize(torch.from_numpy(split.x[y.numpy()]), cifar.MEAN, cifar.STD)
        torch.testing.assert_close(x, ref, rtol=0, atol=1e-5)  # labels stay with their images


def _find_aug(out: np.ndarray, img: np.ndarray) -> tuple[int, int, int] | None:
    padded = np.pad(img, ((0, 0), (PAD, PAD), (PAD, PAD)))
    for dy in range(2 * PAD + 1):
        for dx in range(2 * PAD + 1):
            crop = padded[:, dy:dy + 32, dx:dx + 32]
            for flip, cand in ((0, crop), (1, crop[:, :, ::-1])):
                if np.abs(cand - out).max() < 0.5:
                    return dy, dx, flip
    return None


def test_crop_offsets_and_flips_are_the_drawn_ones_and_in_range():
    split = indexed_split(640)
    loader = dali(split)
    dy, dx, flip = aug_params(len(split), 5, 3)
    found = []
    for x, y in epoch(loader, 3):
        # undo the normalize to get uint8 pixels back
        mean = torch.tensor(cifar.MEAN).view(3, 1, 1) * 255
        std = torch.tensor(cifar.STD).view(3, 1, 1) * 255
        pix = (x * std + mean).round().numpy()
        for j in range(0, len(y), 4):
            i = int(y[j])
            aug = _find_aug(pix[j], split.x[i].astype(np.float32))
            assert aug == (dy[i].item(), dx[i].item(), flip[i].item())
            assert 0 <= aug[0] <= 2 * PAD and 0 <= aug[1] <= 2 * PAD
            found.append(aug[2])
    assert 0.35 < np.mean(found) < 0.65  # 160 draws of a fair coin


@pytest.mark.parametrize("flip", ["random", "alternate"])
def test_same_batches_as_the_gpu_loader(small_cifar, flip):
    split = cifar.read_cifar10(small_cifar).train
    gpu = build_loader(DataCfg(loader="gpu", flip=flip), split, batch_per_rank=32, seed=5, rank=1, world=2,
                       device=CPU)
    for source in ("host", "device"):
        d = dali(split, source, flip, rank=1, world=2)
        for e in (0, 1, 2):
            a, b = epoch(gpu, e), epoch(d, e)
            assert len(a) == len(b) == steps_per_epoch(len(split), 32, 2)
            for (xa, ya), (xb, yb) in zip(a, b):
                assert torch.equal(ya, yb)
                torch.testing.assert_close(xa, xb, rtol=0, atol=1e-5)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n", [300, 301])
def test_shards_disjoint_complete_and_even(world, n):
    split = indexed_split(n)
    for e in (0, 1):
        per_rank = [epoch(dali(split, rank=r, world=world, batch_per_rank=16), e) for r in range(world)]
        assert len({len(batches) for batches in per_rank}) == 1  # the same number of batches everywhere
        assert len(per_rank[0]) == steps_per_epoch(n, 16, world)
        seen = torch.cat([y for batches in per_rank for _, y in batches]).tolist()
        assert all(len(y) == 16 for batches in per_rank for _, y in batches)  # full batches only
        assert len(seen) == len(set(seen))  # disjoint: no image twice in an epoch
        # complete: every image an epoch can hold (n // world per rank, in full batches) is there
        assert len(seen) == world * ((n // world) // 16) * 16


def test_epochs_differ_and_resume_jumps_to_the_right_epoch():
    split = indexed_split()
    loader = dali(split)
    e0, e1 = epoch(loader, 0), epoch(loader, 1)
    assert not torch.equal(e0[0][1], e1[0][1])
    fresh = dali(split)
    jumped = epoch(fresh, 1)  # a resumed run starts at epoch 1
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[0], b[0]) for a, b in zip(e1, jumped))
    # an epoch read only in part, then read again from the start, gives that epoch again
    fresh.set_epoch(2)
    it = iter(fresh)
    next(it)
    del it
    again = epoch(fresh, 2)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(epoch(dali(split), 2), again))


def test_output_dtype_and_layout():
    split = indexed_split()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x, y = next(iter(dali(split, dtype=dtype, channels_last=True)))
        assert x.dtype == dtype and x.shape == (32, 3, 32, 32) and y.dtype == torch.int64
        assert x.is_contiguous(memory_format=torch.channels_last)
    x, _ = next(iter(dali(split)))
    assert x.is_contiguous()


def test_missing_dali_is_one_line_with_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(UserError) as e:
        dali_mod.import_dali()
    assert "pip install nvidia-dali-cuda130" in str(e.value) and "\n" not in str(e.value)


def test_nothing_imports_dali_unless_chosen(small_cifar):
    code = (
        "import sys, torch\n"
        "import fastres.train, fastres.tools.bench\n"
        "from fastres.config import DataCfg\n"
        "from fastres.data.base import Split\n"
        "from fastres.data.loaders import build_loader\n"
        "import numpy as np\n"
        "s = Split(np.zeros((64, 3, 32, 32), np.uint8), np.zeros(64, np.int64))\n"
        "for kind in ('gpu', 'workers'):\n"
        "    list(build_loader(DataCfg(loader=kind, num_workers=0), s, batch_per_rank=32, seed=0, rank=0,\n"
        "                      world=1, device=torch.device('cpu')))\n"
        "assert not any(m.startswith('nvidia.dali') for m in sys.modules), 'DALI was imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_cli_smoke_run_with_dali(cifar_dir, tmp_path):
    out = tmp_path / "dali"
    r = run_cli(["--config", "configs/smoke.toml", f"--data.dir={cifar_dir}", f"--run.out_dir={out}",
                 "--data.loader=dali", "--data.num_workers=2", "--data.subset=800", "--data.val_size=100",
                 "--data.test_subset=200", "--run.epochs=1", "--model.depth=8"])
    assert r.returncode == 0, r.stderr
    assert (out / "summary.json").exists() and "fastres: done" in r.stderr
