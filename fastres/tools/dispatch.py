"""Host work per training step: ``python -m fastres.tools.bench dispatch [--config X] [--steps N]``.

Counts, over ``--steps`` iterations of the training loop after warm-up (the loader, the step, the loop's own
work, as fastres.train runs them), the ATen ops the host dispatches per step outside a captured graph: every
top-level op (not called from inside another ATen op) counts one, and each replay of the step graph counts one.
On a CPU nothing is captured, so there the region the step graph captures on a GPU counts as one op and what
runs around it is counted as it runs. On a CUDA device it also counts the kernel launches, graph launches and
synchronizations the host makes per step. Nothing here asserts a speed: it counts what the code does.
"""

from __future__ import annotations

import collections
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from fastres import distributed
from fastres.build import build
from fastres.config import Config

CAPTURED = "fastres::captured"  # the step graph's region: one op however many it holds
# the CUDA calls counted per step: launches, and the calls that copy or wait
_CUDA_CALLS = ("cudaLaunchKernel", "cudaGraphLaunch", "cudaMemcpy", "cudaMemcpyAsync", "cudaStreamSynchronize",
               "cudaDeviceSynchronize", "cudaEventSynchronize")


def _as_one(fn):
    def region(*a, **kw):
        with record_function(CAPTURED):
            return fn(*a, **kw)
    return region


def _source(event) -> str:
    """The fastres:: region an op ran in: loader, step, loop, or the autograd engine's own thread."""
    e = event.cpu_parent
    while e is not None:
        if e.name.startswith("fastres::"):
            return e.name.split("::")[1]
        e = e.cpu_parent
    return "autograd thread"


def _inside_an_op(event) -> bool:
    e = event.cpu_parent
    while e is not None:
        if e.name.startswith("aten::") or e.name == CAPTURED:
            return True
        e = e.cpu_parent
    return False


def _tally(prof, steps: int) -> tuple[dict, dict, dict]:
    by_op: collections.Counter = collections.Counter()
    cuda: collections.Counter = collections.Counter()
    for e in prof.events():
        if (e.name.startswith("aten::") or e.name == CAPTURED) and not _inside_an_op(e):
            by_op[(_source(e), "graph replay" if e.name == CAPTURED else e.name)] += 1
        elif e.name in _CUDA_CALLS:
            cuda[e.name] += 1
    by_source: collections.Counter = collections.Counter()
    for (source, _), n in by_op.items():
        by_source[source] += n
    return ({k: v / steps for k, v in by_op.items()}, {k: v / steps for k, v in by_source.items()},
            {k: v / steps for k, v in cuda.items()})


def count_host_ops(cfg: Config, device: torch.device, *, steps: int = 10, warmup: int = 3) -> dict[str, Any]:
    """Per loop step: {"per_step": N, "by_source": {source: n}, "by_op": {(source, op): n}, "cuda": {call: n}},
    counted over ``steps`` steps inside an epoch after ``warmup`` steps; "epoch_start": the ops of an epoch's
    first step (what the loader and the step do once an epoch), counted apart."""
    torch.manual_seed(cfg.run.seed)
    p = build(cfg, distributed.single(device))
    for captured in (p.train_step.captured or {}).values():  # what the host calls per step for the captured ops
        if captured.graph is not None:
            captured.graph.replay = _as_one(captured.graph.replay)
        else:
            captured.fn = _as_one(captured.fn)
    steps = min(steps, len(p.loader) - 1)
    if steps < 1:
        raise ValueError(f"an epoch of {len(p.loader)} step(s) leaves none to count after its first")
    index = 0

    def epoch(e: int):
        p.loader.set_epoch(e)
        p.train_step.start_epoch(index)  # as fastres.train starts an epoch
        return iter(p.loader)

    def iteration(batches) -> None:  # fastres.train's inner loop, each part named
        nonlocal index
        with record_function("fastres::loader"):
            x, y = next(batches)
        with record_function("fastres::step"):
            p.train_step(x, y, lr=p.schedule(index), global_step=index)
        with record_function("fastres::loop"):
            index += 1
    batches = epoch(0)
    for _ in range(min(warmup, len(p.loader))):
        iteration(batches)
    batches = epoch(1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with profile(activities=activities) as first:
        iteration(batches)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            iteration(batches)
    by_op, by_source, cuda = _tally(prof, steps)
    return dict(per_step=sum(by_op.values()), by_source=by_source, by_op=by_op, cuda=cuda,
                epoch_start=sum(_tally(first, 1)[0].values()), device=device.type, steps=steps)


def report(name: str, counts: dict[str, Any]) -> str:
    """The counts as the command prints them."""
    lines = [f"{name}: host ops per step: {counts['per_step']:g}  (counted over {counts['steps']} steps inside an "
             f"epoch; an epoch's first step: {counts['epoch_start']:g})"]
    lines += [f"  {source:<16} {n:g}" for source, n in sorted(counts["by_source"].items(), key=lambda kv: -kv[1])]
    top = sorted(counts["by_op"].items(), key=lambda kv: -kv[1])[:12]
    lines.append("  top ops: " + ", ".join(f"{op} {n:g} ({source})" for (source, op), n in top))
    if counts["device"] == "cuda":
        lines.append("  CUDA calls per step: " + (", ".join(f"{k} {v:g}" for k, v in sorted(counts["cuda"].items()))
                                                  or "none"))
    else:
        lines.append("  (a CPU: nothing is captured, so the step graph's region counts as one op)")
    return "\n".join(lines) + "\n"
