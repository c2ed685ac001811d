"""Fuzz the resume path: change one byte of a real checkpoint, resume, and count what happens.

    python tests/fuzz_checkpoint.py [SEED] [TRIALS]      (defaults 0, 300; about 2 minutes on 2 cores)

A tiny run (ResNet-8, synthetic data in the official layout) trains 2 epochs; each trial copies its
out_dir, changes one byte of checkpoint.pt (a third of the trials inside the pickle, a third anywhere, a
third in the zip's central directory) and resumes it with the same config. Every trial must end in exit 0
(the change hit bytes nothing reads) or exit 2 with one ``fastres: error:`` line; anything else is printed
and counted as bad, and the script exits 1. Trial 0 is the unchanged checkpoint (the control: exit 0).
Not part of the test suite (it is a measurement); tests/test_reliability.py holds one case of each kind.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import sys
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fastres import checkpoint, train  # noqa: E402
from fastres.data import cifar  # noqa: E402

from conftest import write_cifar  # noqa: E402


def main(seed: int, trials: int) -> int:
    cifar.PER_FILE = 100
    root = Path(tempfile.mkdtemp())
    data = write_cifar(root / "cifar-10-batches-py", per_file=100)
    work, base = root / "work", root / "base"
    args = [f"--data.dir={data}", f"--run.out_dir={work}", "--model.depth=8", "--optim.batch_size=50",
            "--run.epochs=2", "--data.loader=gpu", "--data.val_size=50"]
    with contextlib.redirect_stderr(io.StringIO()):
        assert train.cli(args) == 0
    shutil.copytree(work, base)
    good = (base / checkpoint.NAME).read_bytes()
    with zipfile.ZipFile(base / checkpoint.NAME) as z:
        pkl = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    pkl_start = pkl.header_offset + 30 + len(pkl.filename)  # past the local file header
    rng = np.random.default_rng(seed)
    outcomes, bad = Counter(), 0
    for t in range(trials):
        b = bytearray(good)
        region = int(rng.integers(0, 3))
        k = (pkl_start + int(rng.integers(0, pkl.compress_size)) if region == 0 else
             int(rng.integers(0, len(b))) if region == 1 else len(b) - 1 - int(rng.integers(0, 400)))
        value = int(rng.integers(0, 256))
        if t > 0:
            b[k] = value
        shutil.rmtree(work)
        shutil.copytree(base, work)
        (work / checkpoint.NAME).write_bytes(bytes(b))
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                rc = train.cli(args)
        except Exception as e:  # a traceback the user would have seen
            rc = f"{type(e).__name__}: {str(e)[:120]}"
        lines = [line for line in err.getvalue().splitlines() if line.startswith("fastres: error:")]
        ok = rc == 0 or (rc == 2 and len(lines) == 1)
        outcomes["resumed" if rc == 0 else "refused, one line" if ok else "bad"] += 1
        if not ok:
            bad += 1
            print(f"trial {t}: byte {k} -> {value}: {rc}", flush=True)
    print(f"seed {seed}, {trials} trials (trial 0 unchanged): {dict(outcomes)}")
    shutil.rmtree(root)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0, int(sys.argv[2]) if len(sys.argv) > 2 else 300))
