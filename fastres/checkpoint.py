"""Checkpoints: written atomically, read with ``weights_only=True``.

A save goes to a temporary file in the same directory, is fsynced, then renamed over the old one, so a
crash mid-save leaves the previous checkpoint whole. Loading never unpickles code: the state holds only
tensors and plain Python values (RNG states included, converted where needed).
"""

from __future__ import annotations

import io
import os
import pickle
import random
import time
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastres import rng
from fastres.errors import UserError, one_line, writing
from fastres.techniques import Technique

NAME = "checkpoint.pt"


def save(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` so that ``path`` is always a whole checkpoint: the old one or the new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    kept = "the previous checkpoint is kept" if path.exists() else "no checkpoint was written"
    buf = io.BytesIO()
    try:
        with writing(path, kept=kept):
            torch.save(state, buf)  # in memory first: the disk then sees one write, of a known size
        data = buf.getbuffer()
        with writing(path, needs=data.nbytes, kept=kept):
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except UserError:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


PARTS = ("model", "optimizer", "scaler", "rng", "progress", "config")  # what train saves, each a dict
_FIX = "move it away to start over, or use another --run.out_dir"


def load(path: str | os.PathLike, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint's state: a dict of the :data:`PARTS`; a UserError if it cannot be read or lacks one."""
    try:
        # torch's zip records carry CRC-32s that torch.load does not check: a flipped bit in a weight would
        # load silently. zipfile checks them (about 4 ms for ResNet-20's 0.6 MB).
        with zipfile.ZipFile(path) as z:
            damaged = z.testzip()
        state = torch.load(path, map_location=map_location, weights_only=True) if damaged is None else None
    except Exception as e:  # truncated, not a zip, foreign objects refused by weights_only, unreadable, ...
        reason = "it holds objects other than tensors and plain values" if isinstance(
            e, pickle.UnpicklingError) else (str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
        raise UserError(f"checkpoint {path} cannot be read ({reason}): {_FIX}") from None
    if damaged is not None:
        raise UserError(f"checkpoint {path} is damaged ({damaged} fails its CRC-32 check): {_FIX}")
    bad = [k for k in PARTS if not isinstance(state.get(k), dict)] if isinstance(state, dict) else list(PARTS)
    if bad:
        raise UserError(f"checkpoint {path} is not a whole fastres checkpoint ({', '.join(bad)} missing or "
                        f"damaged): {_FIX}")
    return state


_NUMBER = (int, float)
_ADDED = ("epoch_loss_sum", "epoch_correct", "epoch_bad_step", "data_wait_s")  # fields newer checkpoints carry
_LAST_ROW = ("epoch", "train_time_s", "test_acc", "val_acc")  # what a resumed run reads of the last eval row


@dataclass
class Progress:
    """Where a run is: what the loop has done and measured so far, saved in every checkpoint."""
    epoch: int = 0  # epochs finished
    step: int = 0  # optimizer steps taken
    train_time_s: float = 0.0  # summed timed epochs (see fastres.train)
    eval_time_s: float = 0.0
    time_to_target_s: float | None = None
    time_to_target_with_eval_s: float | None = None
    epochs_to_target: int | None = None
    t0: float = field(default_factory=time.time)  # the run's start, wall clock (TensorBoard's time axis)
    last: dict[str, Any] | None = None  # the last evaluation's metrics row
    # a checkpoint inside an epoch: the epoch's sums so far, over every rank (then the steps past `epoch` epochs)
    epoch_loss_sum: float = 0.0
    epoch_correct: int = 0
    epoch_bad_step: int = -1
    data_wait_s: float = 0.0  # host seconds the loop waited for the loader, summed (this rank's; fastres.train)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Take ``saved``'s values; KeyError or TypeError naming the first key that is missing or of another
        type than the loop reads."""
        saved = {**{k: getattr(Progress(), k) for k in _ADDED}, **saved}  # written before those existed
        for f in fields(self):
            if f.name not in saved:
                raise KeyError(f"progress.{f.name}")
            value = saved[f.name]
            if f.name in ("epoch", "step", "epoch_correct"):
                ok = isinstance(value, int) and value >= 0
            elif f.name == "epoch_bad_step":
                ok = isinstance(value, int) and value >= -1
            elif f.name == "last":
                ok = value is None or (isinstance(value, dict) and all(
                    k in value and (value[k] is None or isinstance(value[k], _NUMBER)) for k in _LAST_ROW))
            else:
                ok = isinstance(value, _NUMBER) or (f.default is None and value is None)
            if not ok:
                raise TypeError(f"progress.{f.name} is {value!r:.40}")
        for f in fields(self):
            setattr(self, f.name, saved[f.name])

    def reached(self, epoch: int) -> None:
        """The evaluation after ``epoch`` epochs is the first at or above the target: the times to target."""
        self.time_to_target_s, self.epochs_to_target = self.train_time_s, epoch
        self.time_to_target_with_eval_s = self.train_time_s + self.eval_time_s


def restore_progress(path: Path, state: dict[str, Any]) -> Progress:
    """The :class:`Progress` in ``state`` (from :func:`load`); a UserError if it does not fit."""
    progress = Progress()
    with _fitting(path):
        progress.load_state_dict(state["progress"])
    return progress


def restore(path: Path, state: dict[str, Any], model: torch.nn.Module, opt: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler, techniques: Sequence[Technique] = ()) -> None:
    """Load ``state`` (from :func:`load`) into the run's objects, each technique's part and the global RNGs; a
    UserError if a part is missing or does not fit them (a damaged file whose zip still reads: a tensor of another
    shape, a value of another type)."""
    with _fitting(path):
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        for technique in techniques:
            if technique.part:
                if not isinstance(state.get(technique.part), dict):
                    raise TypeError(f"its {technique.part} part is missing or damaged")
                technique.load_state_dict(state[technique.part])
        set_rng_state(state["rng"])


def restore_rng_ranks(path: Path, state: dict[str, Any], rank: int, world: int) -> None:
    """This rank's random streams from a checkpoint written inside an epoch (its "rng_ranks"): the saved ones at the
    world that wrote it (the epoch goes on exactly), else streams derived from (seed, epoch, step, rank).

    At another world nothing per rank carries over: BatchNorm normalizes over the new per-rank shares of the same
    global batch, so the run is not the uninterrupted one at either world anyway. Re-derived streams keep it a pure
    function of the checkpoint and the new world (dropout is the only per-rank draw: rng.EPOCH); refusing would
    strand a run whose node died mid-epoch, and restarting the epoch would train its first batches twice.
    A UserError if the part is damaged."""
    ranks = state.get("rng_ranks")
    if not isinstance(ranks, list) or not ranks:
        raise UserError(f"checkpoint {path} was written inside an epoch but holds no random streams (damaged): "
                        f"{_FIX}")
    with _fitting(path):
        if len(ranks) == world:
            set_rng_state(ranks[rank])
        else:
            run, progress = state["config"]["run"], state["progress"]
            torch.manual_seed(rng.derive_seed(run["seed"], rng.EPOCH, progress["epoch"], rank, progress["step"]))


def written_at(state: dict[str, Any]) -> int | None:
    """The number of ranks that wrote ``state`` (None for a checkpoint from before it was recorded, at an epoch's
    end)."""
    world = state.get("world")
    if isinstance(world, int) and world >= 1:
        return world
    ranks = state.get("rng_ranks")
    return len(ranks) if isinstance(ranks, list) and ranks else None


def world_note(state: dict[str, Any] | None, world: int) -> str | None:
    """The log's line when a run resumes at another number of ranks than wrote its checkpoint (else None)."""
    before = written_at(state) if state is not None else None
    if before is None or before == world:
        return None
    return f"resuming at world {world} (checkpoint written at world {before})"


def same_data(path: Path, state: dict[str, Any], data: dict[str, int]) -> None:
    """A UserError when the data the checkpoint was trained on (its "data": training images and classes) is not the
    data this start found: files added to or removed from a folder, not a damaged checkpoint."""
    before = state.get("data")
    if not isinstance(before, dict) or before == data:
        return
    was = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in before.items())
    now = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in data.items())
    raise UserError(f"the data changed since {path} was written (it trained on {was}; the data now has {now}): "
                    "put the data back as it was to resume, or train on it from the start with another "
                    "--run.out_dir") from None


@contextmanager
def _fitting(path: Path) -> Iterator[None]:
    """A damaged part whose zip still reads (a tensor of another shape, a value of another type) as a
    one-line UserError."""
    try:
        yield
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError, OverflowError) as e:
        why = one_line(e) or type(e).__name__
        raise UserError(f"checkpoint {path} does not fit this run ({why}): {_FIX}") from None


def rng_state() -> dict[str, Any]:
    """Every global RNG (python, numpy, torch CPU and CUDA) as weights_only-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                       "cached": cached}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def gather(model: torch.nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, progress: Progress,
           config: dict[str, Any], techniques: Sequence[Technique] = (),
           rng_ranks: list[dict[str, Any]] | None = None, data: dict[str, int] | None = None) -> dict[str, Any]:
    """What :func:`save` writes for a run: every :data:`PARTS`, each technique's part ("ema": the weight average,
    "lookahead": the slow weights, ...), "rng_ranks" (every rank's RNG states, for a checkpoint inside an epoch,
    where dropout's streams go on), and "world", the number of ranks training (a resume at another world says so:
    :func:`world_note`)."""
    extra: dict[str, Any] = {"world": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1}
    if data is not None:  # what the run trains on: a folder that changed is named as such at resume (same_data)
        extra["data"] = data
    extra.update({t.part: t.state_dict() for t in techniques if t.part})
    if rng_ranks is not None:
        extra["rng_ranks"] = rng_ranks
    return dict(model=model.state_dict(), optimizer=opt.state_dict(), scaler=scaler.state_dict(), rng=rng_state(),
                progress=progress.state_dict(), config=config, **extra)
