"""The measuring and study tools beside the trainer: bench (with profile, dispatch, scaling), stack, report.

They build and train through the core (fastres.build, fastres.train); the core never imports them.
Here: the small argument helpers their command lines share.
"""

from __future__ import annotations

from fastres.config import ConfigError


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
