"""The training step, in three forms behind one call: ``train_step(x, y, lr=, global_step=) -> (loss, correct)``.

- eager: :func:`train_on_batch` (forward, loss, backward, optimizer update), then the techniques' ``apply()``
  (fastres/techniques.py) on the steps their ``prepare()`` says it changes something;
- compiled (precision.compile): the same, with the net torch.compile'd and compiled before the clock starts by
  :func:`precompile`, the compile warm-up, on a batch of the loader's shape;
- graph (precision.step_graph): the whole step, techniques included, captured once as one CUDA graph
  (:class:`CapturedStep`) after its own capture warm-up, then replayed: the "whole-network capture" of PyTorch's
  CUDA Graphs notes (docs/source/notes/cuda.rst). The lr is a device tensor that fused SGD reads
  (aten::_fused_sgd_.tensor_lr), so a new lr is one fill kernel. Per step the host launches two copies (the
  batch), one fill (the lr), the techniques' fills, one replay. What a fixed graph cannot hold is refused by
  fastres.config.validate. On a CPU there is nothing to capture: the capture warm-up and its undoing run, then the
  same step runs eagerly on the static buffers, so CPU tests check everything but the capture (tests/test_cuda.py
  checks that).

Shapes come from the data: the compile warm-up and the capture run on a batch of the shape, dtype and memory
format the loader yields (:func:`random_batch`), labels drawn from the data's classes.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from fastres.config import OptimCfg, PrecisionCfg
from fastres.techniques import Technique

StepFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Batch = tuple[torch.Tensor, torch.Tensor]  # (images, labels) as the loader yields them
PRECOMPILE_STEPS = 3  # compile warm-up steps: every graph torch.compile makes for training is made there
CAPTURE_WARMUP_STEPS = 3  # side-stream steps before a capture: cuDNN autotuning and lazy inits happen there


# ----------------------------------------------------------------------------------------------------
# What precision.amp and precision.channels_last mean for the step's tensors: worked out here once.

AMP_DTYPES = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    """The dtypes and memory format of the tensors a step reads: the input batch, autocast's compute."""
    amp_dtype: torch.dtype | None  # autocast's dtype; None: no autocast
    channels_last: bool

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the input batches."""
        return self.amp_dtype or torch.float32

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def precision(cfg: PrecisionCfg) -> Precision:
    return Precision(amp_dtype=AMP_DTYPES[cfg.amp], channels_last=cfg.channels_last)


def random_batch(batch_per_rank: int, image_shape: tuple[int, int, int], num_classes: int, prec: Precision,
                 device: torch.device) -> Batch:
    """Standard-normal images of ``image_shape`` (C, H, W) and labels in [0, num_classes), in the loader's dtype and
    memory format: what the warm-ups train on. Drawn without moving the run's random streams."""
    with _streams_kept(device):
        x = torch.randn(batch_per_rank, *image_shape, device=device)
        y = torch.randint(0, num_classes, (batch_per_rank,), device=device)
    return x.to(dtype=prec.dtype, memory_format=prec.memory_format), y


# ----------------------------------------------------------------------------------------------------
# One optimizer step, and the warm-ups that compile or capture it.

def train_on_batch(net: torch.nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   x: torch.Tensor, y: torch.Tensor, *, accum: int = 1, amp_dtype: torch.dtype | None = None,
                   label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a per-rank batch taken as ``accum`` micro-batches; (summed loss, correct) on the device.

    Micro-batch m holds every accum-th image, exactly what DDP rank m would hold, and gradients are all-reduced
    only after the last one (DDP's no_sync). Each micro-batch's mean loss is divided by accum, so the gradient is
    that of k ranks: BatchNorm normalizes each micro-batch over its own images (as each rank does over its share),
    and only micro-batch 0 updates BN's running statistics, once per step, as rank 0 does under DDP (whose
    statistics every rank evaluates with).
    """
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    bns = _batchnorms(net) if accum > 1 else []
    for m in range(accum):
        xm, ym = (x, y) if accum == 1 else (x[m::accum], y[m::accum])
        sync = net.no_sync() if isinstance(net, DDP) and m < accum - 1 else nullcontext()
        with sync, _running_stats_frozen(bns if m > 0 else []):
            with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = net(xm)
                loss = F.cross_entropy(logits, ym, label_smoothing=label_smoothing)
            scaler.scale(loss / accum).backward()
        loss_sum += loss.detach().float() * len(ym)
        correct += (logits.detach().argmax(1) == ym).sum()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return loss_sum, correct


def _batchnorms(net: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats]


@contextmanager
def _running_stats_frozen(bns: list[torch.nn.modules.batchnorm._BatchNorm]) -> Iterator[None]:
    """Inside, ``bns`` normalize with batch statistics and leave their running statistics (and counts) alone."""
    for bn in bns:
        bn.track_running_stats = False
    try:
        yield
    finally:
        for bn in bns:
            bn.track_running_stats = True


def compile_net(net: torch.nn.Module, model: torch.nn.Module, cfg: PrecisionCfg) -> None:
    """torch.compile as ``cfg`` says: the whole net, or each residual branch when stochastic depth is on
    (its per-step drop decisions are Python branches, which would break the whole-net graph)."""
    mode = None if cfg.compile_mode == "default" else cfg.compile_mode
    if any(model.death_rates):
        for blk in model.blocks:
            blk.branch.compile(mode=mode)
    else:
        net.compile(mode=mode)


def precompile(net: torch.nn.Module, model: torch.nn.Module, opt: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, *, examples: Sequence[Batch], accum: int, amp_dtype: torch.dtype | None,
               evaluate: Callable[[], Any] | None = None, steps: int = PRECOMPILE_STEPS) -> None:
    """The compile warm-up: train ``steps`` steps on each of ``examples`` (a batch of every shape the loader yields,
    in its dtype and memory format: :func:`random_batch`; progressive resizing has several), then ``evaluate()`` (so
    the evaluation's eval-mode graphs, batch shapes and TTA views compile here, not in the first evaluation), then
    put weights, optimizer and scaler state back: only the compiled code remains (cifar10-airbench warms up before
    its timer too). Every stochastic-depth branch is kept meanwhile, so each is compiled."""
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), scaler.state_dict()))
    rates, model.death_rates = model.death_rates, [0.0] * len(model.death_rates)
    # dropout's draws must not move the run's streams (a run resumed inside an epoch continues them from the
    # checkpoint)
    with _streams_kept(examples[0][0].device):
        model.train()
        for example in examples:
            for _ in range(steps):
                train_on_batch(net, opt, scaler, *example, accum=accum, amp_dtype=amp_dtype)
        model.death_rates = rates
        if evaluate is not None:
            evaluate()
            model.train()
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    scaler.load_state_dict(saved[2])


class CapturedStep:
    """``fn(x, y)`` (one optimizer step; metrics on the device) captured once, called as ``captured(x, y, lr)``.

    Its static input buffers take ``example``'s shape, dtype and memory format (the loader's batches), and the
    capture warm-up trains on the example itself. The optimizer's lr becomes a device tensor (float32 on CUDA, which
    fused SGD reads as a float; float64 on a CPU, whose kernel reads a double, so the CPU run equals one with a
    Python float lr): ``lr``, shared by the graphs of every shape of a run, or made here. Graphs of one run share
    ``pool``, their memory (they never replay at once). The model's parameters, buffers and momentum buffers, and
    ``state`` (tensors the step also changes: the techniques' graph state, the epoch's sums), are the graph's state:
    they keep their storage (updated in place) and are put back after the capture warm-up, so training starts where
    it would have without a graph. The tensors a call returns are the graph's outputs, overwritten by the next call:
    use them before that.
    """

    def __init__(self, fn: StepFn, model: torch.nn.Module, opt: torch.optim.Optimizer, *, example: Batch,
                 warmup: int = CAPTURE_WARMUP_STEPS, state: Sequence[torch.Tensor] = (),
                 lr: torch.Tensor | None = None, pool: Any = None):
        self.fn = fn  # one optimizer step on (x, y); metrics on the device
        self.state, self.pool = list(state), pool
        self.x, self.y = example[0].clone(), example[1].clone()  # clone keeps the memory format
        self.lr = lr if lr is not None else lr_tensor(opt, self.x.device)
        for group in opt.param_groups:
            group["lr"] = self.lr
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: tuple[torch.Tensor, torch.Tensor] | None = None
        self._capture(model, opt, warmup)

    def _capture(self, model: torch.nn.Module, opt: torch.optim.Optimizer, warmup: int) -> None:
        """Capture warm-up, capture on CUDA, then undo the warm-up. The warm-up and its undoing run on a CPU too
        (only the capture is skipped there), so the CPU tests' "equals step_graph = false" checks the undoing."""
        state = state_tensors(model, opt) + self.state
        saved = [t.detach().clone() for t in state]
        cuda = self.x.device.type == "cuda"
        # dropout's draws in the warm-up must not move the run's random streams
        with _streams_kept(self.x.device):
            opt.zero_grad(set_to_none=True)
            with _side_stream(self.x.device):
                for _ in range(warmup):
                    self.fn(self.x, self.y)
        # State the warm-up made (torch's SGD makes momentum buffers on its first step) would keep the warm-up's
        # values, and the graph would replay a later step's update where a first step belongs: refused below.
        remade = [id(t) for t in state_tensors(model, opt) + self.state] != [id(t) for t in state]
        opt.zero_grad(set_to_none=True)  # backward in the capture then writes fresh gradients, no accumulate
        if cuda and not remade:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=self.pool):
                self.out = self.fn(self.x, self.y)
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
            return self.fn(self.x, self.y)
        self.graph.replay()
        return self.out


def lr_tensor(opt: torch.optim.Optimizer, device: torch.device) -> torch.Tensor:
    """The optimizer's lr as the 0-dim device tensor a step graph reads (see :class:`CapturedStep`)."""
    lr_dtype = torch.float32 if device.type == "cuda" else torch.float64
    return torch.tensor(float(opt.param_groups[0]["lr"]), dtype=lr_dtype, device=device)


def _streams_kept(device: torch.device):
    """Inside, random draws on the CPU and ``device`` leave the global random streams as they were."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type)


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


def state_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor a training step changes: parameters, buffers (BN statistics), optimizer state."""
    tensors = list(model.parameters()) + list(model.buffers())
    for st in opt.state.values():
        tensors += [v for v in st.values() if isinstance(v, torch.Tensor)]
    return tensors


# ----------------------------------------------------------------------------------------------------
# The loop's step: the three forms behind one call, and the epoch's sums on the device.

class TrainStep:
    """The loop's optimizer step: ``train_step(x, y, lr=lr, global_step=s)`` trains on one per-rank batch at learning
    rate ``lr`` as global step ``s``, the count of steps taken before it, and returns (summed loss, correct) on the
    device. Every technique (fastres/techniques.py) prepares step ``s`` on the host first; eager and compiled then
    set the lr in the optimizer, step, and apply the techniques that asked; the graph form replays all of it.

    The epoch's sums live here, on the device, added inside the step (inside the graph too): ``loss_sum``,
    ``correct``, and ``bad_step``, the first step whose loss was not finite (-1: none). ``start_epoch(s)``
    zeroes them; every call must then be the next step (``global_step == next_step``), so the device's count of
    steps is the caller's."""

    def __init__(self, net: torch.nn.Module, model: torch.nn.Module, opt: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, *, accum: int, amp_dtype: torch.dtype | None, label_smoothing: float,
                 techniques: Sequence[Technique] = ()):
        self.net, self.model, self.opt, self.scaler, self.techniques = net, model, opt, scaler, list(techniques)
        self.kw = dict(accum=accum, amp_dtype=amp_dtype, label_smoothing=label_smoothing)
        self.captured: dict[tuple[int, ...], CapturedStep] | None = None  # the graph form: one graph a shape
        device = next(model.parameters()).device
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)  # the step being taken, on the device
        self.next_step = 0  # ... and on the host
        self.cudagraph_skips = 0  # parts torch.compile's CUDA graphs left eager (see build_train_step)

    def start_epoch(self, global_step: int, loss_sum: float = 0.0, correct: int = 0, bad_step: int = -1) -> None:
        """Start the epoch's sums (at zero; at a checkpoint's values for an epoch resumed inside); the next call is
        global step ``global_step`` (four fills, once an epoch)."""
        self.loss_sum.fill_(loss_sum)
        self.correct.fill_(correct)
        self.bad_step.fill_(bad_step)
        self.count.fill_(global_step)
        self.next_step = global_step

    def _tally(self, loss: torch.Tensor, correct: torch.Tensor) -> None:
        """Add a step's results to the epoch's sums, on the device (no host sync)."""
        self.loss_sum += loss
        self.correct += correct
        self.bad_step.copy_(torch.where((self.bad_step < 0) & ~torch.isfinite(loss), self.count, self.bad_step))
        self.count += 1

    def capture(self, examples: Sequence[Batch]) -> None:
        """Make this the graph form: capture the step (the techniques' apply(), the sums) as one CUDA graph for each
        of ``examples``' shapes (progressive resizing has several), sharing the lr tensor and the graphs' memory."""
        held = [t.name for t in self.techniques if not t.graphable]
        if held:
            raise ValueError(f"a captured step cannot hold {', '.join(held)}")
        state = [t for tech in self.techniques for t in tech.graph_state()]
        sums = [self.loss_sum, self.correct, self.bad_step, self.count]
        lr = lr_tensor(self.opt, examples[0][0].device)
        pool = torch.cuda.graph_pool_handle() if examples[0][0].device.type == "cuda" else None
        self.captured = {tuple(x.shape): CapturedStep(self._whole_step, self.model, self.opt, example=(x, y),
                                                      state=state + sums, lr=lr, pool=pool) for x, y in examples}

    def _whole_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = train_on_batch(self.net, self.opt, self.scaler, x, y, **self.kw)
        for technique in self.techniques:
            technique.apply()  # graph-safe: what prepare() filled decides, the same kernels every replay
        self._tally(*out)
        return out

    def __call__(self, x: torch.Tensor, y: torch.Tensor, *, lr: float,
                 global_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if global_step != self.next_step:
            raise ValueError(f"step {global_step} called where step {self.next_step} is next: call "
                             "start_epoch(global_step) when the steps do not follow on")
        self.next_step += 1
        due = [t for t in self.techniques if t.prepare(global_step)]  # host: fills only, no sync
        if self.captured is not None:
            graph = self.captured.get(tuple(x.shape))
            if graph is None:
                raise ValueError(f"the step graphs take batches of {', '.join(map(str, self.captured))}, got "
                                 f"{tuple(x.shape)}")
            return graph(x, y, lr)
        for group in self.opt.param_groups:
            group["lr"] = lr
        out = train_on_batch(self.net, self.opt, self.scaler, x, y, **self.kw)
        for technique in due:
            technique.apply()
        self._tally(*out)
        return out


def build_train_step(net: torch.nn.Module, model: torch.nn.Module, opt: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler, cfg: PrecisionCfg, optim: OptimCfg, *,
                     examples: Callable[[], list[Batch]], techniques: Sequence[Technique] = (),
                     evaluate: Callable[[], Any] | None = None) -> tuple[TrainStep, float]:
    """(the step ``cfg`` asks for, seconds it took to make): compiled and precompiled on ``examples()`` (a batch of
    each shape the loader yields, made only here; running ``evaluate()`` in the compile warm-up) if precision.compile,
    captured (a graph a shape) if precision.step_graph."""
    amp_dtype = precision(cfg).amp_dtype
    timer = Timer(next(model.parameters()).device)
    timer.start()
    skips = 0
    batches = examples() if cfg.compile or cfg.step_graph else []
    if cfg.compile:
        from torch._dynamo.utils import counters  # here, not at the top: 2 s of every start-up without compile
        before = counters["inductor"]["cudagraph_skips"]
        compile_net(net, model, cfg)
        precompile(net, model, opt, scaler, examples=batches, accum=optim.accum_steps, amp_dtype=amp_dtype,
                   evaluate=evaluate)
        # reduce-overhead runs what it cannot graph eagerly, saying so only in a log (BatchNorm under DDP:
        # pytorch#139207); inductor counts each skip, and the run reports them
        skips = counters["inductor"]["cudagraph_skips"] - before
    train_step = TrainStep(net, model, opt, scaler, accum=optim.accum_steps, amp_dtype=amp_dtype,
                           label_smoothing=optim.label_smoothing, techniques=techniques)
    train_step.cudagraph_skips = skips
    if cfg.step_graph:
        train_step.capture(batches)
    return train_step, timer.stop()


# ----------------------------------------------------------------------------------------------------
# Device-synchronized timing: what every number fastres reports is measured with.

class Timer:
    """Seconds between start() and stop(), device-synchronized (CUDA events on a GPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        self.t = time.perf_counter()
        if self.cuda:
            self.begin = torch.cuda.Event(enable_timing=True)
            self.begin.record()

    def host_elapsed(self) -> float:
        """Host seconds since start(), without waiting for the device (for progress lines, not for results)."""
        return time.perf_counter() - self.t

    def stop(self) -> float:
        if not self.cuda:
            return time.perf_counter() - self.t
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return self.begin.elapsed_time(end) / 1000.0


@contextmanager
def sync_allowed(device: torch.device) -> Iterator[None]:
    """Inside, a synchronization is allowed even under :func:`forbid_host_sync` (a deliberate, rare one)."""
    if device.type != "cuda":
        yield
        return
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


@contextmanager
def forbid_host_sync(device: torch.device, enabled: bool) -> Iterator[None]:
    """Inside, any host-device synchronization raises (torch.cuda.set_sync_debug_mode("error")): an
    ``.item()``, a blocking copy, ``nonzero`` or a boolean mask stalls the host until the GPU drains, which
    costs a fast loop its lead. Off, or on a device other than CUDA, it does nothing.
    """
    if not (enabled and device.type == "cuda"):
        yield
        return
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)
