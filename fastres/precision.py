"""What precision.amp and precision.channels_last mean for tensors: worked out here once, used everywhere."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastres.config import PrecisionCfg

AMP_DTYPES = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    amp_dtype: torch.dtype | None  # autocast's dtype; None: no autocast
    channels_last: bool

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's input batches."""
        return self.amp_dtype or torch.float32

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def precision(cfg: PrecisionCfg) -> Precision:
    return Precision(amp_dtype=AMP_DTYPES[cfg.amp], channels_last=cfg.channels_last)
