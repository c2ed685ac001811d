"""Device-synchronized timing: what every number fastres reports is measured with."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class Timer:
    """Seconds between start() and stop(), device-synchronized (CUDA events on a GPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self.begin = torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.t = time.perf_counter()

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
