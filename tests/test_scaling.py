from __future__ import annotations

import pytest

from fastres import config
from fastres.model import build_model, count_params
from fastres.tools import scaling


def test_ring_allreduce_formula():
    assert scaling.ring_allreduce_s(1, 1e6, 1e-5, 1e9) == 0.0
    # 2 (N-1) latency steps, 2 (N-1)/N of the bytes through each link
    assert scaling.ring_allreduce_s(4, 8e6, 1e-5, 1e9) == pytest.approx(6e-5 + 1.5 * 8e6 / 1e9)
    assert scaling.ring_allreduce_s(8, 8e6, 0, 1e9) < 2 * 8e6 / 1e9  # bounded by 2 S / beta


def test_buckets_cover_every_gradient():
    model = build_model(config.ModelCfg())
    sizes = [4 * p.numel() for p in model.parameters()]
    b = scaling.buckets(sizes)
    assert sum(b) == 4 * count_params(model) and b[0] >= scaling.FIRST_BUCKET


def test_overlap_hides_early_buckets_but_not_the_last():
    buckets = [10_000_000, 10_000_000]
    alpha, beta = 0.0, 1e9
    total = sum(scaling.ring_allreduce_s(2, b, alpha, beta) for b in buckets)
    long = scaling.exposed_comm_s(2, t_comp=1.0, bucket_bytes=buckets, alpha=alpha, beta=beta)
    assert long == pytest.approx(scaling.ring_allreduce_s(2, buckets[1], alpha, beta))  # only the last is exposed
    short = scaling.exposed_comm_s(2, t_comp=1e-4, bucket_bytes=buckets, alpha=alpha, beta=beta)
    assert long < short <= total


def test_fit_recovers_the_formula():
    alpha, beta = 3e-5, 2e9
    measured = {(n, s): scaling.ring_allreduce_s(n, s, alpha, beta) for n in (2, 4) for s in (1e5, 1e6, 4e6)}
    a, b = scaling.fit_ring(measured)
    assert a == pytest.approx(alpha) and b == pytest.approx(beta)


@pytest.mark.slow
def test_scaling_report_on_cpu(tmp_path):
    cfg = config.load(None, ["--model.depth=8"])
    text = scaling.scaling_report(cfg, "baseline", steps=2, warmup=1, gloo_procs=[1, 2, 3])
    assert "Not produced: the compute term has to be measured on a GPU" in text
    assert "| 2 |" in text and "| 3 |" in text and "fitted alpha" in text


@pytest.fixture
def gpu_step_of_4ms(monkeypatch):
    """A GPU whose measured step takes 4 ms at every batch size (in place of the measurement)."""
    monkeypatch.setattr(scaling.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(scaling.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(scaling.torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(scaling.log, "device_name", lambda device: f"fake {device.type}")
    monkeypatch.setattr(scaling, "compute_step_s", lambda cfg, batch, device, steps, warmup: 4e-3)


def test_prediction_tables_from_a_measured_step(gpu_step_of_4ms):
    """The GPU tables, with the GPU measurement replaced by a step time that does not shrink with the batch
    (as the H100 showed for ResNet-20 at 128-512 images): splitting the batch cannot scale, keeping the
    per-GPU batch does, as far as the exposed all-reduce allows."""
    cfg = config.load(None, ["--optim.batch_size=512"])
    text = scaling.scaling_report(cfg, "fast", steps=2, warmup=1, gloo_procs=[1], flags=["--x=1"])
    assert "--config configs/fast.toml --x=1`" in text
    strong, weak = text.split("### Weak scaling")
    row4 = next(line for line in strong.splitlines() if line.startswith("| 4 | 128 |"))
    assert float(row4.split("|")[-2].strip(" %")) < 26  # 4 GPUs each taking as long as one
    weak4 = [line for line in weak.splitlines() if line.startswith("| 4 | 2048 |")]
    assert len(weak4) == 2
    for line in weak4:
        exposed_ms, eff = float(line.split("|")[5]), float(line.split("|")[7].strip(" %"))
        assert eff == pytest.approx(100 * 4 / (4 + exposed_ms), abs=0.06) and 90 < eff <= 100
    assert "Model output, not a multi-GPU measurement" in weak
    assert "Accuracy cost of the larger global batch: unmeasured" in weak


@pytest.mark.parametrize("step_graph", [False, True])
def test_a_step_graph_report_says_its_multi_gpu_rows_are_not_runnable(gpu_step_of_4ms, step_graph):
    cfg = config.load(None, ["--optim.batch_size=512", "--optim.impl=fused", f"--precision.step_graph={step_graph}"])
    text = scaling.scaling_report(cfg, "fast", steps=2, warmup=1, gloo_procs=[1])
    assert ("which is not built" in text) == step_graph
