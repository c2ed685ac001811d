"""The one exception type for mistakes a user can make (bad config, bad data, bad launch), and reading a JSON
file fastres wrote without trusting it. :func:`entry` turns a UserError into one line and exit code 2.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class UserError(Exception):
    """A mistake the user can fix; the message names the cause and the fix, on one line.

    Under torchrun every rank meets the same mistake, so only rank 0 prints it; ``per_rank=True`` marks one
    that can differ between ranks (a device missing on one node), which each rank prints.
    """

    def __init__(self, message: str, per_rank: bool = False):
        super().__init__(message)
        self.per_rank = per_rank


class Interrupted(UserError):
    """A run stopped by SIGINT or SIGTERM after saving a checkpoint: one line and exit code 128 + the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def _free(path: Path) -> str:
    """The room left on ``path``'s disk, as a user reads it ("" when even that cannot be found)."""
    for parent in (path, *path.parents):
        try:
            return f"{shutil.disk_usage(parent).free / 2**20:,.1f} MB free there"
        except OSError:
            continue
    return ""


def write_failed(path: str | os.PathLike, why: str, needs: int | None = None, kept: str = "") -> UserError:
    """The one line for a write that failed: the file, why, the room it needed and has, what to do."""
    path = Path(path)
    room = ", ".join(filter(None, [f"it needed {needs / 2**20:,.1f} MB" if needs else "", _free(path)]))
    return UserError(f"cannot write {path} ({why}{'; ' + room if room else ''}): free space (or fix permissions) "
                     f"there and run the same command again{'; ' + kept if kept else ''}")


@contextmanager
def writing(path: str | os.PathLike, needs: int | None = None, kept: str = "") -> Iterator[None]:
    """Inside, a failed write of ``path`` (a full disk, a quota, permissions; torch's and tensorboard's own
    errors for a full disk included) is :func:`write_failed`'s one line, not a traceback."""
    try:
        yield
    except OSError as e:
        raise write_failed(path, e.strerror or one_line(e), needs, kept) from None
    except RuntimeError as e:  # torch's zip writer on a full disk: "[enforce fail at inline_container.cc] ..."
        if "inline_container" not in str(e) and "write" not in str(e).lower():
            raise
        raise write_failed(path, one_line(e, 120), needs, kept) from None


def write_text(path: str | os.PathLike, text: str) -> None:
    """``Path(path).write_text(text)``, a failure being :func:`write_failed`'s one line; SIGINT and SIGTERM wait
    until the file is whole (a signal during start-up stops the run at once)."""
    with writing(path, needs=len(text.encode())), signals_held():
        Path(path).write_text(text)


@contextmanager
def signals_held() -> Iterator[None]:
    """Inside, SIGINT and SIGTERM are held back (delivered on leaving), in the main thread; elsewhere nothing."""
    held = {signal.SIGINT, signal.SIGTERM}
    before = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def one_line(e: BaseException, limit: int = 200) -> str:
    """``e``'s message folded onto one line (some, the unpickler's among them, span lines) and cut to
    ``limit`` characters."""
    return " ".join(str(e).split())[:limit]


def shown(path: str | os.PathLike) -> str:
    """A path as a one-line message names it: as it is when printable, else an escaped bytes literal in quotes
    ('train/cat/a\\nb.jpg', 'caf\\xe9.jpg'), so a newline or a name that is not UTF-8 names one file, unambiguously."""
    s = os.fspath(path)
    s = os.fsdecode(s) if isinstance(s, bytes) else s
    return s if s.isprintable() else repr(os.fsencode(s))[1:]


def read_json(path: Path, kind: type = dict, what: str = "file") -> Any:
    """The JSON value in ``path``, of type ``kind``; a UserError naming the file if it cannot be read, is not
    JSON (a crash mid-write, a hand edit) or holds something else. Nothing is written either way."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e})") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise UserError(f"{path} is not valid JSON ({one_line(e, 120)}): fix or move it; "
                        f"nothing was written") from None
    if not isinstance(value, kind):
        raise UserError(f"{path} holds a JSON {type(value).__name__}, not the {kind.__name__} a {what} is: "
                        f"fix or move it; nothing was written")
    return value


def entry(body: Callable[[list[str]], int | None], argv: list[str] | None, usage: str) -> int:
    """Run a command-line ``body(argv)``: ``--help`` prints ``usage``; a UserError becomes one line, exit 2.

    Under torchrun the line also goes to the rank's TORCHELASTIC_ERROR_FILE, so torchrun's closing report shows it
    as the failure's "traceback" instead of "To enable traceback see: ...". A reader of ``--help`` that stops early
    (``| head``) ends it quietly."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        try:
            print(usage, flush=True)
        except BrokenPipeError:  # the reader closed stdout (| head): what they read was all they wanted
            _stdout_to_devnull()
        return 0
    try:
        return body(argv) or 0
    except UserError as e:
        return say(e)


def say(e: UserError) -> int:
    """``e`` as the command line reports it: one line on stderr (rank 0's under torchrun, every rank's for a
    per-rank error) and in torchrun's error file; the exit code (2, or 128 + the signal for an interruption)."""
    rank = int(os.environ.get("RANK", "0"))  # under torchrun: rank 0 speaks for all, see UserError
    what = "" if isinstance(e, Interrupted) else "error: "
    line = f"fastres: {what}{f'[rank {rank}] ' if rank and e.per_rank else ''}{e}"
    if rank == 0 or e.per_rank:
        print(line, file=sys.stderr, flush=True)
    _to_torchrun(line)
    return getattr(e, "exit_code", 2)


def _stdout_to_devnull() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush at exit finds no closed pipe (the Python docs'
    recipe: https://docs.python.org/3/library/signal.html#note-on-sigpipe)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _to_torchrun(line: str) -> None:
    """``line`` as torchrun's error file for this rank, in the JSON that torch's ErrorHandler.record_exception
    writes (torch/distributed/elastic/multiprocessing/errors/error_handler.py); without py_callstack, the report
    shows the message itself. Nothing outside torchrun (no TORCHELASTIC_ERROR_FILE)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": line, "extraInfo": {"timestamp": str(int(time.time()))}}}
    try:
        Path(path).write_text(json.dumps(data))
    except OSError:
        pass  # the line is on stderr already (rank 0); torchrun then says "To enable traceback see ..."
