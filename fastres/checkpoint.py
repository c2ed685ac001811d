"""Checkpoints: written atomically, read with ``weights_only=True``.

A save goes to a temporary file in the same directory, is fsynced, then renamed over the old one, so a
crash mid-save leaves the previous checkpoint whole. Loading never unpickles code: the state holds only
tensors and plain Python values (RNG states included, converted where needed).
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastres.errors import UserError

NAME = "checkpoint.pt"


def save(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` so that ``path`` is always a whole checkpoint: the old one or the new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        kept = "the previous checkpoint is kept" if path.exists() else "no checkpoint was written"
        raise UserError(f"cannot write checkpoint {path} ({e.strerror or e}): free space or fix permissions "
                        f"there and run the same command again; {kept}") from None
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load(path: str | os.PathLike, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, not a zip, foreign objects refused by weights_only, unreadable, ...
        reason = "it holds objects other than tensors and plain values" if isinstance(
            e, pickle.UnpicklingError) else (str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
        raise UserError(f"checkpoint {path} cannot be read ({reason}): move it away to start over, or use "
                        "another --run.out_dir") from None


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
