"""Command-line helpers shared by every fastres command: the entry wrapper and argument parsing.

``entry`` turns a :class:`~fastres.errors.UserError` into one line ``fastres: error: <cause and fix>`` and exit
code 2, never a traceback; anything else that escapes is a bug in fastres and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from fastres.config import ConfigError
from fastres.distributed import env_rank
from fastres.errors import Interrupted, UserError


def entry(body: Callable[[list[str]], int | None], argv: list[str] | None, usage: str) -> int:
    """Run a command-line ``body(argv)``: ``--help`` prints ``usage``; a UserError becomes one line, exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(usage)
        return 0
    try:
        return body(argv) or 0
    except UserError as e:
        rank = env_rank()  # under torchrun: rank 0 speaks for all, see UserError
        if rank == 0 or e.per_rank:
            what = "" if isinstance(e, Interrupted) else "error: "
            print(f"fastres: {what}{f'[rank {rank}] ' if rank else ''}{e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """Split argv into (--config path, overrides). ``--section.key value`` is accepted too."""
    path, overrides, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c"):
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a file, e.g. --config configs/smoke.toml")
            path, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg.startswith("--") and "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            overrides.append(f"{arg}={argv[i + 1]}")
            i += 1
        elif arg.startswith("--"):
            overrides.append(arg)
        else:
            raise ConfigError(f"unexpected argument {arg!r}: use --config FILE and --section.key=value")
        i += 1
    return path, overrides


def take_flag(argv: list[str], flag: str, default: str) -> str:
    """Remove ``flag VALUE`` or ``flag=VALUE`` from argv; its value, or ``default`` when absent."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
            del argv[i:i + 2]
            return value
        if arg.startswith(flag + "="):
            del argv[i]
            return arg.split("=", 1)[1]
    return default


def take_switch(argv: list[str], flag: str) -> bool:
    """Remove every bare ``flag`` from argv; whether there was one."""
    found = flag in argv
    argv[:] = [a for a in argv if a != flag]
    return found


def whole_number(flag: str, value: str, low: int = 0) -> int:
    """A command-line flag's value as an int >= ``low``; ConfigError naming the flag otherwise."""
    if not value.isdigit() or int(value) < low:
        raise ConfigError(f"{flag} {value!r} must be a whole number >= {low}")
    return int(value)
