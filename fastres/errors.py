"""The one exception type for mistakes a user can make (bad config, bad data, bad launch).

Entry points catch it and print one line ``fastres: error: <cause and fix>`` with a non-zero exit, never a
traceback. Anything else that escapes is a bug in fastres and keeps its traceback.
"""


class UserError(Exception):
    """A mistake the user can fix; the message names the cause and the fix, on one line."""
