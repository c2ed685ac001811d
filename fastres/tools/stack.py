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
        [--only ROW,ROW] [--seeds N] [--device cpu|cuda] [--dry-run] [--concurrent N [--alone ROW,ROW] [--mps]]
        [--section.key=value ...]

``--device`` replaces the stack file's device (``cpu``: every row on the CPU, e.g. to rehearse a GPU ladder).

``--concurrent N`` runs up to N one-process runs at the same time on the one device (each its own process; on a
CPU the cores split between them, under NVIDIA's MPS with ``--mps``): a small network leaves a large GPU idle
between its kernels, so N runs at once fill it, and the whole table takes a fraction of the time. Their accuracies,
epochs to target and curves count as any run's (the same seed gives the same numbers alone or shared, with
run.deterministic); their clocks do not: each records in its summary.json that it shared the device, and with
whom. The table's time to target comes from runs that had the device alone: the first seed of the rows
``--alone`` names (default: the first row) runs alone, and every packed row's training speed is measured alone
in a short run of its config (``<row>/speed``: its first epochs, as the row starts). A row without an alone run
shows a derived time, epochs to target x steps an epoch x the step time measured alone, marked as derived; the
report checks the derived time against the measured one wherever a row has both.
"""

from __future__ import annotations

import json
import os
import re
import shutil
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
from fastres.distributed import cores
from fastres.errors import UserError, entry, read_json, write_text, writing
from fastres.log import SUMMARY
from fastres.tools import Parser, config_overrides, names, parser, whole_number
from fastres.tools.report import LAST_STACK, MANIFEST, MANIFEST_ROW_KEYS, build_report

RUN_CONFIG = "stack-config.toml"
RUN_MARK = "stack-run.json"  # the code hash a run was started with
SPEED = "speed"  # in a row's directory: its short run alone, for the step time a derived time uses
SPEED_EPOCHS = 2  # how many epochs that run trains (fewer where the row has fewer)
SHARED = "shared_device"  # the key fastres.tools.stack adds to the summary.json of a run that shared its device


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
    speed: str = ""  # the run of its step time alone, where its runs were packed


@dataclass
class Stack:
    name: str
    base: Path
    device: str
    runs_dir: Path
    out: Path
    rows: list[Row]
    report: str = "stack"  # "stack": the speed/accuracy table; "depths": the paper's Table 6
    packing: dict[str, Any] | None = None  # --concurrent: how much the packed runs trained, in how long


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


@dataclass
class Job:
    """One run of the stack: a row's seed (or its speed run), and how it runs: alone on the device or packed."""
    row: Row
    cfg: config.Config
    label: str  # "<row> seed <k>", "<row> speed"
    alone: bool
    proc: subprocess.Popen | None = None
    log: Any = None
    started: float = 0.0
    others: set[str] = field(default_factory=set)  # the runs it shared the device with
    most: int = 1  # the most runs on the device at once while it ran

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run.out_dir)


def start(job: Job, code: str, env: dict[str, str] | None = None) -> None:
    """Start fastres.train on the job's config in a fresh process (torchrun for nproc > 1)."""
    cfg, run_dir = job.cfg, job.run_dir
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
    if job.row.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={job.row.nproc}",
               *cmd[1:]]
    with writing(run_dir / "stack.log"):
        job.log = open(run_dir / "stack.log", "ab")
    job.proc = subprocess.Popen(cmd, stdout=job.log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
    job.started = time.monotonic()


def stop(job: Job) -> None:
    """SIGTERM (the run checkpoints and exits), then SIGKILL a minute later."""
    os.killpg(job.proc.pid, signal.SIGTERM)
    try:
        job.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(job.proc.pid, signal.SIGKILL)
        job.proc.wait()


def outcome(job: Job, interrupted: bool) -> str:
    """"done", "failed (exit N): <its last line>" or "interrupted" (the next sitting resumes from the checkpoint);
    a finished run that shared the device has that written into its summary.json."""
    job.log.close()
    if interrupted:
        return "interrupted"
    rc, run_dir = job.proc.returncode, job.run_dir
    if rc == 0 and (run_dir / SUMMARY).exists():
        if job.others:
            s = read_json(run_dir / SUMMARY)
            s[SHARED] = {"others": sorted(job.others), "most_at_once": job.most}
            write_text(run_dir / SUMMARY, json.dumps(s, indent=2) + "\n")
        return "done"
    tail = (run_dir / "stack.log").read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
    return f"failed (exit {rc}): {tail[0][:200]}"


def write_manifest(stack: Stack) -> None:
    stack.runs_dir.mkdir(parents=True, exist_ok=True)
    if stack.packing is None and (stack.runs_dir / MANIFEST).exists():  # a sitting that packed nothing keeps the last
        try:
            stack.packing = read_json(stack.runs_dir / MANIFEST).get("packing")
        except UserError:
            pass
    rows = [asdict(r) for r in stack.rows]
    assert all(MANIFEST_ROW_KEYS <= set(r) for r in rows), "Row lost a key the report reads"
    data = {"name": stack.name, "device": stack.device, "base": str(stack.base), "report": stack.report, "rows": rows,
            "packing": stack.packing}
    tmp = stack.runs_dir / (MANIFEST + ".tmp")
    write_text(tmp, json.dumps(data, indent=1) + "\n")
    with writing(stack.runs_dir / MANIFEST):
        os.replace(tmp, stack.runs_dir / MANIFEST)
    # the report's default: this stack's runs (runs/<stack>/ -> runs/.last-stack)
    write_text(stack.runs_dir.parent / Path(LAST_STACK).name, f"{stack.runs_dir.resolve()}\n")


def gpus_available() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def speed_config(stack: Stack, row: Row, overrides: list[str]) -> config.Config:
    """The row's speed run: seed 0's config, its first SPEED_EPOCHS epochs (as the row starts), in <row>/speed."""
    cfg = run_config(stack, row, 0, overrides)
    return config.with_values(cfg, {"run.epochs": min(SPEED_EPOCHS, cfg.run.epochs), "run.stop_at_target": False,
                                    "run.name": f"{row.slug}-speed",
                                    "run.out_dir": str(stack.runs_dir / row.slug / SPEED)}, world=row.nproc)


def run_stack(stack: Stack, overrides: list[str], *, budget_s: float | None = None, only: list[str] | None = None,
              dry_run: bool = False, say=print, concurrent: int = 1, alone: list[str] | None = None,
              mps: bool = False) -> bool:
    """Run (or skip) every row's seeds, up to ``concurrent`` one-process runs at once; the manifest records each
    row's status. True if nothing failed."""
    code, deadline = log.code_hash(), (time.monotonic() + budget_s) if budget_s else None
    ok, gpus = True, gpus_available()
    alone = alone if alone is not None else [stack.rows[0].name]
    packing = concurrent > 1
    threads = max(1, cores() // concurrent) if stack.device == "cpu" else 0  # on a CPU the cores split
    jobs: list[Job] = []
    states: dict[str, dict[int, str]] = {}
    for row in stack.rows:
        row.runs = [str(stack.runs_dir / row.slug / f"seed{s}") for s in range(row.seeds)]
        if stack.device == "cuda" and row.nproc > gpus:
            row.status = f"needs {row.nproc} GPU{'s' if row.nproc > 1 else ''}"
            say(f"stack: {row.name}: {row.status} (this machine has {gpus})")
            continue
        if only and row.name not in only and row.slug not in only:
            row.status = row.status if row.status != "pending" else "not selected"
            continue
        states[row.name] = {}
        packed_row = packing and row.nproc == 1
        own_threads = run_config(stack, row, 0, overrides).run.threads  # a recipe's (or the user's) threads stay
        for seed in range(row.seeds):
            by_itself = not packed_row or (seed == 0 and (row.name in alone or row.slug in alone))
            extra = [] if by_itself or not threads or own_threads else [f"--run.threads={threads}"]
            jobs.append(Job(row, run_config(stack, row, seed, [*overrides, *extra]), f"{row.name} seed {seed}",
                            alone=by_itself))
        if packed_row:  # its step time alone, for a derived time to target
            row.speed = str(stack.runs_dir / row.slug / SPEED)
            jobs.append(Job(row, speed_config(stack, row, overrides), f"{row.name} speed", alone=True))
    todo = []
    for job in jobs:
        if finished(job.run_dir, job.cfg, code):
            say(f"stack: {job.label}: done before, skipped")
            _state(states, job, "done")
        elif dry_run:
            say(f"stack: {job.label}: would run{'' if job.alone else ' (packed)'}")
            _state(states, job, "pending")
        else:
            todo.append(job)
    todo.sort(key=lambda j: not j.alone)  # the runs alone first, then the packed ones, N at a time
    env = _mps(stack) if mps and todo else None
    active: list[Job] = []
    packed_t0 = None
    wall = dict(packed_images=0, packed_s=0.0, alone_images=0, alone_s=0.0)
    try:
        while todo or active:
            left = None if deadline is None else deadline - time.monotonic()
            while todo and (not active or (not todo[0].alone and not any(a.alone for a in active)
                                           and len(active) < concurrent)):
                if left is not None and left < 30:
                    break
                job = todo.pop(0)
                say(f"stack: {job.label}: running ({job.row.nproc} process{'es' if job.row.nproc > 1 else ''}"
                    f"{'' if job.alone else f', packed, up to {concurrent} at once'}) -> {job.run_dir}")
                start(job, code, env)
                if not job.alone and packed_t0 is None:
                    packed_t0 = time.monotonic()
                for other in active:  # who shares the device with whom
                    job.others.add(other.label)
                    other.others.add(job.label)
                active.append(job)
                for a in active:
                    a.most = max(a.most, len(active))
            if not active:
                for job in todo:
                    _state(states, job, "pending")
                    say(f"stack: {job.label}: budget spent, not started")
                break
            time.sleep(0.2)
            out_of_time = deadline is not None and time.monotonic() >= deadline
            for job in [a for a in active if a.proc.poll() is not None or out_of_time]:
                if job.proc.poll() is None:
                    stop(job)
                state = outcome(job, interrupted=out_of_time and job.proc.returncode not in (0,))
                active.remove(job)
                if packing and state == "done" and (not job.alone or job.label.endswith(f" {SPEED}")):
                    # images over wall-clock seconds, start-up and evaluation included, packed and alone alike
                    images = read_json(job.run_dir / SUMMARY)["steps"] * job.cfg.optim.batch_size
                    if job.alone:
                        wall["alone_images"] += images
                        wall["alone_s"] += time.monotonic() - job.started
                    else:
                        wall["packed_images"] += images
                        wall["packed_s"] = time.monotonic() - packed_t0
                    stack.packing = dict(concurrent=concurrent, mps=bool(env), **wall)
                say(f"stack: {job.label}: {state}")
                ok = ok and not state.startswith("failed")
                _state(states, job, state)
                _row_status(stack, states)
                write_manifest(stack)
    finally:
        for job in active:  # an error or Ctrl-C here: the runs checkpoint and stop with the stack
            stop(job)
        if env:
            _mps_quit(env)
    _row_status(stack, states)
    write_manifest(stack)
    return ok


def _state(states: dict[str, dict[int, str]], job: Job, state: str) -> None:
    if not job.label.endswith(f" {SPEED}"):
        states.setdefault(job.row.name, {})[job.cfg.run.seed] = state


def _row_status(stack: Stack, states: dict[str, dict[int, str]]) -> None:
    for row in stack.rows:
        got = states.get(row.name)
        if got is None:
            continue
        failed = [s for s in got.values() if s.startswith("failed")]
        done = len(got) == row.seeds and all(s == "done" for s in got.values())
        row.status = failed[0] if failed else ("done" if done else "incomplete")


def _mps(stack: Stack) -> dict[str, str]:
    """Start NVIDIA's MPS control daemon for this stack's runs; the environment that puts them under it."""
    if stack.device != "cuda" or shutil.which("nvidia-cuda-mps-control") is None:
        raise UserError("--mps needs a CUDA device and NVIDIA's MPS (nvidia-cuda-mps-control, in the CUDA driver "
                        "package): leave --mps out to pack the runs without it")
    base = (stack.runs_dir / ".mps").resolve()
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(base / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(base / "log")}
    for d in env.values():
        Path(d).mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["nvidia-cuda-mps-control", "-d"], env={**os.environ, **env}, capture_output=True, text=True)
    if r.returncode:
        raise UserError(f"nvidia-cuda-mps-control -d failed ({(r.stderr or r.stdout).strip()[:200]}): leave --mps "
                        "out, or set the GPU's compute mode as MPS needs")
    return env


def _mps_quit(env: dict[str, str]) -> None:
    subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", env={**os.environ, **env}, capture_output=True,
                   text=True)


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
    p.add_argument("--concurrent", type=whole_number(1), default=1, metavar="N",
                   help="one-process runs at once on the device; their times are then derived (see above)")
    p.add_argument("--alone", type=names(), metavar="ROW,ROW",
                   help="with --concurrent: the rows whose first seed runs alone, its time measured (default: the "
                        "first row)")
    p.add_argument("--mps", action="store_true", help="with --concurrent on a GPU: run the packed runs under "
                   "NVIDIA's MPS (started and stopped by the stack)")
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
    if args.alone and args.concurrent == 1:
        raise UserError("--alone chooses which runs keep the device to themselves among packed ones: it needs "
                        "--concurrent N (N > 1)")
    if args.mps and args.concurrent == 1:
        raise UserError("--mps shares the device among packed runs: it needs --concurrent N (N > 1)")
    for name in args.alone or []:
        if name not in {r.name for r in stack.rows} | {r.slug for r in stack.rows}:
            raise UserError(f"--alone: no row named {name}")
    ok = run_stack(stack, overrides, budget_s=args.budget_s, only=args.only, dry_run=args.dry_run,
                   concurrent=args.concurrent, alone=args.alone, mps=args.mps)
    paths = build_report(stack.runs_dir, stack.out)
    print(f"stack: report -> {', '.join(str(p) for p in paths)}")
    left = [r.name for r in stack.rows if r.status in ("pending", "incomplete")]
    if left:
        print(f"stack: not finished: {', '.join(left)}; run the same command again to continue")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(cli())
