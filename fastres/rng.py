"""Seeds derived from (run seed, purpose, epoch or step): every random draw is a pure function of them.

Data order, augmentation and stochastic-depth decisions are drawn from generators seeded this way at the
start of each epoch (or step), not from one long stream. So they do not depend on the number of ranks or
workers, and a run resumed at an epoch boundary draws exactly what an uninterrupted run draws.
"""

from __future__ import annotations

import numpy as np
import torch

# Purposes: distinct streams for the same (seed, epoch).
AUGMENT = 1
STOCHASTIC_DEPTH = 2
LSUV = 3
EPOCH = 4  # the global torch RNG (dropout), reseeded per epoch and rank


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integer parts, well mixed (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def generator(*parts: int) -> torch.Generator:
    """A CPU torch.Generator seeded with :func:`derive_seed` of ``parts``."""
    return torch.Generator().manual_seed(derive_seed(*parts))
