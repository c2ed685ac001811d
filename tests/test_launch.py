"""launch/device.sh, the measurement queue for a GPU machine, and launch/fastpath.sh: what a CPU can check of
them (the queue's dry run, skip-if-done, budgets, pack and unpack; the commands the fast-path ladder runs)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from fastres import log

from conftest import ROOT


def copy_of_script(root: Path) -> Path:
    (root / "launch").mkdir(parents=True)
    shutil.copy(ROOT / "launch" / "device.sh", root / "launch" / "device.sh")
    return root / "launch" / "device.sh"


def sh(script: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", **(env or {})})


def test_bad_arguments_are_one_line_errors(tmp_path):
    script = copy_of_script(tmp_path / "repo")
    r = sh(script, "next", "--budgett=5")
    assert r.returncode == 2 and "unknown argument '--budgett=5'" in r.stderr
    r = sh(script, "next", "--budget=soon")
    assert r.returncode == 2 and "whole number of seconds" in r.stderr
    r = sh(script, "run", "check")  # the older one-phase runner is gone
    assert r.returncode == 2 and "usage" in r.stderr
    r = sh(script, "frobnicate")
    assert r.returncode == 2 and "usage" in r.stderr


def test_pack_keeps_unfinished_checkpoints_and_unpack_puts_everything_back(tmp_path):
    there = tmp_path / "there"
    script = copy_of_script(there)
    files = {"results/bench.json": "[]\n", "runs/stack/a/seed0/summary.json": "{}\n",
             "runs/stack/a/seed0/metrics.jsonl": "{}\n", "runs/stack/a/seed0/checkpoint.pt": "done",
             "runs/stack/b/seed0/metrics.jsonl": "{}\n", "runs/stack/b/seed0/checkpoint.pt": "half"}
    for name, text in files.items():
        (there / name).parent.mkdir(parents=True, exist_ok=True)
        (there / name).write_text(text)
    out = tmp_path / "out"
    r = sh(script, "pack", env={"OUT": str(out)})
    assert r.returncode == 0, r.stderr
    with tarfile.open(out / "results.tgz") as tar:
        names = set(tar.getnames())
    assert "runs/stack/a/seed0/checkpoint.pt" not in names  # finished: its summary is what counts
    assert names == set(files) - {"runs/stack/a/seed0/checkpoint.pt"}
    here = tmp_path / "here"
    script_here = copy_of_script(here)
    subprocess.run(["git", "init", "-q", str(here)], check=True)
    r = sh(script_here, "unpack", str(out))
    assert r.returncode == 0, r.stderr
    assert (here / "runs/stack/b/seed0/checkpoint.pt").read_text() == "half"
    assert (here / "results/bench.json").read_text() == "[]\n"
    assert sh(script_here, "unpack", str(tmp_path)).returncode == 2  # no results.tgz there


def test_git_sha_outside_git_is_what_prepare_recorded(tmp_path, monkeypatch):
    outer = tmp_path / "outer"  # a copy of the tree inside some other repository
    subprocess.run(["git", "init", "-q", str(outer)], check=True)
    copy = outer / "copy"
    copy.mkdir()
    monkeypatch.setattr(log, "_REPO", copy)
    assert log.git_sha() == "unknown"  # not the outer repository's HEAD
    (copy / ".device").mkdir()
    (copy / ".device" / "git_sha").write_text("0123abc-dirty\n")
    assert log.git_sha() == "0123abc-dirty"


def test_git_sha_in_this_checkout_is_its_head():
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert log.git_sha().removesuffix("-dirty") == head



def test_what_prepare_recorded_wins_over_a_stale_git_for_the_same_code(tmp_path, monkeypatch):
    """A copy of the tree has a .git at an older commit; the record made for this code wins, and a
    record made for other code does not."""
    copy = tmp_path / "copy"
    subprocess.run(["git", "init", "-q", str(copy)], check=True)
    shutil.copytree(ROOT / "fastres", copy / "fastres")
    monkeypatch.setattr(log, "_REPO", copy)
    (copy / ".device").mkdir()
    (copy / ".device" / "git_sha").write_text("45a1702\n")
    (copy / ".device" / "code_hash").write_text(log.code_hash() + "\n")
    assert log.git_sha() == "45a1702"
    (copy / ".device" / "code_hash").write_text("0" * 16 + "\n")  # recorded for other code
    assert log.git_sha() != "45a1702"


def test_fastpath_ladder_adds_each_steps_flags_to_the_previous_ones(tmp_path):
    """Each step's bench command carries every earlier step's flags, split into single arguments."""
    (tmp_path / "launch").mkdir()
    shutil.copy(ROOT / "launch" / "fastpath.sh", tmp_path / "launch" / "fastpath.sh")
    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/bash\n(IFS=$\'\\t\'; echo "$*") >> {log}\n')  # one call per line
    (bin_dir / "python3").chmod(0o755)
    r = subprocess.run(["bash", str(tmp_path / "launch" / "fastpath.sh"), "--steps=1"], capture_output=True,
                       text=True, timeout=60, env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    calls = [line.split("\t") for line in log.read_text().splitlines()]
    assert len(calls) == 10
    assert calls[0] == ["-m", "fastres.tools.bench", "train", "--config", "configs/baseline.toml",
                        "--label=step 0: baseline (workers, fp32, batch 128)", "--steps=1"]
    assert [len(c) - 7 for c in calls] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 10]  # step 9 adds two flags
    assert calls[9][-2:] == ["--precision.compile_mode=default", "--precision.step_graph=true"]
    assert calls[9][7:-2] == calls[8][7:] and calls[8][-1] == "--optim.batch_size=1024"


def test_the_queues_row_lists_name_rows_of_their_stacks():
    """Row lists typed by hand (the --only list in configs/tune-fast.toml, the rows each queue item's dry run
    takes in device.sh) must name rows of their stack, or a call stops on an unknown row."""
    import re

    from fastres.tools.stack import load_stack

    def slugs(config):
        return {row.slug for row in load_stack(ROOT / "configs" / config).rows}
    lists = [("tune-fast.toml", m) for m in re.findall(r"--only=([\w,-]+-[\w,-]+)",
                                                        (ROOT / "configs" / "tune-fast.toml").read_text())]
    lists += re.findall(r"stack_item configs/([\w-]+\.toml) [\w-]+ \S+ ([\w,-]+)",
                        (ROOT / "launch" / "device.sh").read_text())
    assert len(lists) >= 2 and {c for c, _ in lists} >= {"stack-quick.toml", "tune-recipe.toml", "stack.toml"}
    for config, names in lists:
        assert set(names.split(",")) <= slugs(config), (config, names)


# ------------------------------------------------------------------------------------------- the queue

def dry_tree(root: Path) -> Path:
    """What `launch/device.sh next` needs of the repo, copied (its dry run writes under runs/device-dryrun)."""
    for d in ("fastres", "configs", "launch"):
        shutil.copytree(ROOT / d, root / d)
    (root / "tests").mkdir()
    for f in ("conftest.py", "test_cuda.py"):
        shutil.copy(ROOT / "tests" / f, root / "tests" / f)
    return root / "launch" / "device.sh"


def next_call(script: Path, out: Path, **env: str) -> subprocess.CompletedProcess:
    import os
    return subprocess.run(["bash", str(script), "next"], capture_output=True, text=True, timeout=1500,
                          cwd=script.parent.parent, env={**os.environ, "FASTRES_DEVICE_DRYRUN": "1", "OUT": str(out),
                                                         "PYTHONPATH": str(script.parent.parent), **env})


ITEMS = ("check", "throughput", "profile", "imagenet", "jpeg", "quick", "table", "recipes", "ladder", "depths")


@pytest.mark.slow
def test_next_walks_the_whole_queue_then_skips_what_is_done(tmp_path):
    script = dry_tree(tmp_path / "there")
    res = tmp_path / "there" / "runs" / "device-dryrun" / "results"
    # budgets a CPU shared with other work still meets (alone, the whole walk takes about a minute on 2 cores)
    roomy = {f"BUDGET_{item}": "900" for item in ITEMS}
    r = next_call(script, tmp_path / "out", **roomy)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "=== throughput (budget 900s)" in r.stdout  # BUDGET_<item> sets the item's budget
    assert "pending: " in r.stdout and "need no data set" in r.stdout  # the plan, before anything runs
    for item in ITEMS:
        assert f"=== {item} done" in r.stdout, item
        mark = json.loads((res / "device" / f"{item}.json").read_text())
        assert mark["item"] == item and mark["device"].startswith("CPU") and mark["torch_version"]
    rows = json.loads((res / "bench.json").read_text())  # a dry run: one variant of each step form
    assert sorted(row["config_name"] for row in rows) == ["fast b512-reduce-overhead synthetic",
                                                          "fast b512-step-graph synthetic"]
    assert all(row["baseline_img_per_s"] > 0 and row["floor_img_per_s"] > 0 for row in rows)
    assert sorted(p.name for p in (res / "profile").iterdir()) == [
        "fast-b512-reduce-overhead.txt", "fast-b512-step-graph.txt"]
    assert "A step alone" in (res / "profile" / "fast-b512-step-graph.txt").read_text()
    imagenet = json.loads((res / "bench-imagenet.json").read_text())  # ResNet-50 with and without the step graph
    assert [row["config_name"] for row in imagenet] == ["imagenet rn50-b256-compile", "imagenet rn50-b256-step-graph"]
    assert all(row["depth"] == 50 and row["baseline_config"]["precision"]["amp"] == "off" for row in imagenet)
    jpeg = [json.loads(line) for line in (res / "jpeg.json").read_text().splitlines()]
    assert {row["loader"] for row in jpeg} >= {"workers", "gpu"}
    for stack_out in ("stack-quick", "stack-table", "tune-recipe", "stack"):
        assert (res / stack_out / "stack.md").is_file(), stack_out
    packing = json.loads((res / "stack-table" / "packing.json").read_text())  # 3 seeds: seed 0 alone, 2 packed
    assert packing["concurrent"] == 2 and packing["packed_img_per_s"] > 0 and packing["speedup"] > 0
    assert "largest_derived_vs_measured" in packing
    assert (res / "depths" / "resnet-depths.md").is_file()
    with tarfile.open(tmp_path / "out" / "results.tgz") as tar:
        names = set(tar.getnames())
    assert {f"runs/device-dryrun/results/device/{item}.json" for item in ITEMS} <= names
    assert not (tmp_path / "there" / "results" / "device").exists()  # a dry run never marks the real queue

    again = next_call(script, tmp_path / "out2", **roomy)
    assert again.returncode == 0, again.stderr[-2000:]
    assert all(f"=== {item}: done before, skipped" in again.stdout for item in ITEMS)
    assert len(json.loads((res / "bench.json").read_text())) == 2  # nothing ran again


def test_every_variant_the_queue_measures_is_a_valid_config():
    """What throughput and profile run on a GPU, over configs/fast.toml: each variant's flags load and validate (a
    dry run executes one variant of each step form)."""
    import re
    import shlex

    from fastres import config

    text = (ROOT / "launch" / "device.sh").read_text()
    variants = re.findall(r'"([\w-]+)\|([^"]*)"', text.split("VARIANTS=(", 1)[1].split(")\n", 1)[0])
    assert [label for label, _ in variants] == ["b512-reduce-overhead", "b512-step-graph", "b1024-reduce-overhead",
                                                "b1024-step-graph"]
    for label, flags in variants:
        cfg = config.load(ROOT / "configs" / "fast.toml", ["--data.source=synthetic", *shlex.split(flags)])
        assert cfg.optim.batch_size == (1024 if label.startswith("b1024") else 512), label
        assert cfg.precision.step_graph == label.endswith("step-graph"), label


def test_the_imagenet_items_configs_hold_on_a_gpu():
    """What the imagenet item runs on a GPU: ResNet-50 at 224, batch 256, bf16 + channels_last + compile, with and
    without the step graph, and its fp32 eager baseline, each a valid config (the dry run shrinks them)."""
    from fastres import config
    fast = config.load(ROOT / "configs" / "bench-imagenet.toml")
    graph = config.load(ROOT / "configs" / "bench-imagenet.toml", ["--precision.step_graph=true"])
    base = config.load(ROOT / "configs" / "bench-imagenet-baseline.toml")
    assert (fast.model.depth, fast.data.side, fast.optim.batch_size, fast.precision.amp) == (50, 224, 256, "bf16")
    assert graph.precision.step_graph and fast.precision.channels_last and fast.precision.compile
    assert (base.precision.amp, base.precision.compile, base.data.side) == ("off", False, 224)


@pytest.mark.slow
def test_next_stops_an_item_at_its_budget_packs_and_goes_on(tmp_path):
    script = dry_tree(tmp_path / "there")
    marks = tmp_path / "there" / "runs" / "device-dryrun" / "results" / "device"
    marks.mkdir(parents=True)
    for item in ITEMS[2:]:  # profile and the rest: done before
        (marks / f"{item}.json").write_text("{}\n")
    r = next_call(script, tmp_path / "out", BUDGET_throughput="2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "=== check done" in r.stdout
    assert "=== throughput (budget 2s)" in r.stdout
    assert "=== throughput not done (exit 124: out of its budget" in r.stdout
    assert not (marks / "throughput.json").exists() and (marks / "check.json").exists()
    with tarfile.open(tmp_path / "out" / "results.tgz") as tar:
        assert "runs/device-dryrun/results/device/check.json" in tar.getnames()  # packed after the stopped item too
    assert (tmp_path / "out" / "device.log").read_text().count("=== throughput") == 2


def test_next_checks_what_it_will_write_before_it_runs_anything(tmp_path):
    script = dry_tree(tmp_path / "there")
    res = tmp_path / "there" / "runs" / "device-dryrun" / "results"
    (res / "profile").parent.mkdir(parents=True)
    (res / "device").write_text("a file where the done marks go")
    r = next_call(script, tmp_path / "out")
    assert r.returncode == 2 and "=== check" not in r.stdout, r.stdout[-2000:]
    assert r.stderr.strip() == (f"launch/device.sh: cannot write to {Path('runs/device-dryrun/results/device')}, "
                                "where the queue writes what it measures: make it writable (or move what is in the "
                                "way) and call again; nothing was run"), r.stderr


def test_an_item_budget_of_0_skips_it_and_a_bad_one_is_refused(tmp_path):
    script = dry_tree(tmp_path / "there")
    marks = tmp_path / "there" / "runs" / "device-dryrun" / "results" / "device"
    marks.mkdir(parents=True)
    for item in ITEMS[1:]:
        (marks / f"{item}.json").write_text("{}\n")
    r = next_call(script, tmp_path / "out", BUDGET_check="0")
    assert r.returncode == 0 and re.search(r"check +0 s +- +skipped \(budget 0\)", r.stdout), r.stdout[-2000:]
    assert "=== check: budget 0 (BUDGET_check=0): skipped in this call" in r.stdout
    assert not (marks / "check.json").exists() and "=== check (budget" not in r.stdout
    r = next_call(script, tmp_path / "out", BUDGET_check="soon")
    assert r.returncode == 2 and "BUDGET_check=soon: a whole number of seconds (0 skips check)" in r.stderr


def test_next_outside_a_dry_run_wants_the_recorded_head_and_waits_for_data(tmp_path):
    """Without .git a run needs what prepare recorded; without CIFAR-10 the data items wait, said once, naming
    what to set."""
    script = copy_of_script(tmp_path / "repo")
    r = sh(script, "next")
    assert r.returncode == 2 and "no .device/git_sha" in r.stderr
    script = dry_tree(tmp_path / "there")
    (tmp_path / "there" / ".device").mkdir()
    (tmp_path / "there" / ".device" / "git_sha").write_text("abc\n")
    marks = tmp_path / "there" / "results" / "device"
    marks.mkdir(parents=True)
    for item in ITEMS[:5]:  # the items that need no data set: done before
        (marks / f"{item}.json").write_text("{}\n")
    import os
    env = {k: v for k, v in os.environ.items() if k != "FASTRES_DATA"}
    for args, data in (((), {"FASTRES_DATA": str(tmp_path / "nowhere")}), ((f"--data={tmp_path / 'nowhere'}",), {})):
        r = subprocess.run(["bash", str(script), "next", *args], capture_output=True, text=True, timeout=120,
                           cwd=tmp_path / "there", env={**env, "OUT": str(tmp_path / "out"), **data})
        assert r.returncode == 0, r.stderr
        assert "=== quick and the rest need CIFAR-10" in r.stdout and "FASTRES_DATA" in r.stdout
        assert "--data=DIR" in r.stdout and r.stdout.count("need CIFAR-10, not found") == 1
        assert not any(f"=== {item} (budget" in r.stdout for item in ITEMS)  # nothing ran
        assert not (marks / "quick.json").exists()


# ------------------------------------------------------------------------------------------- launch/multinode.sh

TINY = ["--data.source=synthetic", "--data.subset=96", "--data.test_subset=32", "--model.depth=8",
        "--optim.batch_size=32", "--data.loader=gpu", "--run.device=cpu", "--run.epochs=1"]


def multinode(tmp_path, env: dict, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """launch/multinode.sh with PATH less any nvidia-smi (a CPU node), as a user runs it."""
    import os
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                           if not (Path(p) / "nvidia-smi").exists())
    return subprocess.run(["bash", "launch/multinode.sh", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PATH": path, "OMP_NUM_THREADS": "1", **env})


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_multinode_on_a_node_without_gpus_runs_one_cpu_process_and_says_so(tmp_path):
    r = multinode(tmp_path, {"NNODES": "1", "MASTER": f"127.0.0.1:{free_port()}"}, *TINY,
                  f"--run.out_dir={tmp_path / 'run'}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "multinode.sh: no GPU on" in r.stderr and "one CPU process here" in r.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["world_size"] == 1


def test_multinode_refuses_a_rendezvous_port_another_program_holds(tmp_path):
    import socket
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        r = multinode(tmp_path, {"NNODES": "1", "MASTER": f"127.0.0.1:{port}"}, *TINY, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        f"multinode.sh: port {port} on 127.0.0.1 (this node) is held by another program: stop it, or choose another "
        "port in MASTER on every node"), r.stderr


@pytest.mark.slow
def test_multinode_says_when_not_every_node_joined_and_repeats_fastres_line_last(tmp_path):
    r = multinode(tmp_path, {"NNODES": "2", "MASTER": f"127.0.0.1:{free_port()}", "JOIN_TIMEOUT_S": "5"}, *TINY,
                  f"--run.out_dir={tmp_path / 'run'}")
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and last.startswith("multinode.sh: not all NNODES=2 nodes joined the rendezvous"), \
        r.stderr[-3000:]
    r = multinode(tmp_path, {"NNODES": "1", "MASTER": f"127.0.0.1:{free_port()}"}, *TINY, "--data.subset=5",
                  f"--run.out_dir={tmp_path / 'bad'}")
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and last.startswith("fastres: error: ") and "data.subset" in last, r.stderr[-3000:]
