"""What a run reports while it trains: metrics.jsonl, TensorBoard events, a progress bar. Rank 0 only.

TensorBoard: every scalar is written at its optimizer step, with its event time set to
(run start + training seconds so far). So the STEP axis is steps and the WALL axis is the run's start plus the
training wall-clock with evaluation excluded - the time that time_to_target_s measures (RELATIVE counts from each
curve's first point). train/lr at step s is the lr of the s-th optimizer step, schedule(s - 1): only values the
schedule used. After a resume the events past the checkpoint's step are purged, and metrics.jsonl loses its rows
past the checkpoint's epoch, so neither holds duplicates.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fastres.errors import UserError, writing

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
TB_DIR = "tb"
CURVES = "curves.png"
# A metrics row's fields that measure time, not training: they differ between runs that train the same
TIMING_FIELDS = ("train_time_s", "img_per_s", "eval_s", "data_wait_s", "data_wait_frac")
CURVES_EVERY_S = 60.0  # curves.png is redrawn at most this often, and at the end: a drawing costs 0.1-0.5 s
# An evaluation's other accuracies, logged as <split>_acc_<key> beside <split>_acc (the summary keeps the last as
# final_<split>_acc_<key>), and what the report calls each.
EXTRA_ACCS = {"no_tta": "without TTA", "flip": "flip TTA alone", "no_ema": "without EMA",
              "running_bn": "with running BN statistics", "top5": "top-5"}


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl ([] if none). A torn last line (killed mid-write) is dropped, and
    a resume rewrites the file without it; a bad line anywhere else is a UserError naming it."""
    path = Path(out_dir) / METRICS
    if not path.exists():
        return []
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and "epoch" in row:
            wrong = _wrong_field(row)
            if wrong:  # valid JSON a hand or a tool changed: named, as a line that is not JSON is
                raise UserError(f"{path} line {i}: {wrong}: fix the row or move the file")
            rows.append(row)
        elif i < len(lines):
            raise UserError(f"{path} line {i} is not a metrics row: fix or move the file")
    return rows


def _wrong_field(row: dict[str, Any]) -> str:
    """"" for a row of the types fastres writes (epoch and step whole numbers, every other field a number or
    null), else which field is not."""
    for key in ("epoch", "step"):
        v = row.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            return f"{key} is {json.dumps(v)[:40]}, not a whole number"
    for key, v in row.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            return f"{key} is {json.dumps(v)[:40]}, not a number"
    return ""


def fmt_time(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class RunLog:
    """Writers for one run; every method is a no-op on ranks other than 0 (``enabled=False``)."""

    def __init__(self, out_dir: Path, *, enabled: bool, total_steps: int, step: int, epoch: int,
                 t0: float, every_steps: int = 0, momentum_at: Callable[[int], float] | None = None):
        self.enabled, self.total_steps, self.t0, self.every_steps = enabled, total_steps, t0, every_steps
        self.momentum_at = momentum_at  # a schedule that varies SGD's momentum: train/momentum beside train/lr
        self.bar = None
        self.pending: deque = deque()  # batch losses on their way to host memory
        self.out_dir, self.drawn_at = out_dir, time.monotonic()  # curves.png: when it was last drawn (or the start)
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # imported on rank 0 only

        rows = [r for r in read_metrics(out_dir) if r["epoch"] <= epoch]
        self.metrics, self.tb_dir = out_dir / METRICS, out_dir / TB_DIR
        with writing(self.metrics):
            self.metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
            self.jsonl = open(self.metrics, "a")
        self._quiet_writer_thread = _WriterThreadHook()
        with writing(self.tb_dir), self._quiet_writer_thread.closing_on_error():
            self.tb = SummaryWriter(str(self.tb_dir), purge_step=step + 1 if step else None)
        self.tty = sys.stderr.isatty()
        if self.tty:
            self.bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, leave=False)

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update()

    def batch(self, step: int, loss_sum: torch.Tensor, images: int, lr: float, train_time_s: float) -> None:
        """TensorBoard's train/batch_loss (the batch's mean loss), train/lr (and train/momentum when the schedule
        varies it, from the schedule on the host: the momentum of step ``step - 1``, whose lr ``lr`` is) at ``step``,
        without waiting for the device: the loss is copied to host memory asynchronously and written by a later call,
        or by close(), once the copy is done (an event's query, not a sync)."""
        if not self.enabled:
            return
        host = torch.empty((), dtype=loss_sum.dtype, pin_memory=loss_sum.is_cuda)
        host.copy_(loss_sum.detach(), non_blocking=True)
        done = None
        if loss_sum.is_cuda:
            done = torch.cuda.Event()
            done.record()
        self.pending.append((step, host, done, images, lr, train_time_s))
        self._write_batches()

    def _write_batches(self, wait: bool = False) -> None:
        while self.pending and (wait or self.pending[0][2] is None or self.pending[0][2].query()):
            step, host, done, images, lr, train_time_s = self.pending.popleft()
            if done is not None:
                done.synchronize()  # done already unless wait (at close)
            wall = self.t0 + train_time_s
            with writing(self.tb_dir):
                self.tb.add_scalar("train/batch_loss", host.item() / images, step, walltime=wall)
                self.tb.add_scalar("train/lr", lr, step, walltime=wall)
                if self.momentum_at is not None:
                    self.tb.add_scalar("train/momentum", self.momentum_at(step - 1), step, walltime=wall)

    def evaluation(self, row: dict[str, Any]) -> None:
        """Record one evaluation: a metrics.jsonl line, TensorBoard scalars, a printed line."""
        if not self.enabled:
            return
        with writing(self.metrics):
            self.jsonl.write(json.dumps(row) + "\n")
            self.jsonl.flush()
        wall, step = self.t0 + row["train_time_s"], row["step"]
        with writing(self.tb_dir):
            for tag, key in (("train/loss", "train_loss"), ("train/lr", "lr"), ("test/acc", "test_acc"),
                             ("val/acc", "val_acc"), ("test/acc_top5", "test_acc_top5"),
                             ("val/acc_top5", "val_acc_top5"), ("perf/img_per_s", "img_per_s"),
                             ("perf/data_wait_frac", "data_wait_frac")):
                if tag == "train/lr" and self.every_steps and step % self.every_steps == 0:
                    continue  # batch() wrote this step's lr
                if row.get(key) is not None:
                    self.tb.add_scalar(tag, row[key], step, walltime=wall)
            if self.momentum_at is not None and not (self.every_steps and step % self.every_steps == 0):
                self.tb.add_scalar("train/momentum", self.momentum_at(step - 1), step, walltime=wall)
            self.tb.flush()
        done = row["step"] / max(1, self.total_steps)
        eta = row["train_time_s"] * (1 - done) / done if done else 0.0
        accs = "".join(f"  {name} {row[name + '_acc']:.2%}"
                       + (f" (top-5 {row[name + '_acc_top5']:.2%})" if row.get(name + "_acc_top5") is not None else "")
                       for name in ("test", "val") if row.get(name + "_acc") is not None)
        wait = f" ({row['data_wait_frac']:.0%} waiting for data)" if row.get("data_wait_frac") is not None else ""
        self.info(f"epoch {row['epoch']:>3}  step {row['step']}/{self.total_steps}  loss {row['train_loss']:.4f}"
                  f"{accs}  lr {row['lr']:.4g}  {row['img_per_s']:,.0f} img/s{wait}"
                  f"  train {fmt_time(row['train_time_s'])}  eta {fmt_time(eta)}")

    def curves(self, name: str, *, last: bool) -> None:
        """Redraw curves.png from metrics.jsonl after an evaluation: the ``last`` one of this process (the run's end
        or a stop), or once CURVES_EVERY_S have passed since the last drawing (TensorBoard is the live view)."""
        if self.enabled and (last or time.monotonic() - self.drawn_at >= CURVES_EVERY_S):
            plot_curves(read_metrics(self.out_dir), self.out_dir / CURVES, name)
            self.drawn_at = time.monotonic()

    def close(self) -> None:
        if not self.enabled:
            return
        try:
            if self.bar is not None:
                self.bar.close()
            self._write_batches(wait=True)
            with writing(self.metrics):
                self.jsonl.close()
            with writing(self.tb_dir):
                self.tb.flush()  # raises the writer thread's failure (a full disk); close() alone drops it
                self.tb.close()
        finally:
            self._quiet_writer_thread.close()


class _WriterThreadHook:
    """threading.excepthook while a RunLog is open, silent for TensorBoard's writer thread only. That thread keeps a
    failed write (a full disk) for the main thread, whose next add_scalar or flush raises it (one line, by
    errors.writing), and re-raises it too, which printed a second, alarming traceback
    (tensorboard/summary/writer/event_file_writer.py, _AsyncWriterThread.run). Every other thread's exception goes
    to the hook that was there before."""

    def __init__(self):
        self.before = threading.excepthook
        threading.excepthook = self._hook

    def _hook(self, args) -> None:
        if type(args.thread).__module__ == "tensorboard.summary.writer.event_file_writer":
            return
        self.before(args)

    @contextmanager
    def closing_on_error(self):
        try:
            yield
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if threading.excepthook == self._hook:  # a hook set since stays
            threading.excepthook = self.before


def curves_figure(rows: list[dict[str, Any]], name: str):
    """He et al. 2015's figure (Fig. 6): training, validation and test error (%) against epoch (and the top-5 error
    where the run logs it), titled with the run's name (a matplotlib Figure, not drawn through pyplot: no global
    state)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    epochs = [r["epoch"] for r in rows]
    for key, label, style in (("train_acc", "train (augmented batches)", "--"), ("val_acc", "validation", "-."),
                              ("test_acc", "test", "-"), ("val_acc_top5", "validation, top-5", ":"),
                              ("test_acc_top5", "test, top-5", ":")):
        pts = [(e, 100 * (1 - r[key])) for e, r in zip(epochs, rows) if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), style, marker=".", ms=3, label=label)
    ax.set_title(f"{name}: error by epoch")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no 0.5 ticks on a short run
    ax.set_ylabel("error (%)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    return fig


def plot_curves(rows: list[dict[str, Any]], path: Path, name: str) -> None:
    """:func:`curves_figure` written to ``path`` (a PNG)."""
    fig = curves_figure(rows, name)
    with writing(path):
        fig.savefig(path, dpi=100)


# ----------------------------------------------------------------------------------------------------
# What produced a number: code version, torch version, device name. Every results row carries these.

_REPO = Path(__file__).resolve().parent.parent


def git_sha() -> str:
    """HEAD of the fastres checkout, with '-dirty' if the code or configs differ from it (results and docs
    do not count). What ``launch/device.sh prepare`` recorded in .device/git_sha, where .device/code_hash
    says it was recorded for the code now here (a GPU machine's copy of the working tree); else, where there
    is no .git, that record or 'unknown'. Only the checkout's own .git
    counts: a copy that happens to lie inside another repository must not report that one's HEAD."""
    recorded = _REPO / ".device" / "git_sha"
    recorded_code = _REPO / ".device" / "code_hash"
    if recorded.is_file() and recorded_code.is_file() and recorded_code.read_text().strip() == code_hash():
        # a GPU machine's copy may carry a stale .git of its own: what prepare recorded for exactly this code wins
        return recorded.read_text().strip()
    if not (_REPO / ".git").exists():
        return recorded.read_text().strip() if recorded.is_file() else "unknown"
    try:
        sha = subprocess.run(["git", "-C", str(_REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(_REPO), "status", "--porcelain", "--untracked-files=no", "--",
                                "fastres", "configs"], capture_output=True, text=True, timeout=10,
                               check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def short_sha(sha: str) -> str:
    """A git SHA as tables show it: 12 hex digits, keeping a '-dirty' mark."""
    return sha[:12] + ("-dirty" if sha.endswith("-dirty") else "")


def code_hash() -> str:
    """SHA-256 (first 16 hex digits) of every fastres source file: the code that trains, whatever the
    commit. A commit that only adds results keeps it, so finished runs stay reusable."""
    h = hashlib.sha256()
    pkg = _REPO / "fastres"
    for path in sorted(pkg.rglob("*.py")):
        h.update(str(path.relative_to(pkg)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model with its core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {model} ({os.cpu_count()} cores)"
