"""The one exception type for mistakes a user can make (bad config, bad data, bad launch).

Entry points catch it and print one line ``fastres: error: <cause and fix>`` with a non-zero exit, never a
traceback. Anything else that escapes is a bug in fastres and keeps its traceback.
"""


class UserError(Exception):
    """A mistake the user can fix; the message names the cause and the fix, on one line.

    Under torchrun every rank meets the same mistake, so only rank 0 prints it; ``per_rank=True`` marks one
    that can differ between ranks (a device missing on one node), which each rank prints.
    """

    def __init__(self, message: str, per_rank: bool = False):
        super().__init__(message)
        self.per_rank = per_rank
