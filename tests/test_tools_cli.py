"""The tools' command lines (fastres/tools: bench and its subcommands, stack, report, jpeg): --help shows every
option's default, a mistake is one line and exit code 2, old command lines (``--what NAME``) still parse."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from fastres import config
from fastres.tools import bench, jpeg, report, resize_folder, stack

from conftest import ROOT, run_cli

CLIS = {"bench": bench.cli, "stack": stack.cli, "report": report.cli, "jpeg": jpeg.cli,
        "resize_folder": resize_folder.cli}
SMOKE = f"--config={ROOT / 'configs' / 'stack-smoke.toml'}"

# what each --help must show: the defaults of its options (and where they come from when not a fixed value)
HELPS = [
    ("bench", [], ["(default: train)", "train", "loaders", "scaling", "profile", "dispatch", "--what NAME"]),
    ("bench", ["train"], ["(default: configs/fast.toml)", "(default: results/bench.json)", "--steps N",
                          "(default: 100)", "(default: 20)", "(default: the config file's stem)", "--time-to-target"]),
    ("bench", ["loaders"], ["(default: configs/bench-loaders.toml)", "(default: results/loaders.json)",
                            "(default: workers,gpu,dali,dali-device)", "(default: 3)"]),
    ("bench", ["scaling"], ["(default: configs/fast.toml)", "(default: results/scaling.md)", "(default: 100)",
                            "(default: 20)", "(default: 1,2,4)"]),
    ("bench", ["profile"], ["(default: configs/fast.toml)", "(default: results/profile)", "(default: 30)",
                            "(default: the config file's stem)"]),
    ("bench", ["dispatch"], ["(default: configs/fast.toml)", "(default: 10)", "(default: 3)"]),
    ("bench", ["cpu-loaders"], ["(default: configs/bench-cpu-loaders.toml)", "(default: results/loaders-jpeg.md)",
                                "(default: 2000)", "(default: 2)", "(default: 256)"]),
    ("bench", ["sharing"], ["(default: configs/bench-sharing.toml)", "(default: results/sharing.md)"]),
    ("bench", ["--what", "dispatch"], ["(default: 10)", "(default: 3)"]),
    ("stack", [], ["--config FILE", "(default: the stack file's [stack] out, else results)", "(default: no limit)",
                   "(default: every row)", "(default: each row's seeds", "(default: the stack file's device",
                   "--dry-run"]),
    ("report", [], ["(default: the last stack's, as runs/.last-stack names it, else runs/stack)", "(default: results)",
                    "--pick"]),
    ("jpeg", [], ["(default: 2000)", "(default: 224)", "(default: 128)", "(default: 50)", "(default: 64)",
                  "(default: 30)", "(default: 2)", "(default: results/jpeg.json)"]),
    ("resize_folder", [], ["SRC", "--out DIR", "(default: 256)", "(default: 90)", "--workers N"]),
]


@pytest.mark.parametrize("tool, argv, shown", HELPS, ids=[" ".join([t, *a]) for t, a, _ in HELPS])
def test_help_shows_every_default_and_exits_0(capsys, tool, argv, shown):
    assert CLIS[tool]([*argv, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m fastres.tools.{tool}")
    for words in shown:
        assert words in " ".join(out.split()), words
    if tool in ("bench", "stack"):  # they take config overrides too: the help says so and where the keys are
        assert "--section.key=value" in out and "python -m fastres.train --help" in out
    valued = [e for e in _options(out) if re.match(r"--[\w-]+ [A-Z{]", e)]  # the options that take a value
    assert valued or argv == [], out
    for entry in valued:
        assert "(default" in entry or "(required)" in entry, entry


def _options(help_text: str) -> list[str]:
    """The entries of a --help's options section, each on one line ("--out PATH  the report (default: ...)")."""
    entries: list[str] = []
    section = re.split(r"\n(?:options|optional arguments):\n", help_text)[1]  # Python 3.10 says the latter
    for line in section.split("\n\n", 1)[0].splitlines():
        if line.startswith("  -"):
            entries.append(line.strip())
        elif entries:
            entries[-1] += " " + line.strip()
    return entries


def test_help_describes_each_tool_from_its_docstring(capsys):
    for tool, module in (("stack", stack), ("report", report), ("jpeg", jpeg), ("bench", bench)):
        assert CLIS[tool](["-h"]) == 0
        assert module.__doc__.splitlines()[0] in capsys.readouterr().out, tool
    assert bench.cli(["loaders", "-h"]) == 0
    out = capsys.readouterr().out
    assert "``loaders`` (configs/bench-loaders.toml): for each loader" in out and "``scaling``" not in out


BAD = [  # (tool, argv, words the one line must hold): the flag and what it takes
    ("bench", ["--what", "nothing"], ["--what 'nothing'",
                                      "train, loaders, cpu-loaders, sharing, scaling, profile, dispatch"]),
    ("bench", ["nothing"], ["'nothing'", "train, loaders, cpu-loaders, sharing, scaling, profile, dispatch"]),
    ("bench", ["--steps", "x"], ["--steps", "'x' must be a whole number >= 1"]),
    ("bench", ["--steps=0"], ["--steps", ">= 1"]),
    ("bench", ["loaders", "--repeats", "0"], ["--repeats", "'0' must be a whole number >= 1"]),
    ("bench", ["--what=loaders", "--repeats=0"], ["--repeats", ">= 1"]),
    ("bench", ["loaders", "--loaders=gpu,turbo"], ["--loaders", "turbo", "workers, gpu, dali, dali-device"]),
    ("bench", ["dispatch", "--warmup=0"], ["--warmup", ">= 1"]),
    ("bench", ["scaling", "--gloo-procs", "1,two"], ["--gloo-procs", "'two' must be a whole number >= 1"]),
    ("bench", ["--config"], ["--config", "expected one argument"]),
    ("bench", ["--time-to-target=yes"], ["--time-to-target"]),
    ("bench", ["--stps", "3"], ["--stps is not a flag of python -m fastres.tools.bench train", "[--steps N]"]),
    ("bench", ["loaders", "--steps", "3"], ["--steps is not a flag of python -m fastres.tools.bench loaders",
                                            "[--repeats N]"]),
    ("bench", ["--model.dpth=20"], ["model.dpth"]),
    ("stack", [], ["--config"]),
    ("stack", [SMOKE, "--device", "tpu"], ["--device", "'tpu'", "'cpu', 'cuda'"]),
    ("stack", [SMOKE, "--seeds=0"], ["--seeds", ">= 1"]),
    ("stack", [SMOKE, "--budget-s", "soon"], ["--budget-s", "'soon' must be a whole number >= 1"]),
    ("stack", [SMOKE, "--budgets=9"], ["--budgets is not a flag", "[--budget-s SECONDS]"]),
    ("stack", [SMOKE, "stray"], ["'stray'"]),
    ("report", ["extra"], ["extra", "[--runs DIR]"]),
    ("report", ["--pick=yes"], ["--pick"]),
    ("report", ["--runs"], ["--runs", "expected one argument"]),
    ("report", ["--data.dir=x"], ["--data.dir=x", "[--out DIR]"]),
    ("jpeg", ["--images=0"], ["--images", ">= 1"]),
    ("jpeg", ["--size", "big"], ["--size", "'big' must be a whole number >= 1"]),
    ("jpeg", ["--bogus"], ["--bogus", "[--images N]"]),
    ("resize_folder", ["src"], ["--out"]),
    ("resize_folder", ["src", "--out=x", "--max-side=8"], ["--max-side", ">= 16"]),
    ("resize_folder", ["src", "--out=x", "--quality=101"], ["--quality 101", "1..100"]),
    ("bench", ["cpu-loaders", "--images=10"], ["--images", ">= 100"]),
]


@pytest.mark.parametrize("tool, argv, words", BAD, ids=[" ".join([t, *a]) for t, a, _ in BAD])
def test_a_bad_flag_or_value_is_one_line_and_exit_2(capsys, tool, argv, words):
    assert CLIS[tool](argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured  # no usage block, no traceback
    assert captured.err.startswith("fastres: error: "), captured.err
    for w in words:
        assert w in captured.err, (w, captured.err)


def test_as_a_command_a_mistake_is_one_line_and_help_exits_0():
    r = run_cli(["loaders", "--repeats=0"], module="fastres.tools.bench", timeout=300)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("fastres: error: --repeats")
    r = run_cli(["--out", "x", "--unknown"], module="fastres.tools.report", timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("fastres: error: unknown")
    r = run_cli(["dispatch", "--help"], module="fastres.tools.bench", timeout=300)
    assert r.returncode == 0 and "(default: 10)" in r.stdout and r.stderr == ""


def test_what_is_the_subcommand_and_train_the_default():
    same = [["loaders", "--repeats", "2", "--data.dir", "d"], ["--what", "loaders", "--repeats=2", "--data.dir=d"],
            ["--repeats=2", "--what=loaders", "--data.dir=d"], ["loaders", "--what", "loaders", "--repeats=2",
                                                                "--data.dir", "d"]]
    parsed = [bench.parse(argv)[:2] for argv in same]
    assert all(p == parsed[0] for p in parsed), parsed
    args, overrides = parsed[0]
    assert args.what == "loaders" and args.repeats == 2 and args.loaders == list(bench.LOADERS)
    assert args.config == ROOT / "configs" / "bench-loaders.toml" and overrides == ["--data.dir=d"]
    assert bench.parse(["--steps", "3"])[:2] == bench.parse(["train", "--steps=3"])[:2] == bench.parse(
        ["--what", "train", "--steps", "3"])[:2]
    assert bench.parse([])[0].what == "train"


def test_each_subcommand_keeps_its_defaults():
    got = {what: vars(bench.parse([what])[0]) for what in bench.DEFAULT_CONFIG}
    assert {w: (a["config"].name, str(a.get("out")), a.get("steps"), a.get("warmup")) for w, a in got.items()} == {
        "train": ("fast.toml", "results/bench.json", 100, 20),
        "loaders": ("bench-loaders.toml", "results/loaders.json", None, None),
        "cpu-loaders": ("bench-cpu-loaders.toml", "results/loaders-jpeg.md", None, None),
        "sharing": ("bench-sharing.toml", "results/sharing.md", None, None),
        "scaling": ("fast.toml", "results/scaling.md", 100, 20),
        "profile": ("fast.toml", "results/profile", 30, None),
        "dispatch": ("fast.toml", "None", 10, 3)}
    assert got["loaders"]["repeats"] == 3 and got["scaling"]["gloo_procs"] == [1, 2, 4]
    assert (got["cpu-loaders"]["images"], got["cpu-loaders"]["repeats"], got["cpu-loaders"]["prepared_side"]) \
        == (2000, 2, 256)
    assert got["train"]["label"] == "" and got["train"]["time_to_target"] is False


def test_the_scaling_report_repeats_the_flags_as_given_less_the_config():
    args, overrides, rest = bench.parse(["--config", "configs/fast.toml", "--what", "scaling",
                                         "--precision.compile_mode=reduce-overhead", "--gloo-procs=1"])
    assert args.gloo_procs == [1] and overrides == ["--precision.compile_mode=reduce-overhead"]
    assert bench.without_config(rest) == ["--precision.compile_mode=reduce-overhead", "--gloo-procs=1"]
    assert bench.without_config(["-c", "a", "--steps", "2", "--config=b", "--config", "c"]) == ["--steps", "2"]


def test_every_bench_command_the_results_record_still_parses():
    """Results files name the command that made them (older ones as ``--what NAME``, or ``fastres.bench``): each
    still parses, and its config loads."""
    commands = [m for path in sorted((ROOT / "results").rglob("*.md"))
                for m in re.findall(r"`python3? -m fastres\.(?:tools\.)?bench([^`]*)`", path.read_text())]
    assert any("--what scaling" in c for c in commands) and any("--what loaders" in c for c in commands)
    for command in commands:
        args, overrides, _ = bench.parse(shlex.split(command))
        config.load(ROOT / "configs" / Path(args.config).name, overrides)


def test_both_flag_forms_parse_the_same():
    for p, spaced, joined in (
            (stack.command_line(), ["-c", "s.toml", "--budget-s", "60", "--only", "a,b", "--seeds", "2", "--device",
                                    "cpu", "--runs", "r", "--out", "o", "--run.epochs", "1"],
             ["--config=s.toml", "--budget-s=60", "--only=a,b", "--seeds=2", "--device=cpu", "--runs=r", "--out=o",
              "--run.epochs=1"]),
            (report.command_line(), ["--runs", "r", "--out", "o", "--pick"], ["--runs=r", "--out=o", "--pick"]),
            (jpeg.command_line(), ["--images", "40", "--workers", "1", "--out", "j.json"],
             ["--images=40", "--workers=1", "--out=j.json"])):
        a, b = p.parse_known_args(spaced), p.parse_known_args(joined)
        assert a[0] == b[0] and config.parse_args(a[1]) == config.parse_args(b[1]), (a, b)
    args = stack.command_line().parse_known_args(["-c", "s.toml", "--only=a,,b", "--dry-run"])[0]
    assert args.only == ["a", "b"] and args.dry_run and args.seeds is None and args.budget_s is None
