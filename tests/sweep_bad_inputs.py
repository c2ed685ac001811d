"""A sweep of bad inputs: every one must end in one line `fastres: error: ...` and a non-zero exit, never a
traceback.   python tests/sweep_bad_inputs.py [DATA_DIR]   (a CIFAR-10 folder; tests/test_environment.py runs it
on a small synthetic one). Each case is (name, command, arguments); {data}, {tmp} and {file} are filled in."""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
from pathlib import Path

from fastres import train
from fastres.tools import bench, jpeg, report, stack

RUN = ["--data.dir={data}", "--run.out_dir={tmp}/{name}", "--model.depth=8", "--optim.batch_size=50",
       "--run.epochs=1", "--data.loader=gpu", "--data.val_size=50"]
CLIS = {"train": train.cli, "stack": stack.cli, "report": report.cli, "bench": bench.cli, "jpeg": jpeg.cli}

CASES = [
    # keys and their form
    ("unknown section", "train", ["--foo.bar=1"]),
    ("unknown key", "train", ["--model.dpth=20"]),
    ("a key without its section", "train", ["--depth=20"]),
    ("a bare word", "train", ["depth"]),
    ("--config without a file", "train", ["--config"]),
    ("int not a number", "train", ["--run.epochs=many"]),
    ("float not a number", "train", ["--optim.lr_per_128=fast"]),
    ("bool not a bool", "train", ["--precision.compile=maybe"]),
    ("list not numbers", "train", ["--optim.milestones=a,b"]),
    # values out of range, low and high
    ("epochs 0", "train", ["--run.epochs=0"]),
    ("epochs huge", "train", ["--run.epochs=99999999999"]),
    ("lr nan", "train", ["--optim.lr_per_128=nan"]),
    ("lr inf", "train", ["--optim.lr_per_128=inf"]),
    ("lr huge", "train", ["--optim.lr_per_128=1e9"]),
    ("seed negative", "train", ["--run.seed=-1"]),
    ("seed past 32 bits", "train", ["--run.seed=4294967296"]),
    ("split seed past 32 bits", "train", ["--data.split_seed=4294967296"]),
    ("momentum 1", "train", ["--optim.momentum=1"]),
    ("gamma 0", "train", ["--optim.gamma=0"]),
    ("milestones backwards", "train", ["--optim.milestones=0.9,0.5"]),
    ("milestone past the end", "train", ["--optim.milestones=1.5"]),
    ("depth not 6n+2", "train", ["--model.depth=21"]),
    ("depth too small", "train", ["--model.depth=2"]),
    ("depth huge", "train", ["--model.depth=60002"]),
    ("dropout 1", "train", ["--model.dropout=1"]),
    ("stochastic depth 1", "train", ["--model.stochastic_depth=1"]),
    ("label smoothing 1", "train", ["--optim.label_smoothing=1"]),
    ("ema decay 1", "train", ["--optim.ema_decay=1"]),
    ("batch 0", "train", ["--optim.batch_size=0"]),
    ("batch huge", "train", ["--optim.batch_size=100000000"]),
    ("accumulation 0", "train", ["--optim.accum_steps=0"]),
    ("warmup overflowing", "train", ["--optim.warmup_epochs=1e308"]),
    ("workers huge", "train", ["--data.num_workers=100000"]),
    ("target 0", "train", ["--run.target_acc=0"]),
    ("target above 1", "train", ["--run.target_acc=1.5"]),
    ("checkpoint interval negative", "train", ["--run.checkpoint_every_s=-1"]),
    ("log interval negative", "train", ["--log.every_steps=-1"]),
    ("precise BN batches 0", "train", ["--eval.precise_bn_batches=0"]),
    ("LSUV tries 0", "train", ["--model.lsuv_t_max=0"]),
    ("LSUV tolerance 0", "train", ["--model.lsuv_tol_var=0"]),
    ("unknown choice", "train", ["--eval.tta=sideways"]),
    # combinations
    ("batch not split by accumulation", "train", ["--optim.accum_steps=3"]),
    ("nesterov without momentum", "train", ["--optim.nesterov=true", "--optim.momentum=0"]),
    ("tuning without a validation split", "train", ["--eval.on_test=false", "--data.val_size=0"]),
    ("step graph with stochastic depth", "train", ["--precision.step_graph=true", "--optim.impl=fused",
                                                   "--model.stochastic_depth=0.5"]),
    ("step graph with fp16", "train", ["--precision.step_graph=true", "--optim.impl=fused", "--precision.amp=fp16"]),
    ("fewer classes than labels", "train", ["--model.num_classes=3"]),
    ("validation larger than the set", "train", ["--data.val_size=60000"]),
    ("subset larger than the set", "train", ["--data.subset=999999"]),
    ("test subset larger than the set", "train", ["--data.test_subset=999999"]),
    ("no full batch", "train", ["--data.subset=60"]),
    # files
    ("config file missing", "train", ["--config={tmp}/nope.toml"]),
    ("config is a directory", "train", ["--config={tmp}"]),
    ("config not TOML", "train", ["--config={file:bad.toml:[model\n}"]),
    ("config not text", "train", ["--config={file:bin.toml:\x00\xff\xfe}"]),
    ("config base missing", "train", ["--config={file:b.toml:base = 'gone.toml'\n}"]),
    ("config base loops", "train", ["--config={file:loop.toml:base = 'loop.toml'\n}"]),
    ("config base not a string", "train", ["--config={file:b2.toml:base = 3\n}"]),
    ("config section not a table", "train", ["--config={file:s.toml:model = 3\n}"]),
    ("data dir is a file", "train", ["--data.dir={file:notdata:x}"]),
    ("out_dir is a file", "train", ["--run.out_dir={file:outfile:x}"]),
    ("out_dir under a file", "train", ["--run.out_dir={file:outfile2:x}/sub"]),
    ("nothing to resume", "train", ["--run.resume=require"]),
    # the other commands
    ("stack without --config", "stack", []),
    ("stack file missing", "stack", ["--config={tmp}/nope.toml"]),
    ("stack budget not a number", "stack", ["--config=configs/stack-smoke.toml", "--budget-s=soon"]),
    ("stack seeds 0", "stack", ["--config=configs/stack-smoke.toml", "--seeds=0"]),
    ("stack device unknown", "stack", ["--config=configs/stack-smoke.toml", "--device=tpu"]),
    ("report without runs", "report", ["--runs={tmp}/no-runs"]),
    ("report stray argument", "report", ["extra"]),
    ("bench unknown what", "bench", ["--what", "everything"]),
    ("bench steps 0", "bench", ["--what", "dispatch", "--steps", "0"]),
    ("bench unknown subcommand", "bench", ["everything"]),
    ("bench subcommand steps 0", "bench", ["dispatch", "--steps", "0"]),
    ("bench another subcommand's flag", "bench", ["loaders", "--steps", "3"]),
    ("bench what and subcommand disagree", "bench", ["loaders", "--what", "train"]),
    ("bench gloo procs not numbers", "bench", ["scaling", "--gloo-procs=1,two"]),
    ("stack unknown flag", "stack", ["--config=configs/stack-smoke.toml", "--budgets=9"]),
    ("report unknown flag", "report", ["--runz=runs"]),
    ("jpeg size 0", "jpeg", ["--size=0"]),
    ("jpeg unknown flag", "jpeg", ["--imgs=10"]),
]


def _fill(arg: str, name: str, data: Path, tmp: Path) -> str:
    if "{file:" in arg:  # before{file:NAME:TEXT}rest: a file written for the case
        before, body = arg.split("{file:", 1)
        spec, rest = body.split("}", 1)
        fname, text = spec.split(":", 1)
        (tmp / fname).write_bytes(text.encode("latin-1"))
        return before + str(tmp / fname) + rest
    return arg.format(data=data, tmp=tmp, name=name.replace(" ", "-"))


def run(data: Path, tmp: Path, names: list[str] | None = None) -> list[str]:
    """The cases' failures: no non-zero exit, not exactly one error line, or a traceback."""
    failures = []
    for name, cli, args in CASES:
        if names and name not in names:
            continue
        base = [_fill(a, name, data, tmp) for a in RUN] if cli == "train" else []
        argv = base + [_fill(a, name, data, tmp) for a in args]
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                rc = CLIS[cli](argv)
        except BaseException as e:  # a traceback: what this sweep exists to find
            failures.append(f"{name}: {type(e).__name__}: {e}")
            continue
        lines = [line for line in err.getvalue().splitlines() if line.startswith("fastres: error:")]
        if rc == 0 or len(lines) != 1 or "Traceback" in err.getvalue():
            failures.append(f"{name}: exit {rc}, {len(lines)} error line(s): {err.getvalue()[-300:]!r}")
    return failures


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as t:
        found = run(Path(sys.argv[1] if len(sys.argv) > 1 else "data"), Path(t))
    print("\n".join(found) or f"all {len(CASES)} bad inputs ended in one line")
    sys.exit(1 if found else 0)
