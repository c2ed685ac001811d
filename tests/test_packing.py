"""Many runs at once for the accuracy columns, runs alone for the clock (fastres.tools.stack --concurrent): on the
CPU, two runs at a time on 2 cores; a shared run says so; the same seed gives the same numbers alone or shared; a
row's derived time is checked against its measured one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastres.log import SUMMARY, TIMING_FIELDS, read_metrics
from fastres.tools import report, stack

from conftest import ROOT

STACK = """
[stack]
name = "packing test"
base = "{base}"
device = "cpu"
seeds = 2

[[ladder]]
name = "baseline"
[ladder.set]
"data.source" = "synthetic"
"data.loader" = "gpu"
"data.subset" = 256
"data.val_size" = 0
"data.test_subset" = 64
"run.epochs" = 2
"model.depth" = 8
"optim.batch_size" = 64
"run.target_acc" = 0.01
"run.deterministic" = true
"log.every_steps" = 0

[[ladder]]
name = "+ batch 128"
set = { "optim.batch_size" = 128 }
"""
FLAGS = ["--run.threads=1"]  # one thread a run, alone or packed: the same sums, so the same numbers


def stack_file(tmp_path: Path) -> Path:
    path = tmp_path / "packing.toml"
    path.write_text(STACK.replace("{base}", str(ROOT / "configs" / "smoke.toml")))
    return path


def summaries(runs: Path) -> dict[str, dict]:
    return {str(p.parent.relative_to(runs)): json.loads(p.read_text()) for p in sorted(runs.glob("*/*/" + SUMMARY))}


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


@pytest.mark.slow
def test_packed_runs_say_they_shared_count_like_runs_alone_and_get_derived_times(tmp_path, capsys):
    path = stack_file(tmp_path)
    packed, alone = tmp_path / "packed", tmp_path / "alone"
    assert stack.cli([f"--config={path}", f"--runs={packed}", f"--out={tmp_path / 'rep'}", "--concurrent=2",
                      *FLAGS]) == 0
    said = capsys.readouterr().out
    assert "packed, up to 2 at once" in said and "baseline speed: done" in said
    got = summaries(packed)
    assert sorted(got) == ["baseline/seed0", "baseline/seed1", "baseline/speed", "plus-batch-128/seed0",
                           "plus-batch-128/seed1", "plus-batch-128/speed"]
    for name in ("baseline/seed0", "baseline/speed", "plus-batch-128/speed"):  # the clocks that count: alone
        assert stack.SHARED not in got[name], name
    # the first two packed runs start together; the last shares with whichever is still going, if any
    first = got["baseline/seed1"][stack.SHARED]
    assert "+ batch 128 seed 0" in first["others"] and first["most_at_once"] == 2
    assert "baseline seed 1" in got["plus-batch-128/seed0"][stack.SHARED]["others"]
    last = got["plus-batch-128/seed1"].get(stack.SHARED)
    assert last is None or last["others"] in (["baseline seed 1"], ["+ batch 128 seed 0"])
    assert got["baseline/speed"]["epochs"] == 2 and got["baseline/speed"]["config"]["run"]["stop_at_target"] is False

    # the same seeds alone, one at a time: the same accuracies, epochs and curves
    assert stack.cli([f"--config={path}", f"--runs={alone}", f"--out={tmp_path / 'rep-alone'}", *FLAGS]) == 0
    for name, s in summaries(alone).items():
        p = got[name]
        assert (p["final_test_acc"], p["epochs_to_target"], p["steps"]) == (
            s["final_test_acc"], s["epochs_to_target"], s["steps"]), name
        assert untimed(read_metrics(packed / name)) == untimed(read_metrics(alone / name)), name
        assert stack.SHARED not in s

    # the report: the baseline measured (its seed 0 alone) and derived; the other row derived or refused
    md = (tmp_path / "rep" / "stack.md").read_text()
    assert "| combination | processes | seeds |" in md  # CPU processes, not GPUs
    manifest, rows = report.collect(packed)
    base, other = rows
    assert base["time_source"] == "measured" and base["timed_alone"] == 1 and other["timed_alone"] == (last is None)
    assert base["time_measured_s"] == got["baseline/seed0"]["time_to_target_s"]  # the alone run's clock alone
    speed = got["plus-batch-128/speed"]
    steps_per_epoch = got["plus-batch-128/seed0"]["steps"] / got["plus-batch-128/seed0"]["epochs_trained"]
    assert other["time_derived_s"] == pytest.approx(
        other["epochs_to_target_mean"] * steps_per_epoch * speed["train_time_s"] / speed["steps"])
    worst = manifest["derived_check"]["worst"]
    assert f"- baseline: measured {base['time_measured_s']:.1f} s, derived {base['time_derived_s']:.1f} s" in md
    if last is None:  # a run of the row had the device alone: its time is measured
        assert other["time_source"] == "measured" and other["time_measured_s"] == got["plus-batch-128/seed1"][
            "time_to_target_s"]
    elif abs(worst) <= report.DERIVED_TOLERANCE:
        assert other["time_source"] == "derived" and f"| {other['time_derived_s']:.1f} (derived) |" in md
    else:
        assert other["time_source"] is None and "not measured alone" in md and "Derived times are not shown" in md
    gain = json.loads((tmp_path / "rep" / "packing.json").read_text())
    assert gain["concurrent"] == 2 and gain["packed_img_per_s"] > 0 and gain["alone_img_per_s"] > 0
    speeds = [got["baseline/speed"], got["plus-batch-128/speed"]]
    assert gain["alone_images"] == speeds[0]["steps"] * 64 + speeds[1]["steps"] * 128
    assert gain["packed_images"] == got["baseline/seed1"]["steps"] * 64 + sum(
        got[f"plus-batch-128/seed{k}"]["steps"] * 128 for k in (0, 1))
    assert gain["speedup"] == pytest.approx(gain["packed_img_per_s"] / gain["alone_img_per_s"])
    assert gain["largest_derived_vs_measured"] == worst and "Packed: up to 2 runs at once trained" in md

    # skip-if-done as before: nothing runs again
    capsys.readouterr()
    assert stack.cli([f"--config={path}", f"--runs={packed}", f"--out={tmp_path / 'rep'}", "--concurrent=2",
                      *FLAGS]) == 0
    assert "running" not in capsys.readouterr().out


def fake_run(folder: Path, *, time_s: float, epochs_to_target: int = 4, steps: int = 40, epochs: int = 10,
             shared: bool = False, img_per_s: float = 100.0) -> str:
    folder.mkdir(parents=True)
    s = dict(finished=True, time_to_target_s=time_s, target_acc=0.5, target_split="test", final_test_acc=0.6,
             device="CPU: test", world_size=1, img_per_s=img_per_s, git_sha="abc", torch_version="2", steps=steps,
             epochs_trained=epochs, epochs_to_target=epochs_to_target, train_time_s=time_s * 2, code_hash="h")
    if shared:
        s[stack.SHARED] = {"others": ["x seed 0"], "most_at_once": 2}
    (folder / SUMMARY).write_text(json.dumps(s))
    return str(folder)


@pytest.mark.parametrize("measured_a, trusted", [(4.1, True), (4.4, False)])
def test_derived_times_are_shown_only_while_rows_measured_both_ways_agree_within_5_percent(tmp_path, measured_a,
                                                                                          trusted):
    # row a: measured alone and derivable; row b: shared only. Speed runs: 0.25 s a step (40 steps in 10 s)
    runs = tmp_path / "runs"
    a = fake_run(runs / "a" / "seed0", time_s=measured_a)
    b = fake_run(runs / "b" / "seed0", time_s=3.0, shared=True, epochs_to_target=2)
    speed_a = fake_run(runs / "a" / "speed", time_s=5.0, steps=40)  # train_time_s 10 over 40 steps
    speed_b = fake_run(runs / "b" / "speed", time_s=5.0, steps=40)
    rows = [dict(name=n, group="ladder", nproc=1, seeds=1, status="done", runs=[r], speed=sp, note="")
            for n, r, sp in (("a", a, speed_a), ("b", b, speed_b))]
    (runs / report.MANIFEST).write_text(json.dumps(dict(name="t", rows=rows, packing=dict(
        concurrent=2, packed_s=10.0, packed_images=4000, alone_s=10.0, alone_images=1000))))
    manifest, (ra, rb) = report.collect(runs)
    assert ra["time_derived_s"] == pytest.approx(4 * 4 * 0.25) and rb["time_derived_s"] == pytest.approx(2.0)
    assert manifest["derived_check"]["worst"] == pytest.approx(4.0 / measured_a - 1)
    md = report.markdown(manifest, [ra, rb])
    gain = report.packing(manifest, [ra, rb])
    assert (gain["packed_img_per_s"], gain["alone_img_per_s"], gain["speedup"]) == (400.0, 100.0, 4.0)
    assert "Packed: up to 2 runs at once trained 400 img/s in all, against 100 img/s for one run alone: 4.00x" in md
    assert f"- a: measured {measured_a:.1f} s, derived 4.0 s ({4.0 / measured_a - 1:+.1%})" in md  # 4 x 4 x 0.25
    assert rb["time_source"] == ("derived" if trusted else None)
    if trusted:
        assert "| 2.0 (derived) |" in md and "Derived times are not shown" not in md
    else:
        assert "not measured alone" in md and "more than 5%" in md


def test_packing_flags_need_each_other_and_mps_needs_a_gpu(tmp_path, capsys):
    path = stack_file(tmp_path)
    assert stack.cli([f"--config={path}", "--alone=baseline", "--dry-run"]) == 2  # each refused before it writes
    assert "--alone" in capsys.readouterr().err
    assert stack.cli([f"--config={path}", "--mps", "--dry-run"]) == 2
    assert stack.cli([f"--config={path}", f"--runs={tmp_path / 'r'}", "--concurrent=2", "--mps"]) == 2
    assert "--mps needs a CUDA device" in capsys.readouterr().err
    assert stack.cli([f"--config={path}", "--concurrent=2", "--alone=nobody", "--dry-run"]) == 2
    assert stack.cli([f"--config={path}", f"--runs={tmp_path / 'd'}", f"--out={tmp_path / 'rep'}", "--concurrent=2",
                      "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "baseline seed 0: would run\n" in out and "baseline seed 1: would run (packed)" in out
    assert "+ batch 128 speed: would run" in out
