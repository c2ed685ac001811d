"""Run every stacked combination of techniques: ``python -m fastres.tools.stack --config configs/stack.toml``.

A stack file names a base config and rows. ``[[ladder]]`` rows add their ``set`` keys on top of the previous
ladder row (or of the row named by ``from``); ``[[alone]]`` rows add theirs to the first ladder row, the
baseline (as the 2017 "Speeding up ResNet training" study's Table 1 does). ``nproc`` is the number of
processes (GPUs when ``device = "cuda"``), inherited like the keys. Every row is a fixed recipe, written down
before anything runs.

Each row runs ``seeds`` times (run.seed = 0, 1, ...) as ``fastres.train`` in its own process (under torchrun
when nproc > 1), in ``<runs_dir>/<row>/seed<k>/``. A run whose summary.json carries the same config and the
same code hash (a hash of the fastres sources, so committing results does not invalidate it) is skipped,
and an interrupted run continues from its checkpoint: a ladder can be finished over several sittings, each
bounded by ``--budget-s``. A row needing more GPUs than the machine has is listed as "needs N GPUs" and never
run or estimated. At the end the report (fastres.tools.report) is rebuilt from the runs' summaries and metrics.

    python -m fastres.tools.stack --config configs/stack.toml [--out DIR] [--runs DIR] [--budget-s SECONDS]
        [--only ROW,ROW] [--seeds N] [--device cpu|cuda] [--dry-run] [--section.key=value ...]

``--device`` replaces the stack file's device (``cpu``: every row on the CPU, e.g. to rehearse a GPU ladder).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastres import config, log
from fastres.config import RESUME_MAY_DIFFER, ConfigError
from fastres.errors import UserError, entry, read_json, write_text, writing
from fastres.log import SUMMARY
from fastres.tools import Parser, config_overrides, names, parser, whole_number
from fastres.tools.report import MANIFEST, MANIFEST_ROW_KEYS, build_report

RUN_CONFIG = "stack-config.toml"
RUN_MARK = "stack-run.json"  # the code hash a run was started with


@dataclass
class Row:
    name: str
    group: str  # "ladder" or "alone"
    values: dict[str, Any]  # every key the row sets on the base config, inherited ones included
    nproc: int = 1
    seeds: int = 1
    note: str = ""
    slug: str = ""
    status: str = "pending"
    runs: list[str] = field(default_factory=list)


@dataclass
class Stack:
    name: str
    base: Path
    device: str
    runs_dir: Path
    out: Path
    rows: list[Row]
    report: str = "stack"  # "stack": the speed/accuracy table; "depths": the paper's Table 6


def slugify(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("+", " plus ")).strip("-")
    return slug or "row"


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"depth": 56}} and {"model.depth": 56} both give {"model.depth": 56}."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


_STACK_KEYS = {"name", "base", "device", "seeds", "runs_dir", "out", "report"}
_ROW_KEYS = {"name", "set", "from", "nproc", "seeds", "note"}


def load_stack(path: str | os.PathLike, seeds: int | None = None) -> Stack:
    """Parse a stack file and resolve each row's full set of keys; ConfigError naming the row if wrong."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"stack file {path} not found: pass an existing file to --config")
    data = config.parse_toml(path)
    unknown = set(data) - {"stack", "ladder", "alone"}
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {sorted(unknown)} (valid: [stack], [[ladder]], [[alone]])")
    head = data.get("stack", {})
    if set(head) - _STACK_KEYS:
        raise ConfigError(f"{path}: unknown key(s) {sorted(set(head) - _STACK_KEYS)} in [stack] "
                          f"(valid: {', '.join(sorted(_STACK_KEYS))})")
    if head.get("device", "cuda") not in ("cuda", "cpu"):
        raise ConfigError(f"{path}: stack.device = {head['device']!r} is not one of: cuda, cpu")
    if head.get("report", "stack") not in ("stack", "depths"):
        raise ConfigError(f"{path}: stack.report = {head['report']!r} is not one of: stack, depths")
    base = path.parent / head.get("base", "baseline.toml")
    default_seeds = seeds or int(head.get("seeds", 1))
    rows: list[Row] = []
    by_name: dict[str, Row] = {}
    if not data.get("ladder"):
        raise ConfigError(f"{path}: no [[ladder]] rows: the first one is the baseline")
    for group in ("ladder", "alone"):
        prev = None
        for spec in data.get(group, []):
            name = spec.get("name")
            if not name or name in by_name:
                raise ConfigError(f"{path}: every row needs a unique name ({name!r})")
            if set(spec) - _ROW_KEYS:
                raise ConfigError(f"{path}: row {name!r}: unknown key(s) {sorted(set(spec) - _ROW_KEYS)} "
                                  f"(valid: {', '.join(sorted(_ROW_KEYS))})")
            parent_name = spec.get("from")
            if parent_name is not None and parent_name not in by_name:
                raise ConfigError(f"{path}: row {name!r}: from = {parent_name!r} names no earlier row")
            parent = by_name[parent_name] if parent_name else (prev if group == "ladder" else rows[0])
            values = {**(parent.values if parent else {}), **_flatten(spec.get("set", {}))}
            row = Row(name=name, group=group, values=values,
                      nproc=int(spec.get("nproc", parent.nproc if parent else 1)),
                      seeds=int(spec.get("seeds", default_seeds)) if seeds is None else seeds,
                      note=spec.get("note", ""), slug=("alone-" if group == "alone" else "") + slugify(name))
            if row.nproc < 1 or row.seeds < 1:
                raise ConfigError(f"{path}: row {name!r}: nproc and seeds must be >= 1")
            try:  # every row must be a valid config, on its number of ranks, before anything runs
                config.with_values(config.load(base), row.values, f"row {name!r}", world=row.nproc)
            except ConfigError as e:
                msg = str(e) if str(e).startswith(f"row {name!r}") else f"row {name!r}: {e}"
                raise ConfigError(f"{path}: {msg}") from None
            rows.append(row)
            by_name[name] = row
            prev = row if group == "ladder" else prev
    slugs = [r.slug for r in rows]
    if len(set(slugs)) != len(slugs):
        raise ConfigError(f"{path}: two rows make the same directory name: {slugs}")
    return Stack(name=head.get("name", path.stem), base=base, device=head.get("device", "cuda"),
                 runs_dir=Path(head.get("runs_dir", f"runs/{path.stem}")), out=Path(head.get("out", "results")),
                 rows=rows, report=head.get("report", "stack"))


def run_config(stack: Stack, row: Row, seed: int, overrides: list[str]) -> config.Config:
    """The exact config of one run: base file, the row's keys, seed and directory, then the command line."""
    fixed = {"run.seed": seed, "run.name": f"{row.slug}-seed{seed}", "run.resume": "auto",
             "run.out_dir": str(stack.runs_dir / row.slug / f"seed{seed}")}
    if stack.device == "cpu":
        fixed["run.device"] = "cpu"
    cfg = config.with_values(config.load(stack.base), row.values, f"row {row.name!r}", world=row.nproc)
    return config.with_values(cfg, fixed, overrides=overrides, world=row.nproc)


def _same(saved: dict[str, Any], cfg: config.Config) -> bool:
    return not config.diff(saved, config.to_dict(cfg), ignore=RESUME_MAY_DIFFER)


def finished(run_dir: Path, cfg: config.Config, code: str) -> bool:
    """A run with the same config (paths aside) and the same code has finished here."""
    try:
        s = read_json(run_dir / SUMMARY)
    except UserError:  # missing, or left unreadable by a crash: run it again
        return False
    return bool(s.get("finished")) and _same(s.get("config", {}), cfg) and s.get("code_hash") == code


def resumable(run_dir: Path, cfg: config.Config, code: str) -> bool:
    """An unfinished run of this config, started by this code: continue it rather than start over."""
    try:
        mark = read_json(run_dir / RUN_MARK)
    except UserError:
        return False
    return mark.get("code_hash") == code and _same(mark.get("config", {}), cfg) and not (run_dir / SUMMARY).exists()


def launch(cfg: config.Config, nproc: int, run_dir: Path, code: str, timeout_s: float | None) -> str:
    """Run fastres.train on ``cfg`` in a fresh process (torchrun for nproc > 1); "done", "failed: ..."
    or "interrupted" (time budget; the next sitting resumes from the checkpoint)."""
    if run_dir.exists() and any(run_dir.iterdir()) and not resumable(run_dir, cfg, code):
        # another recipe or other code ran here: keep it aside, start clean
        with writing(run_dir):
            run_dir.rename(run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d%H%M%S')}"))
    with writing(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / RUN_MARK, json.dumps({"code_hash": code, "config": config.to_dict(cfg)}) + "\n")
    cfg_path = run_dir / RUN_CONFIG
    write_text(cfg_path, config.to_toml(cfg))
    cmd = [sys.executable, "-m", "fastres.train", "--config", str(cfg_path)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               *cmd[1:]]
    with writing(run_dir / "stack.log"), open(run_dir / "stack.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return "interrupted"
    if rc == 0 and (run_dir / SUMMARY).exists():
        return "done"
    tail = (run_dir / "stack.log").read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
    return f"failed (exit {rc}): {tail[0][:200]}"


def write_manifest(stack: Stack) -> None:
    stack.runs_dir.mkdir(parents=True, exist_ok=True)
    rows = [asdict(r) for r in stack.rows]
    assert all(MANIFEST_ROW_KEYS <= set(r) for r in rows), "Row lost a key the report reads"
    data = {"name": stack.name, "device": stack.device, "base": str(stack.base), "report": stack.report, "rows": rows}
    tmp = stack.runs_dir / (MANIFEST + ".tmp")
    write_text(tmp, json.dumps(data, indent=1) + "\n")
    with writing(stack.runs_dir / MANIFEST):
        os.replace(tmp, stack.runs_dir / MANIFEST)


def gpus_available() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_stack(stack: Stack, overrides: list[str], *, budget_s: float | None = None, only: list[str] | None = None,
              dry_run: bool = False, say=print) -> bool:
    """Run (or skip) every row's seeds; the manifest records each row's status. True if nothing failed."""
    code, deadline = log.code_hash(), (time.monotonic() + budget_s) if budget_s else None
    ok, gpus = True, gpus_available()
    for row in stack.rows:
        row.runs = [str(stack.runs_dir / row.slug / f"seed{s}") for s in range(row.seeds)]
        if stack.device == "cuda" and row.nproc > gpus:
            row.status = f"needs {row.nproc} GPU{'s' if row.nproc > 1 else ''}"
            say(f"stack: {row.name}: {row.status} (this machine has {gpus})")
            continue
        if only and row.name not in only and row.slug not in only:
            row.status = row.status if row.status != "pending" else "not selected"
            continue
        states = []
        for seed in range(row.seeds):
            cfg = run_config(stack, row, seed, overrides)
            run_dir = Path(cfg.run.out_dir)
            if finished(run_dir, cfg, code):
                states.append("done")
                say(f"stack: {row.name} seed {seed}: done before, skipped")
                continue
            left = None if deadline is None else deadline - time.monotonic()
            if dry_run or (left is not None and left < 30):
                states.append("pending")
                say(f"stack: {row.name} seed {seed}: {'would run' if dry_run else 'budget spent, not started'}")
                continue
            say(f"stack: {row.name} seed {seed}: running ({row.nproc} process{'es' if row.nproc > 1 else ''})"
                f" -> {run_dir}")
            state = launch(cfg, row.nproc, run_dir, code, left)
            states.append(state)
            say(f"stack: {row.name} seed {seed}: {state}")
            ok = ok and not state.startswith("failed")
            write_manifest(stack)
        failed = [s for s in states if s.startswith("failed")]
        row.status = failed[0] if failed else ("done" if all(s == "done" for s in states) else "incomplete")
        write_manifest(stack)
    write_manifest(stack)
    return ok


def command_line() -> Parser:
    p = parser("python -m fastres.tools.stack", __doc__, overrides=True)
    p.add_argument("--config", "-c", required=True, metavar="FILE",
                   help="the stack file (required), e.g. configs/stack.toml")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="where the report goes (default: the stack file's [stack] out, else results)")
    p.add_argument("--runs", type=Path, metavar="DIR",
                   help="the runs' folder (default: the stack file's [stack] runs_dir, else runs/<its name>)")
    p.add_argument("--budget-s", type=whole_number(1), metavar="SECONDS",
                   help="this sitting's time: a run still going then stops and resumes next time (default: no limit)")
    p.add_argument("--only", type=names(), default=[], metavar="ROW,ROW",
                   help="the rows to run, by name or directory name (default: every row)")
    p.add_argument("--seeds", type=whole_number(1), metavar="N",
                   help="seeds of every row (default: each row's seeds, else the stack file's, else 1)")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="the device of every row (default: the stack file's device, else cuda)")
    p.add_argument("--dry-run", action="store_true", help="say what would run and run nothing; the report is rebuilt")
    return p


def cli(argv: list[str] | None = None) -> int:
    return entry(_main, argv, command_line().format_help())


def _main(argv: list[str]) -> int | None:
    p = command_line()
    args, rest = p.parse_known_args(argv)
    overrides = config_overrides(p, rest)
    config.load(None, overrides)  # bad overrides fail here, before anything runs
    stack = load_stack(args.config, seeds=args.seeds)
    if args.device:
        stack.device = args.device
    if args.runs:
        stack.runs_dir = args.runs
    if args.out:
        stack.out = args.out
    if args.only:
        unknown = [o for o in args.only if o not in {r.name for r in stack.rows} | {r.slug for r in stack.rows}]
        if unknown:
            raise UserError(f"--only: no row named {', '.join(unknown)}")
    ok = run_stack(stack, overrides, budget_s=args.budget_s, only=args.only, dry_run=args.dry_run)
    paths = build_report(stack.runs_dir, stack.out)
    print(f"stack: report -> {', '.join(str(p) for p in paths)}")
    left = [r.name for r in stack.rows if r.status in ("pending", "incomplete")]
    if left:
        print(f"stack: not finished: {', '.join(left)}; run the same command again to continue")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(cli())
