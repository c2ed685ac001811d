#!/usr/bin/env python3
"""The path from the command line to the first optimizer update: every fastres function a tiny run calls on the way.

    python3 dev/path_to_update.py [--list] [--section.key=value ...]    # e.g. --optim.ema_decay=0.9

Runs ``python -m fastres.train``'s entry point on a few synthetic CIFAR-sized images on the CPU (a temporary run
directory) under a profiler and stops at the first call of torch's ``Optimizer.step``. Prints how many distinct
fastres functions and methods ran before it (comprehensions and lambdas not counted) and in how many files:
a measure of what a reader follows from ``python -m fastres.train`` to ``optimizer.step()``. ``--list`` names them.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--data.source=synthetic", "--data.subset=100", "--data.test_subset=50", "--model.depth=8",
        "--optim.batch_size=50", "--run.epochs=1", "--data.loader=gpu", "--run.device=cpu", "--log.every_steps=0"]
ANONYMOUS = ("<lambda>", "<genexpr>", "<listcomp>", "<dictcomp>", "<setcomp>")


class _Reached(BaseException):
    """Raised at the first optimizer step: the path ends there (a BaseException: nothing on the path catches it)."""


def path_to_update(overrides: list[str]) -> list[tuple[str, str]]:
    """(file relative to the repository, qualified name) of each fastres function called before the first optimizer
    step, in first-call order."""
    sys.path.insert(0, str(ROOT))
    import torch.optim.optimizer  # noqa: F401 - the file whose step() ends the path

    from fastres import train
    package, seen = str(ROOT / "fastres"), {}

    def profile(frame, event, arg):
        if event != "call":
            return
        code = frame.f_code
        if code.co_filename.startswith(package) and "/tools/" not in code.co_filename:
            seen.setdefault((str(Path(code.co_filename).relative_to(ROOT)), code.co_qualname), None)
        elif code.co_name == "step" and code.co_filename.endswith(("torch/optim/sgd.py", "torch/optim/optimizer.py")):
            raise _Reached
    with tempfile.TemporaryDirectory() as out:
        sys.setprofile(profile)
        try:
            train.cli([*TINY, f"--run.out_dir={out}", *overrides])
        except _Reached:
            pass
        finally:
            sys.setprofile(None)
    return [k for k in seen if not any(a in k[1] for a in ANONYMOUS)]


def main(argv: list[str]) -> int:
    listing = "--list" in argv
    names = path_to_update([a for a in argv if a != "--list"])
    if not names:
        print("path_to_update: the run ended before any optimizer step", file=sys.stderr)
        return 1
    print(f"{len(names)} fastres functions in {len({f for f, _ in names})} files before the first optimizer.step()")
    if listing:
        print("\n".join(f"  {f}: {q}" for f, q in names))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
