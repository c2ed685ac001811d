"""The multi-GPU scaling model: ``python -m fastres.tools.bench scaling [--config configs/fast.toml] [...]``.

Data-parallel training of a global batch B on N GPUs takes, per step,

    t_step(N) = t_comp(B / N) + exposed all-reduce time

- t_comp(b): one GPU's forward + backward + optimizer step at per-GPU batch b, *measured* here (small
  per-GPU batches use a GPU less well, so t_comp(B / N) > t_comp(B) / N: the model keeps that cost).
- gradient bytes: every trainable parameter in fp32 (DDP reduces the parameters' dtype).
- ring all-reduce of S bytes over N GPUs: 2 (N - 1) steps of latency alpha, and 2 (N - 1) / N * S bytes
  through each link of bus bandwidth beta: t = 2 (N - 1) alpha + 2 (N - 1) / N * S / beta.
- overlap: DDP reduces gradients in buckets (the first 1 MiB, then 25 MiB, in reverse parameter order) as
  soon as a bucket's gradients exist; bucket k is ready when backward (2/3 of t_comp, its FLOP share) has
  produced its share of the gradient bytes, buckets are reduced one after another, and only what runs
  past the end of backward is exposed.
Epoch time = steps per epoch x t_step(N); efficiency = t_epoch(1) / (N t_epoch(N)).

A second table keeps the per-GPU batch at B instead (weak scaling: global batch N B, fewer steps per epoch,
t_step(N) = t_comp(B) + exposed all-reduce): where splitting a small batch over GPUs saves little compute
(results/scaling.md), only a larger global batch scales - which changes the recipe (linear LR scaling and
warmup, Goyal et al. 2017) and has to be re-validated for accuracy.

The communication term's shape is checked where it can run anywhere: gloo all-reduces among 1, 2, 4 CPU
processes at several message sizes, fitted jointly by the same formula (alpha, beta per machine); the
report prints measured against fitted times. NVLink and PCIe enter as (alpha, beta) parameters - the
defaults below are the bus bandwidths NCCL reaches on H100 SXM NVLink and on PCIe Gen5 x16 - and the
compute term only from a GPU measurement: without a GPU the prediction table is not produced.
"""

from __future__ import annotations

import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed
import torch.multiprocessing as mp

from fastres import config, distributed, log
from fastres.build import build
from fastres.config import Config
from fastres.data.cifar import train_size
from fastres.log import short_sha
from fastres.model import build_model, count_params
from fastres.step import Timer

LINKS = {"NVLink (H100 SXM)": (5e-6, 350e9), "PCIe Gen5 x16": (10e-6, 40e9)}  # (alpha s, beta bytes/s)
FIRST_BUCKET, BUCKET = 2**20, 25 * 2**20  # DDP's defaults
BACKWARD_SHARE = 2 / 3


def ring_allreduce_s(n: int, nbytes: float, alpha: float, beta: float) -> float:
    return 0.0 if n == 1 else 2 * (n - 1) * alpha + 2 * (n - 1) / n * nbytes / beta


def buckets(param_bytes: list[int]) -> list[int]:
    """DDP's gradient buckets, in the order they become ready (reverse parameter order)."""
    out, cur, cap = [], 0, FIRST_BUCKET
    for nbytes in reversed(param_bytes):
        cur += nbytes
        if cur >= cap:
            out.append(cur)
            cur, cap = 0, BUCKET
    if cur:
        out.append(cur)
    return out


def exposed_comm_s(n: int, t_comp: float, bucket_bytes: list[int], alpha: float, beta: float) -> float:
    """All-reduce time left after backward ends, with buckets reduced in order as they become ready."""
    t_bwd, total, done, end = BACKWARD_SHARE * t_comp, sum(bucket_bytes), 0, 0.0
    for nbytes in bucket_bytes:
        done += nbytes
        ready = t_bwd * done / total
        end = max(end, ready) + ring_allreduce_s(n, nbytes, alpha, beta)
    return max(0.0, end - t_bwd)


def compute_step_s(cfg: Config, batch_per_rank: int, device: torch.device, steps: int, warmup: int) -> float:
    """Measured seconds of one training step at ``batch_per_rank`` images a GPU, built as training builds it
    (fastres.build), on one fixed batch of synthetic images (step time does not depend on pixel values), one
    micro-batch a step."""
    one_step = config.with_values(cfg, {"optim.batch_size": batch_per_rank, "optim.accum_steps": 1,
                                        "data.source": "synthetic", "data.loader": "gpu", "data.subset": 0,
                                        "data.val_size": 0, "eval.on_test": True, "eval.precise_bn": False})
    p = build(one_step, distributed.single(device))
    x, y = next(iter(p.loader))
    lr = p.optimizer.param_groups[0]["lr"]
    timer = Timer(device)
    for i in range(warmup + steps):
        if i == warmup:
            timer.start()
        p.train_step(x, y, lr=lr, global_step=i)
    return timer.stop() / steps


# ------------------------------------------------------------------------------------------- gloo check

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank: int, world: int, port: int, sizes: list[int], repeats: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        times = []
        for nbytes in sizes:
            t = torch.ones(nbytes // 4)
            for _ in range(3):
                torch.distributed.all_reduce(t)
            each = []
            for _ in range(repeats):
                torch.distributed.barrier()  # start together: time the all-reduce, not the wait for a late rank
                start = time.perf_counter()
                torch.distributed.all_reduce(t)
                each.append(time.perf_counter() - start)
            times.append(statistics.median(each))  # a shared 2-core CPU preempts: the median resists it
        if rank == 0:
            Path(out).write_text(" ".join(map(repr, times)))
    finally:
        torch.distributed.destroy_process_group()


def gloo_allreduce_s(world: int, sizes: list[int], repeats: int = 50) -> list[float]:
    """Median measured seconds per all-reduce of each size among ``world`` local gloo processes."""
    if world == 1:
        return [0.0] * len(sizes)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "times")
        mp.start_processes(_gloo_worker, args=(world, _free_port(), sizes, repeats, out), nprocs=world,
                           start_method="spawn")
        return [float(v) for v in Path(out).read_text().split()]


def fit_ring(measured: dict[tuple[int, int], float]) -> tuple[float, float]:
    """Least-squares (alpha, beta) of the ring formula over measurements {(world, bytes): seconds}."""
    rows = [(2 * (n - 1), 2 * (n - 1) / n * s, t) for (n, s), t in measured.items() if n > 1]
    a = torch.tensor([[r[0], r[1]] for r in rows], dtype=torch.float64)
    b = torch.tensor([r[2] for r in rows], dtype=torch.float64)
    alpha, inv_beta = torch.linalg.lstsq(a, b).solution.tolist()
    return alpha, 1.0 / inv_beta if inv_beta > 0 else float("inf")


# ------------------------------------------------------------------------------------------- report

def scaling_report(cfg: Config, name: str, *, steps: int, warmup: int, gloo_procs: list[int],
                   flags: list[str] = ()) -> str:
    model = build_model(cfg.model)
    grad_bytes = 4 * count_params(model)
    bucket_bytes = buckets([4 * p.numel() for p in model.parameters() if p.requires_grad])
    device = distributed.measurement_device(cfg.run)
    B = cfg.optim.batch_size
    lines = [f"# Scaling model: {name} (ResNet-{cfg.model.depth}, global batch {B}, amp {cfg.precision.amp})", "",
             f"Produced by `python -m fastres.tools.bench --what scaling --config configs/{name}.toml"
             f"{''.join(' ' + f for f in flags)}` at "
             f"{short_sha(log.git_sha())} (torch {torch.__version__}). The model is described in "
             "fastres/tools/scaling.py.", "",
             f"- gradient bytes per step: {grad_bytes:,} ({count_params(model):,} fp32 parameters) in "
             f"{len(bucket_bytes)} DDP bucket(s) of {', '.join(f'{b:,}' for b in bucket_bytes)} bytes",
             "- link parameters (alpha latency per ring step, beta bus bandwidth): " + "; ".join(
                 f"{k}: {a * 1e6:.0f} us, {b / 1e9:.0f} GB/s" for k, (a, b) in LINKS.items()), ""]

    lines += ["## Predicted epoch time and efficiency", ""]
    if device.type != "cuda":
        lines += [f"Not produced: the compute term has to be measured on a GPU and this run had none "
                  f"({log.device_name(device)}). Run this command on a GPU machine.", ""]
    else:
        images = train_size(val_size=cfg.data.val_size, subset=cfg.data.subset)
        steps_per_epoch = images // B
        t1 = compute_step_s(cfg, B, device, steps, warmup)
        lines += [f"Compute measured on {log.device_name(device)}; {steps_per_epoch} steps per epoch.", ""]
        if cfg.precision.step_graph:
            lines += ["The step is measured as one CUDA graph (precision.step_graph). fastres runs that on one rank "
                      "only (config.validate refuses more): the rows for N > 1 model a graph that would also hold "
                      "DDP's all-reduce, which is not built.", ""]
        lines += ["| GPUs | per-GPU batch | t_comp (ms) | link | all-reduce (ms) | exposed (ms) | epoch (s) | "
                  "efficiency |", "|---|---|---|---|---|---|---|---|"]
        for n in (1, 2, 4, 8):
            if B % n:
                continue
            tc = t1 if n == 1 else compute_step_s(cfg, B // n, device, steps, warmup)
            for link, (alpha, beta) in LINKS.items():
                comm = sum(ring_allreduce_s(n, b, alpha, beta) for b in bucket_bytes)
                exposed = exposed_comm_s(n, tc, bucket_bytes, alpha, beta)
                epoch = steps_per_epoch * (tc + exposed)
                eff = steps_per_epoch * t1 / (n * epoch)
                lines.append(f"| {n} | {B // n} | {tc * 1e3:.3f} | {link} | {comm * 1e3:.3f} | {exposed * 1e3:.3f} "
                             f"| {epoch:.3f} | {eff:.1%} |")
        lines += ["", f"### Weak scaling: per-GPU batch {B}, global batch N x {B}", "",
                  "Model output, not a multi-GPU measurement: the same measured t_comp at every N (each GPU does "
                  "the one-GPU step), plus the modelled exposed all-reduce; efficiency is images/s per GPU against "
                  "one GPU, t_comp / (t_comp + exposed). Accuracy cost of the larger global batch: unmeasured "
                  "(a different recipe: linear LR scaling and warmup to N x the lr, to be validated).", "",
                  "| GPUs | global batch | steps/epoch | link | exposed (ms) | epoch (s) | efficiency |",
                  "|---|---|---|---|---|---|---|"]
        for n in (1, 2, 4, 8):
            weak_steps = images // (n * B)
            if weak_steps == 0:
                continue
            for link, (alpha, beta) in LINKS.items():
                exposed = exposed_comm_s(n, t1, bucket_bytes, alpha, beta)
                lines.append(f"| {n} | {n * B} | {weak_steps} | {link} | {exposed * 1e3:.3f} "
                             f"| {weak_steps * (t1 + exposed):.3f} | {t1 / (t1 + exposed):.1%} |")
        lines.append("")

    lines += ["## Check of the communication term: gloo on this machine's CPU", ""]
    sizes = [grad_bytes // 16, grad_bytes // 4, grad_bytes, 4 * grad_bytes, 16 * grad_bytes]
    measured: dict[tuple[int, int], float] = {}
    for n in gloo_procs:
        for s, t in zip(sizes, gloo_allreduce_s(n, sizes)):
            measured[(n, s)] = t
    if sum(1 for (n, _) in measured if n > 1) >= 2:
        alpha, beta = fit_ring(measured)
        lines += [f"{log.device_name(torch.device('cpu'))}, gloo, {len(sizes)} message sizes around the "
                  f"gradient size; fitted alpha = {alpha * 1e6:.1f} us, beta = {beta / 1e9:.2f} GB/s.", "",
                  "| processes | bytes | measured (ms) | ring model (ms) | model / measured |", "|---|---|---|---|---|"]
        for (n, s), t in sorted(measured.items()):
            if n == 1:
                continue
            model_t = ring_allreduce_s(n, s, alpha, beta)
            lines.append(f"| {n} | {s:,} | {t * 1e3:.3f} | {model_t * 1e3:.3f} | {model_t / t:.2f} |")
    else:
        lines.append("Not enough process counts (need two above 1) to fit the formula.")
    return "\n".join(lines) + "\n"
