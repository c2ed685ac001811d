"""What only a CUDA GPU can check (skipped elsewhere): the fast path's claims about the device.

Run these first on a GPU machine (`bash launch/device.sh next` runs them as its first item): they take about a
minute and catch a broken fast path before the benchmarks spend GPU time on it.
"""

from __future__ import annotations

import pytest
import torch

from fastres import checkpoint, config, step, train
from fastres.config import DataCfg
from fastres.data import cifar
from fastres.data.loaders import build_loader
from fastres.model import build_model
from fastres.optim import build_optimizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def tiny(small_cifar, out, *overrides: str) -> config.Config:
    return config.load(None, [f"--data.dir={small_cifar}", f"--run.out_dir={out}", "--run.device=cuda",
                              "--model.depth=8", "--optim.batch_size=50", "--run.epochs=2", "--data.loader=gpu",
                              "--data.val_size=50", "--data.test_subset=100", *overrides])


def epoch(loader, e: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(e)
    return [(x.cpu(), y.cpu()) for x, y in loader]


def test_gpu_loader_on_cuda_gives_the_cpu_batches(small_cifar):
    """The same crops, flips and order on the GPU as the CPU tests check image by image."""
    split = cifar.read_cifar10(small_cifar).train
    on = {d: build_loader(DataCfg(loader="gpu"), split, batch_per_rank=32, seed=5, rank=1, world=2, device=d)
          for d in (CPU, CUDA)}
    for e in (0, 3):
        a, b = epoch(on[CPU], e), epoch(on[CUDA], e)
        assert len(a) == len(b) > 0
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(ya, yb)
            torch.testing.assert_close(xa, xb, rtol=0, atol=1e-6)


FAST = ["--data.loader=gpu", "--precision.amp=bf16", "--precision.channels_last=true", "--optim.impl=fused",
        "--optim.warmup_epochs=1", "--optim.schedule=cosine"]


@pytest.mark.parametrize("extra", [
    [],
    ["--model.stochastic_depth=0.5", "--model.sd_mode=linear"],
    ["--precision.compile=true"],
    ["--precision.compile=true", "--precision.compile_mode=reduce-overhead"],
    ["--precision.compile=true", "--model.stochastic_depth=0.5"],
    ["--precision.step_graph=true", "--model.dropout=0.1"],
    ["--precision.compile=true", "--precision.step_graph=true"],
    ["--precision.compile=true", "--precision.compile_mode=reduce-overhead", "--optim.ema_decay=0.99"],
    ["--precision.step_graph=true", "--optim.ema_decay=0.99"],
], ids=["eager", "eager-sd", "compile", "cuda-graphs", "compile-sd", "step-graph", "compile-step-graph",
        "cuda-graphs-ema", "step-graph-ema"])
def test_fast_loop_never_waits_for_the_gpu(small_cifar, tmp_path, extra):
    """run.sync_debug turns any host-device synchronization inside the timed loop into an error."""
    s = train.main(tiny(small_cifar, tmp_path / "run", *FAST, *extra, "--run.sync_debug=true"))
    assert s["finished"] and s["steps"] == 2 * (450 // 50) and s["device"].startswith("cuda")
    state = checkpoint.load(tmp_path / "run" / checkpoint.NAME)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_sync_debug_catches_a_sync(small_cifar, tmp_path, monkeypatch):
    """The check can fail: fp16's GradScaler reads found_inf on the host every step."""
    with pytest.raises(RuntimeError, match="synchroniz"):
        train.main(tiny(small_cifar, tmp_path / "run", "--precision.amp=fp16", "--run.sync_debug=true"))
    assert torch.cuda.get_sync_debug_mode() == 0  # put back after the error


@pytest.mark.parametrize("extra", [["--precision.compile=true"],
                                   ["--precision.compile=true", "--precision.compile_mode=reduce-overhead"],
                                   ["--precision.step_graph=true"],
                                   ["--precision.compile=true", "--precision.step_graph=true"]],
                         ids=["compile", "cuda-graphs", "step-graph", "compile-step-graph"])
def test_compiled_training_matches_eager_on_the_gpu(small_cifar, tmp_path, extra):
    base = ["--run.epochs=1", "--optim.impl=fused"]
    train.main(tiny(small_cifar, tmp_path / "eager", *base))
    train.main(tiny(small_cifar, tmp_path / "compiled", *base, *extra))
    a = checkpoint.load(tmp_path / "eager" / checkpoint.NAME)["model"]
    b = checkpoint.load(tmp_path / "compiled" / checkpoint.NAME)["model"]
    for k in a:  # TF32 / kernel choice differ between eager and Inductor: close, not equal
        torch.testing.assert_close(a[k], b[k], rtol=2e-2, atol=2e-3, msg=k)


@pytest.mark.parametrize("source", ["host", "device"])
def test_dali_on_the_gpu_gives_the_gpu_loaders_batches(small_cifar, source):
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
    split = cifar.read_cifar10(small_cifar).train
    args = dict(batch_per_rank=32, seed=5, rank=1, world=2, device=CUDA)
    gpu = build_loader(DataCfg(loader="gpu"), split, **args)
    dali = build_loader(DataCfg(loader="dali", dali_source=source, num_workers=2), split, **args)
    for e in (0, 1):
        a, b = epoch(gpu, e), epoch(dali, e)
        assert len(a) == len(b) > 0
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(ya, yb)
            torch.testing.assert_close(xa, xb, rtol=0, atol=1e-5)


@pytest.mark.parametrize("side", [32, 56], ids=["32px", "56px"])
def test_step_graph_captures_undoes_its_warm_up_and_replays_the_eager_step(side):
    """The whole step as one CUDA graph, its buffers shaped like the example batch (CIFAR's 32 pixels or another
    side): after capture the model is as it was, and replays with a new lr each step give what eager steps give
    (float32 lr on the device against a Python float: close)."""
    cfg = config.load(None, ["--model.depth=8", "--optim.impl=fused", "--optim.nesterov=true"])
    models, opts = [], []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(build_model(cfg.model).to(CUDA))
        opts.append(build_optimizer(models[-1], cfg.optim))
    (m_eager, m_graph), (o_eager, o_graph) = models, opts
    before = {k: v.clone() for k, v in m_graph.state_dict().items()}
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    example = step.random_batch(16, (3, side, side), 10, step.precision(cfg.precision), CUDA)
    g = step.CapturedStep(lambda x, y: step.train_on_batch(m_graph, o_graph, scaler, x, y), m_graph, o_graph,
                          example=example)
    assert g.graph is not None
    for k, v in m_graph.state_dict().items():
        assert torch.equal(before[k], v), k
    gen = torch.Generator(device=CUDA).manual_seed(1)
    for i, lr in enumerate([0.1, 0.05, 0.2, 0.01, 0.1]):
        x = torch.randn(16, 3, side, side, device=CUDA, generator=gen)
        y = torch.randint(0, 10, (16,), device=CUDA, generator=gen)
        for group in o_eager.param_groups:
            group["lr"] = lr
        loss_e, _ = step.train_on_batch(m_eager, o_eager, scaler, x, y)
        loss_g, _ = g(x, y, lr)
        torch.testing.assert_close(loss_g, loss_e, rtol=1e-3, atol=1e-4, msg=f"step {i}")
    a, b = m_eager.state_dict(), m_graph.state_dict()
    for k in a:
        torch.testing.assert_close(b[k].float(), a[k].float(), rtol=1e-3, atol=1e-4, msg=k)


def test_step_graph_replays_the_weight_average_as_the_eager_step_makes_it(small_cifar, tmp_path):
    """optim.ema_decay inside the captured step: its capture warm-up is undone, and each replay averages
    with that step's decay (the weight the host fills before the replay)."""
    base = ["--run.epochs=1", "--optim.impl=fused", "--optim.ema_decay=0.9"]
    train.main(tiny(small_cifar, tmp_path / "eager", *base))
    train.main(tiny(small_cifar, tmp_path / "graph", *base, "--precision.step_graph=true"))
    a, b = (checkpoint.load(tmp_path / r / checkpoint.NAME)["ema"] for r in ("eager", "graph"))
    assert a["updates"] == b["updates"] == 450 // 50
    for k in a["avg"]:
        torch.testing.assert_close(b["avg"][k], a["avg"][k], rtol=1e-3, atol=1e-4, msg=k)


def test_folder_gpu_loader_decodes_with_nvjpeg_and_agrees_with_pillow(tmp_path):
    """data.loader = gpu over a folder on CUDA: nvJPEG decodes the plain JPEGs on the device, the rest (PNG, CMYK)
    the host; the same order and labels as the workers loader, pixels within nvJPEG's IDCT and chroma upsampling
    differences of libjpeg-turbo's (the measured gap is printed). FIXME: the bound is provisional until a GPU run
    measures it."""
    pytest.importorskip("torchvision.io", reason="torchvision is not installed beside this torch")
    from test_folder import cfg_for, make_folder, pixels

    from fastres.data.folder import load_folder
    root = make_folder(tmp_path / "imgs")
    d = load_folder(cfg_for(root), tmp_path / "run")
    norm = (d.mean, d.std)
    a, b = (build_loader(cfg_for(root, kind), d.train, batch_per_rank=4, seed=3, rank=0, world=1, device=CUDA,
                         norm=norm) for kind in ("workers", "gpu"))
    worst = 0.0
    for e in range(3):
        for (xa, ya), (xb, yb) in zip(epoch(a, e), epoch(b, e)):
            assert torch.equal(ya, yb) and xb.shape == xa.shape
            worst = max(worst, (pixels(xa) - pixels(xb)).abs().max().item())
    print(f"workers vs gpu (nvJPEG): max |diff| {worst:.2f} levels")
    assert worst <= 16.0
