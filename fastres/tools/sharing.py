"""A training process beside another busy program: ``python -m fastres.tools.bench sharing [--config FILE]``.

Runs ``python -m fastres.train`` (the recipe, default configs/smoke.toml on synthetic data, so no data set is
needed) as a user would, four times: at torch's default intra-op threads (one a core, run.threads set to the core
count) and at fastres's choice (run.threads = 0), each alone and beside a busy program (one process spinning on a
core, started first, as another job would be). Each row: the run's img/s (its summary), the threads line it logged,
and beside/alone. What the smoke run measures is the CPU's training speed: the model's convolutions, where OpenMP's
threads wait for one another at every parallel region and collapse when a core is taken.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from fastres.distributed import cores
from fastres.errors import UserError

BUSY = "while True: pass"  # a program that keeps one core busy


def run_once(config: Path, overrides: list[str], out: Path, busy: bool) -> tuple[float, str]:
    """(img/s, the logged threads line) of one training run, beside a busy program or alone."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the process chooses, as a user's
    spinner = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
    try:
        r = subprocess.run([sys.executable, "-m", "fastres.train", "--config", str(config), *overrides,
                            f"--run.out_dir={out}", "--run.name=sharing"], env=env, capture_output=True, text=True)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    if r.returncode:
        raise UserError(f"the measured run failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
    line = next((ln.removeprefix("fastres: ") for ln in r.stderr.splitlines() if "intra-op threads" in ln), "")
    return json.loads((out / "summary.json").read_text())["img_per_s"], line


def measure(config: Path, overrides: list[str]) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, threads in (("torch's default (a thread a core)", cores()), ("fastres's choice", 0)):
            alone, line = run_once(config, [*overrides, f"--run.threads={threads}"], Path(tmp) / f"{threads}a", False)
            beside, line_b = run_once(config, [*overrides, f"--run.threads={threads}"], Path(tmp) / f"{threads}b",
                                      True)
            rows.append(dict(threads=label, alone=alone, beside=beside, ratio=beside / alone, line_alone=line,
                             line_beside=line_b, cores=cores()))
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| threads | alone img/s | beside a busy program img/s | beside / alone | chosen (alone; beside) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['threads']} | {r['alone']:,.0f} | {r['beside']:,.0f} | {r['ratio']:.0%} | {r['line_alone']}; "
              f"{r['line_beside']} |" for r in rows]
    return "\n".join(lines) + "\n"
