"""The whole training step as one CUDA graph: ``precision.step_graph = true``.

torch.compile's reduce-overhead mode graphs the model's forward and its backward, but the loss, the
metrics, the optimizer step and zero_grad still launch from Python every step. On the H100 a ResNet-20
step with it took 3.85 ms at batch 512 and 3.03 ms at batch 64 (results/scaling.md): most of a step is
fixed cost, not the GPU's work on the images. Here forward, loss, backward, the fused SGD update and the
step's metrics are captured once and replayed: the "whole-network capture" of PyTorch's CUDA Graphs notes
(docs/source/notes/cuda.rst: static inputs, warm-up on a side stream, capture, then copy each batch into
the static input and replay). The learning rate becomes a device tensor that fused SGD reads on the
device (aten::_fused_sgd_.tensor_lr), so a new lr each step is one fill kernel, not a new capture. Per
step the host then launches: two copies (the batch into the static input), one fill (the lr), one replay.

What a fixed graph cannot hold is refused by :func:`check` with a one-line error:
- stochastic depth: each step's drops are Python branches, and a graph is one fixed path;
- fp16: GradScaler skips steps and rescales after reading found_inf on the host;
- SGD other than fused: torch's default and foreach SGD turn a tensor lr into a Python number (a sync);
- compile modes that make CUDA graphs of their own (reduce-overhead, max-autotune): one cannot be captured
  inside another (torch.compile's default mode, or max-autotune-no-cudagraphs, compiles kernels that are);
- more than one rank: DDP's all-reduce can be captured with NCCL after a warm-up on a side stream (the same
  notes), which is not validated here yet.
On a CPU there is nothing to capture: the warm-up and its undoing run as on a GPU, then the same step runs
eagerly on the static buffers, so CPU tests check everything but the capture (a run is bit-identical to
step_graph = false); tests/test_cuda.py checks the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from fastres.config import Config
from fastres.errors import UserError

StepFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
WARMUP_STEPS = 3  # side-stream steps before capture: cuDNN autotuning and lazy inits happen there


def check(cfg: Config, world: int) -> None:
    """UserError naming the first setting a whole-step graph cannot hold; nothing when step_graph is off."""
    if not cfg.precision.step_graph:
        return
    pre = "precision.step_graph = true"
    if cfg.model.stochastic_depth > 0:
        raise UserError(f"{pre} cannot capture stochastic depth (its per-step drops are Python branches): "
                        "set model.stochastic_depth = 0 or precision.step_graph = false")
    if cfg.precision.amp == "fp16":
        raise UserError(f"{pre} cannot capture fp16's GradScaler (it decides on the host whether to step): "
                        "use precision.amp = bf16 or off")
    if cfg.optim.impl != "fused":
        raise UserError(f"{pre} needs optim.impl = fused (the SGD that reads its learning rate on the device), "
                        f"not {cfg.optim.impl!r}")
    if cfg.precision.compile and cfg.precision.compile_mode in ("reduce-overhead", "max-autotune"):
        raise UserError(f"{pre} cannot contain compile_mode {cfg.precision.compile_mode!r}, which makes CUDA "
                        "graphs of its own: use precision.compile_mode = default or max-autotune-no-cudagraphs")
    if world > 1:
        raise UserError(f"{pre} runs on one rank only for now (DDP's all-reduce inside the graph is not "
                        f"validated), and this run has {world}: set precision.step_graph = false")


class StepGraph:
    """``step(x, y)`` (one optimizer step; metrics on the device) captured once, called as ``graph(x, y, lr)``.

    The optimizer's lr becomes a device tensor here (float32 on CUDA, which fused SGD reads as a float;
    float64 on a CPU, whose kernel reads a double, so the CPU run equals one with a Python float lr). The
    model's parameters, buffers and momentum buffers, and ``state`` (tensors the step also changes, such as
    the weight average of fastres/ema.py), are the graph's state: they keep their storage (updated in place)
    and are put back after the warm-up, so training starts where it would have without a graph.
    The tensors a call returns are the graph's outputs, overwritten by the next call: use them before that.
    """

    def __init__(self, step: StepFn, model: torch.nn.Module, opt: torch.optim.Optimizer, *, batch: int,
                 dtype: torch.dtype, memory_format: torch.memory_format, device: torch.device,
                 warmup: int = WARMUP_STEPS, state: Sequence[torch.Tensor] = ()):
        self.step = step
        self.state = list(state)
        self.x = torch.zeros(batch, 3, 32, 32, dtype=dtype, device=device).contiguous(memory_format=memory_format)
        self.y = torch.zeros(batch, dtype=torch.int64, device=device)
        lr_dtype = torch.float32 if device.type == "cuda" else torch.float64
        self.lr = torch.tensor(float(opt.param_groups[0]["lr"]), dtype=lr_dtype, device=device)
        for group in opt.param_groups:
            group["lr"] = self.lr
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: tuple[torch.Tensor, torch.Tensor] | None = None
        self._capture(model, opt, warmup)

    def _capture(self, model: torch.nn.Module, opt: torch.optim.Optimizer, warmup: int) -> None:
        """Warm up, capture on CUDA, then undo the warm-up. The warm-up and its undoing run on a CPU too (only
        the capture is skipped there), so the CPU tests' "equals step_graph = false" checks the undoing."""
        state = _state_tensors(model, opt) + self.state
        saved = [t.detach().clone() for t in state]
        cuda = self.x.device.type == "cuda"
        # the warm-up's random input (and dropout's draws) must not move the run's random streams
        with torch.random.fork_rng(devices=[self.x.device] if cuda else [], device_type=self.x.device.type):
            self.x.normal_()  # labels stay 0: any valid class will do for warm-up and capture
            opt.zero_grad(set_to_none=True)
            with _side_stream(self.x.device):
                for _ in range(warmup):
                    self.step(self.x, self.y)
        # State the warm-up made (torch's SGD makes momentum buffers on its first step) would keep the warm-up's
        # values, and the graph would replay a later step's update where a first step belongs: refused below.
        remade = [id(t) for t in _state_tensors(model, opt) + self.state] != [id(t) for t in state]
        opt.zero_grad(set_to_none=True)  # backward in the capture then writes fresh gradients, no accumulate
        if cuda and not remade:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self.step(self.x, self.y)
        with torch.no_grad():  # capturing ran nothing; the warm-up steps are undone
            for t, s in zip(state, saved):
                t.copy_(s)
        if remade:
            raise ValueError("the step graph's warm-up created or replaced optimizer state: make it up front, "
                             "as fastres.optim.build_optimizer makes SGD's momentum buffers")

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape != self.x.shape or y.shape != self.y.shape:
            raise ValueError(f"a step graph takes batches of {tuple(self.x.shape)}, got {tuple(x.shape)}")
        self.x.copy_(x)
        self.y.copy_(y)
        self.lr.fill_(lr)
        if self.graph is None:
            return self.step(self.x, self.y)
        self.graph.replay()
        return self.out


@contextmanager
def _side_stream(device: torch.device) -> Iterator[None]:
    """The block on a fresh CUDA stream that first waits for the current one, which then waits for it (the
    warm-up before a capture, as the CUDA Graphs notes do it); on a CPU, which has no streams, just the block."""
    if device.type != "cuda":
        yield
        return
    current, side = torch.cuda.current_stream(device), torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        yield
    current.wait_stream(side)


def _state_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor a training step changes: parameters, buffers (BN statistics), optimizer state."""
    tensors = list(model.parameters()) + list(model.buffers())
    for st in opt.state.values():
        tensors += [v for v in st.values() if isinstance(v, torch.Tensor)]
    return tensors
