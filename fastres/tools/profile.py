"""Where a training step's time goes: ``python -m fastres.tools.bench profile [--config X] [--label L]``.

Builds the run as training does (fastres.build; ``data.source = "synthetic"`` needs no data set), then:
  A  ``--steps`` steps of the step alone on one fixed batch (CUDA events)          -> the step's own cost
  B  ``--steps`` iterations of the training loop: loader and step                -> the step as training sees it
  C  B again under torch.profiler: GPU busy time per step (the union of kernel and copy intervals) against the
     step's wall time, the largest idle gaps (named by the kernels around them), the top kernels, host API calls
     per step (kernel launches, graph launches, synchronizations), the top host ops, and dynamo's counters
     (graph breaks, cudagraph skips).
Writes ``<out>/<label>.txt`` (this summary) and ``runs/profile/<label>.trace.json.gz`` (open in Perfetto).
On a CPU there are no kernels: A, B and the host ops are measured, the GPU lines say so.
"""

from __future__ import annotations

import collections
import gzip
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from fastres import distributed, log
from fastres.build import build
from fastres.config import Config
from fastres.data.loaders import endless
from fastres.errors import write_text, writing

TRACES = Path("runs/profile")


def _timed(fn: Callable[[], Any], n: int, cuda: bool) -> tuple[float, float]:
    """(wall ms per call, device-synchronized; host ms per call to issue it), after 5 untimed calls."""
    for _ in range(5):
        fn()
    if cuda:
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) * 1e3 / n
    if not cuda:
        return host, host
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / n, host


def gpu_summary(events: list[dict[str, Any]], steps: int, batch: int) -> list[str]:
    """GPU busy against span, idle gaps and top kernels per step, from a Kineto trace's events."""
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    if not gpu:
        return ["  GPU: no kernels in the trace (not a CUDA run)"]
    busy, end, gaps = 0.0, gpu[0]["ts"], collections.Counter()
    kernels: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for prev, e in zip([None] + gpu[:-1], gpu):
        if prev is not None and e["ts"] > end:
            gaps[f"{prev['name'][:45]} -> {e['name'][:45]}"] += e["ts"] - end
        busy += max(0.0, e["ts"] + e["dur"] - max(e["ts"], end))
        end = max(end, e["ts"] + e["dur"])
        kernels[e["name"]][0] += 1
        kernels[e["name"]][1] += e["dur"]
    span = end - gpu[0]["ts"]
    lines = [f"  GPU busy {busy / steps / 1e3:.3f} ms/step of {span / steps / 1e3:.3f} ms span ({busy / span:.0%}); "
             f"{len(gpu) / steps:.0f} kernels and copies a step; busy-bound rate "
             f"{batch * steps / busy * 1e6:,.0f} img/s",
             "  largest idle gaps (us/step, between):"]
    lines += [f"    {v / steps:8.1f}  {k}" for k, v in gaps.most_common(8)]
    lines.append("  top kernels (us/step, count/step, share of busy):")
    lines += [f"    {d / steps:8.1f} {n / steps:5.1f} {d / busy:6.1%}  {name[:100]}"
              for name, (n, d) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:15]]
    return lines


def api_summary(events: list[dict[str, Any]], steps: int) -> list[str]:
    """Host CUDA API calls per step: launches, graph launches, synchronizations."""
    api: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("cat") in ("cuda_runtime", "cuda_driver"):
            api[e["name"]][0] += 1
            api[e["name"]][1] += e.get("dur", 0)
    if not api:
        return ["  host CUDA API calls: none (not a CUDA run)"]
    counts = {k: n / steps for k, (n, _) in api.items()}
    syncs = sum(v for k, v in counts.items() if "Synchronize" in k)
    return [f"  per step: {counts.get('cudaLaunchKernel', 0):.1f} cudaLaunchKernel, "
            f"{counts.get('cudaGraphLaunch', 0):.1f} cudaGraphLaunch, {syncs:.1f} synchronizations",
            "  host API calls (count/step, us/step): " + ", ".join(
                f"{k} {n / steps:.1f}/{d / steps:.0f}"
                for k, (n, d) in sorted(api.items(), key=lambda kv: -kv[1][1])[:10])]


def profile_step(cfg: Config, device: torch.device, *, steps: int, label: str, out: Path) -> str:
    """Profile ``cfg``'s step on ``device`` (module docstring); the summary, also written to out/<label>.txt."""
    from torch._dynamo.utils import counters

    cuda = device.type == "cuda"
    torch.manual_seed(cfg.run.seed)
    counters.clear()
    p = build(cfg, distributed.single(device))
    batch = cfg.optim.batch_size

    stream, index = endless(p.loader), [0]
    x0, y0 = next(stream)

    def step_alone() -> None:
        p.train_step(x0, y0, lr=p.schedule(index[0]), global_step=index[0])
        index[0] += 1

    def loop_iteration() -> None:  # one iteration of fastres.train's inner loop (its sums are in the step)
        x, y = next(stream)
        p.train_step(x, y, lr=p.schedule(index[0]), global_step=index[0])
        index[0] += 1

    a_wall, a_host = _timed(step_alone, steps, cuda)
    b_wall, b_host = _timed(loop_iteration, steps, cuda)
    TRACES.mkdir(parents=True, exist_ok=True)
    trace = TRACES / f"{label}.trace.json"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, schedule=schedule(wait=1, warmup=2, active=steps),
                 on_trace_ready=lambda prof: prof.export_chrome_trace(str(trace))) as prof:
        for i in range(steps + 3):
            loop_iteration()
            if cuda and i == steps + 2:
                torch.cuda.synchronize()  # the last step's kernels land in the trace
            prof.step()
    events = json.loads(trace.read_text())["traceEvents"]
    with gzip.open(trace.with_suffix(".json.gz"), "wb") as z:
        z.write(trace.read_bytes())
    trace.unlink()
    profiled = [e for e in events if e.get("name", "").startswith("ProfilerStep#")]
    pc = cfg.precision
    lines = [f"# Step profile: {label}", "",
             f"`python -m fastres.tools.bench --what profile` at {log.short_sha(log.git_sha())}: "
             f"{log.device_name(device)}, torch {torch.__version__}, data {cfg.data.source}, batch {batch}, "
             f"amp {pc.amp}, compile {pc.compile}/{pc.compile_mode}, step_graph {pc.step_graph}, "
             f"build of the step {p.compile_s:.1f} s", "", "```",
             f"A step alone : {a_wall:7.3f} ms/step wall, {a_host:7.3f} ms host -> {batch / a_wall * 1e3:10,.0f} img/s",
             f"B real loop  : {b_wall:7.3f} ms/step wall, {b_host:7.3f} ms host -> {batch / b_wall * 1e3:10,.0f} img/s",
             f"C profiled   : {sum(e['dur'] for e in profiled) / 1e3 / max(1, len(profiled)):7.3f} ms/step host "
             "(profiler on)"]
    lines += gpu_summary(events, steps, batch) + api_summary(events, steps)
    skips = {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}
    lines += [f"  dynamo: graph breaks {dict(counters['graph_break'])}, cudagraph counters {skips}", "",
              "top host ops (self CPU time):",
              prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50),
              "```"]
    text = "\n".join(lines) + "\n"
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    write_text(out / f"{label}.txt", text)
    return text
