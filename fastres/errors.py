"""The one exception type for mistakes a user can make (bad config, bad data, bad launch), and the entry
point wrapper that turns it into one line ``fastres: error: <cause and fix>`` and exit code 2, never a
traceback. Anything else that escapes is a bug in fastres and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A mistake the user can fix; the message names the cause and the fix, on one line.

    Under torchrun every rank meets the same mistake, so only rank 0 prints it; ``per_rank=True`` marks one
    that can differ between ranks (a device missing on one node), which each rank prints.
    """

    def __init__(self, message: str, per_rank: bool = False):
        super().__init__(message)
        self.per_rank = per_rank


def entry(body: Callable[[list[str]], int | None], argv: list[str] | None, usage: str) -> int:
    """Run a command-line ``body(argv)``: ``--help`` prints ``usage``; a UserError becomes one line, exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(usage)
        return 0
    try:
        return body(argv) or 0
    except UserError as e:
        from fastres.distributed import env_rank  # here: distributed imports this module

        rank = env_rank()  # under torchrun: rank 0 speaks for all, see UserError
        if rank == 0 or e.per_rank:
            print(f"fastres: error: {f'[rank {rank}] ' if rank else ''}{e}", file=sys.stderr)
        return 2
