"""When the training loop stops between two steps: a signal, or a checkpoint that is due inside an epoch.

SIGINT and SIGTERM (Ctrl-C; SLURM, Kubernetes and torchrun's agent stop jobs with SIGTERM) set a flag: the loop
finishes its step, writes a checkpoint at that step and exits 128 + the signal. A second one exits at once
(the previous checkpoint is whole: saves are atomic). With one rank the loop reads the flags every step, a host
value; with several, every CHECK_EVERY steps the ranks agree on them in one small all-reduce (a host sync every
CHECK_EVERY steps, the only one in the loop), so every rank stops after the same step.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import torch

from fastres import distributed
from fastres.timing import sync_allowed

CHECK_EVERY = 16  # steps between the ranks' agreements (world > 1)
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Pauses:
    def __init__(self, every_s: float, world: int, device: torch.device, is_main: bool):
        self.every_s, self.world, self.device, self.is_main = every_s, world, device, is_main
        self.signum: int | None = None  # the first signal received
        self.last_save = time.monotonic()
        self.old = {}
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self.old[s] = signal.signal(s, self._received)

    def _received(self, signum: int, frame) -> None:
        if self.signum is not None:
            os._exit(128 + signum)  # the second: at once
        self.signum = signum

    def _checkpoint_due(self) -> bool:
        return bool(self.every_s) and time.monotonic() - self.last_save >= self.every_s

    def due(self, step: int) -> bool:
        """After ``step`` steps: stop here (a signal) or checkpoint here (run.checkpoint_every_s)? The same answer on
        every rank."""
        if self.world == 1:
            return self.signum is not None or self._checkpoint_due()
        if step % CHECK_EVERY:
            return False
        return any(self.agree())

    def agree(self) -> tuple[int, int]:
        """(the signal any rank received or 0, whether rank 0's clock says a checkpoint is due), on every rank."""
        with sync_allowed(self.device):
            signum, due = distributed.agree([self.signum or 0, int(self.is_main and self._checkpoint_due())],
                                            self.device)
        if signum and self.signum is None:
            self.signum = signum  # another rank's: stop with it
        return signum, due

    def stopping(self) -> bool:
        """At an epoch's end: has any rank received a signal?"""
        return bool(self.agree()[0]) if self.world > 1 else self.signum is not None

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def close(self) -> None:
        for s, handler in self.old.items():
            signal.signal(s, handler)
