"""The measuring and study tools beside the trainer: bench (with profile, dispatch, scaling, cpuloaders, sharing),
stack, report, jpeg, cifar_folder (CIFAR-10 written as an image folder, to check the folder path against the pickle
path), resize_folder (a smaller copy of an image folder, for a CPU's decoders).

They build and train through the core (fastres.build, fastres.train); the core never imports them.
Here: what their command lines share. :func:`parser` makes an argparse parser whose mistakes are one
ConfigError (fastres.errors.entry prints it as one line ``fastres: error: ...`` and exits 2) and whose --help
shows the module docstring and each option's default; :func:`whole_number`, :func:`whole_numbers` and
:func:`names` convert flag values; :func:`config_overrides` hands what the parser left (``--section.key=value``)
to fastres.config.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from fastres.config import ConfigError, parse_args
from fastres.errors import entry

OVERRIDES = ("Config overrides: --section.key=value (or --section.key value) among the options, applied on top of\n"
             "--config; every key, its type and default: python -m fastres.train --help")


class Help(argparse.RawDescriptionHelpFormatter):
    """The description as written (a module docstring), and each option's default after its help."""

    def __init__(self, prog: str, **kwargs):
        kwargs.setdefault("width", 120)  # the docstrings' width, not the terminal's
        kwargs.setdefault("max_help_position", 30)
        super().__init__(prog, **kwargs)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS \
                or "(default" in text:  # a switch, or a default the help words itself ("the stack file's")
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose every mistake is one ConfigError naming the flag, not usage text and an exit."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments: "):  # name what it does take: the usage, on one line
            raise ConfigError(f"unknown argument(s) {message.split(': ', 1)[1]}; usage: {usage(self)}")
        raise ConfigError(f"{message.removeprefix('argument ')} (see {self.prog} --help)")


def parser(prog: str, doc: str | None, *, overrides: bool = False) -> Parser:
    """A tool's parser: ``prog`` as typed (``python -m fastres.tools.X``), ``doc`` (its module docstring) as the
    description; ``overrides``: the tool takes config overrides too, which the help then says."""
    return Parser(prog=prog, description=doc, epilog=OVERRIDES if overrides else None, formatter_class=Help,
                  allow_abbrev=False)  # no prefixes: --lab is a mistake, not --label


def usage(p: argparse.ArgumentParser) -> str:
    """``p``'s usage on one line, without the leading "usage: "."""
    return " ".join(p.format_usage().split()).removeprefix("usage: ")


def config_overrides(p: argparse.ArgumentParser, rest: list[str]) -> list[str]:
    """The ``--section.key=value`` overrides among ``rest`` (what ``p.parse_known_args`` left), as
    fastres.config.parse_args reads them; a ConfigError for a flag of no section (a typo, another subcommand's
    flag) naming the flags ``p`` takes, and fastres.config's one for anything else."""
    for arg in rest:
        name = arg.split("=", 1)[0]
        if name.startswith("--") and "." not in name:
            raise ConfigError(f"{name} is not a flag of {p.prog}; usage: {usage(p)} [--section.key=value ...]")
    return parse_args(rest)[1]


def whole_number(low: int = 0) -> Callable[[str], int]:
    """argparse ``type``: a flag's value as an int >= ``low``; the error says which values are valid."""
    def convert(value: str) -> int:
        if not (value.isascii() and value.isdigit()) or int(value) < low:
            raise argparse.ArgumentTypeError(f"{value!r} must be a whole number >= {low}")
        return int(value)
    return convert


def whole_numbers(low: int = 0) -> Callable[[str], list[int]]:
    """argparse ``type``: a comma list of whole numbers >= ``low`` ("1,2,4")."""
    one = whole_number(low)

    def convert(value: str) -> list[int]:
        return [one(v) for v in value.split(",")]
    return convert


def names(valid: Sequence[str] | None = None) -> Callable[[str], list[str]]:
    """argparse ``type``: a comma list of names, empty items dropped; each one of ``valid`` when given."""
    def convert(value: str) -> list[str]:
        given = [v for v in value.split(",") if v]
        unknown = [v for v in given if valid is not None and v not in valid]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)} (valid: {', '.join(valid)})")
        return given
    return convert


def tool_cli(main: Callable[[list[str]], object], command_line: Callable[[], argparse.ArgumentParser],
             argv: list[str] | None = None) -> int:
    """A tool's command: ``main(argv)`` under fastres.errors.entry (one line and exit 2 for a mistake, --help from
    ``command_line()``); main's return value is the tool's, for callers in Python, not the exit code."""
    def body(args: list[str]) -> None:
        main(args)
    return entry(body, argv, command_line().format_help())

