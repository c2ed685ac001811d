"""The stacked-combination runner and the report it ends with."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fastres import log
from fastres.config import ConfigError
from fastres.tools import report, stack
from fastres.tools.stack import slugify

from conftest import ROOT


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_smoke_ladder_end_to_end(cifar_dir, tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "out"
    args = ["--config", str(ROOT / "configs" / "stack-smoke.toml"), f"--runs={runs}", f"--out={out}",
            f"--data.dir={cifar_dir}"]
    assert stack.cli(args) == 0
    for name in ("stack.md", "stack.csv", "stack.png"):
        assert (out / name).stat().st_size > 0
    manifest = json.loads((runs / "stack.json").read_text())
    rows = _csv(out / "stack.csv")
    assert [r["combination"] for r in rows] == [r["name"] for r in manifest["rows"]]
    assert [r["group"] for r in rows] == ["ladder", "ladder", "ladder", "alone"]
    for row, spec in zip(rows, manifest["rows"]):
        s = json.loads((Path(spec["runs"][0]) / "summary.json").read_text())
        assert float(row["final_test_acc_mean"]) == pytest.approx(s["final_test_acc"])
        assert row["world_size"] == str(s["world_size"]) == str(spec["nproc"])
        if s["time_to_target_s"] is not None:
            assert float(row["time_to_target_s_mean"]) == pytest.approx(s["time_to_target_s"])
        assert row["code_hash"] == s["code_hash"] == log.code_hash()
        assert s["config"]["run"]["device"] == "cpu"
    # the ladder is cumulative: row 3 (2 processes) keeps row 2's batch
    third = json.loads((runs / "plus-2-processes" / "seed0" / "summary.json").read_text())
    assert third["config"]["optim"]["batch_size"] == 256 and third["world_size"] == 2
    alone = json.loads((runs / "alone-gpu-loader" / "seed0" / "summary.json").read_text())
    assert alone["config"]["optim"]["batch_size"] == 128 and alone["config"]["data"]["loader"] == "gpu"
    base = float(rows[0]["time_to_target_s_mean"] or "nan")
    for r in rows:
        if r["speedup_vs_baseline"]:
            assert float(r["speedup_vs_baseline"]) == pytest.approx(base / float(r["time_to_target_s_mean"]))
    md = (out / "stack.md").read_text()
    assert "| baseline | 1 | 1/1 |" in md and "gpu loader *(alone)*" in md

    # skip-if-done: a second call runs nothing
    mtimes = {p: p.stat().st_mtime for p in runs.rglob("summary.json")}
    capsys.readouterr()
    assert stack.cli(args) == 0
    assert capsys.readouterr().out.count("done before, skipped") == 4
    assert {p: p.stat().st_mtime for p in runs.rglob("summary.json")} == mtimes
    # another recipe (an override) or other code would run again
    assert stack.cli([*args, "--dry-run", "--optim.momentum=0.8"]) == 0
    assert capsys.readouterr().out.count("would run") == 4


@pytest.mark.slow
def test_other_code_is_not_reused(cifar_dir, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    args = ["--config", str(ROOT / "configs" / "stack-smoke.toml"), f"--runs={runs}", f"--out={tmp_path}",
            f"--data.dir={cifar_dir}", "--only=baseline"]
    assert stack.cli(args) == 0
    capsys.readouterr()
    monkeypatch.setattr(log, "code_hash", lambda: "0123456789abcdef")
    assert stack.cli([*args, "--dry-run"]) == 0
    assert "baseline seed 0: would run" in capsys.readouterr().out


def test_rows_needing_more_gpus_are_listed_not_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(stack, "gpus_available", lambda: 1)
    st = stack.load_stack(ROOT / "configs" / "stack.toml", seeds=1)
    st.runs_dir, st.out = tmp_path / "runs", tmp_path / "out"
    assert stack.run_stack(st, [], dry_run=True, say=print)
    said = capsys.readouterr().out
    needs = [r for r in st.rows if r.status.startswith("needs")]
    assert {r.name for r in needs} == {r.name for r in st.rows if r.nproc > 1}
    assert all(r.status == "needs 4 GPUs" for r in needs) and "needs 4 GPUs (this machine has 1)" in said
    report.build_report(st.runs_dir, st.out)
    rows = {r["combination"]: r for r in _csv(st.out / "stack.csv")}
    assert rows["+ 4 GPUs"]["status"] == "needs 4 GPUs" and rows["+ 4 GPUs"]["time_to_target_s_mean"] == ""
    assert rows["baseline"]["status"] == "not run"


def test_stack_file_errors_name_the_row(tmp_path):
    def write(text):
        p = tmp_path / "s.toml"
        p.write_text(f'[stack]\nbase = "{ROOT / "configs" / "baseline.toml"}"\n' + text)
        return p
    with pytest.raises(ConfigError, match="row 'b'.*model.depth"):
        stack.load_stack(write('[[ladder]]\nname = "a"\n[[ladder]]\nname = "b"\nset = { "model.depth" = 21 }\n'))
    with pytest.raises(ConfigError, match="unknown key 'model.dpth'"):
        stack.load_stack(write('[[ladder]]\nname = "a"\nset = { "model.dpth" = 20 }\n'))
    with pytest.raises(ConfigError, match="from = 'zz' names no earlier row"):
        stack.load_stack(write('[[ladder]]\nname = "a"\n[[ladder]]\nname = "b"\nfrom = "zz"\n'))
    with pytest.raises(ConfigError, match="unique name"):
        stack.load_stack(write('[[ladder]]\nname = "a"\n[[ladder]]\nname = "a"\n'))
    with pytest.raises(ConfigError, match="no \\[\\[ladder\\]\\] rows"):
        stack.load_stack(write('[[alone]]\nname = "a"\n'))
    with pytest.raises(ConfigError, match="unknown key"):
        stack.load_stack(write('[[ladder]]\nname = "a"\ncolour = "red"\n'))


def test_ladder_inherits_and_alone_starts_from_the_baseline(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text(f'[stack]\nbase = "{ROOT / "configs" / "baseline.toml"}"\nseeds = 2\n'
                 '[[ladder]]\nname = "base"\n'
                 '[[ladder]]\nname = "+ amp"\nset = { "precision.amp" = "bf16" }\n'
                 '[[ladder]]\nname = "+ 2"\nnproc = 2\nset.model.block = "pre"\n'
                 '[[ladder]]\nname = "branch"\nfrom = "+ amp"\nseeds = 1\n'
                 '[[alone]]\nname = "pre"\nset = { "model.block" = "pre" }\n')
    st = stack.load_stack(p)
    rows = {r.name: r for r in st.rows}
    assert rows["+ 2"].values == {"precision.amp": "bf16", "model.block": "pre"} and rows["+ 2"].nproc == 2
    assert rows["branch"].values == {"precision.amp": "bf16"} and rows["branch"].nproc == 1
    assert rows["branch"].seeds == 1 and rows["+ amp"].seeds == 2
    assert rows["pre"].values == {"model.block": "pre"} and rows["pre"].slug == "alone-pre"
    cfg = stack.run_config(st, rows["+ 2"], 1, ["--data.dir=/d"])
    assert (cfg.run.seed, cfg.model.block, cfg.precision.amp, cfg.data.dir) == (1, "pre", "bf16", "/d")
    assert cfg.run.out_dir.endswith("plus-2/seed1")


def _summary(path, ttt, acc, *, seed=0, world=1, reached_epoch=5):
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps(dict(
        finished=True, target_acc=0.91, time_to_target_s=ttt, epochs_to_target=reached_epoch if ttt else None,
        final_test_acc=acc, img_per_s=1000.0 * world, device="GPU X", world_size=world, git_sha="a" * 40,
        code_hash="c" * 16, torch_version="2.x", seed=seed, config={})))
    (path / "metrics.jsonl").write_text(
        json.dumps(dict(epoch=1, train_time_s=1.0, test_acc=0.5)) + "\n"
        + json.dumps(dict(epoch=2, train_time_s=ttt or 9.0, test_acc=acc)) + "\n")


def test_report_from_hand_made_summaries(tmp_path):
    runs = tmp_path / "runs"
    rows = []
    for name, ttts, accs, nproc, status in (
            ("baseline", [100.0, 110.0, 120.0], [0.92, 0.921, 0.919], 1, "done"),
            ("fast", [10.0, 12.0, 14.0], [0.915, 0.916, 0.917], 1, "done"),
            ("never", [None, None, None], [0.80, 0.81, 0.82], 1, "done"),
            ("some", [20.0, None, 22.0], [0.911, 0.90, 0.912], 1, "done"),
            ("partial", [30.0], [0.93], 1, "incomplete"),
            ("big", [], [], 8, "needs 8 GPUs")):
        dirs = []
        for seed, (t, a) in enumerate(zip(ttts, accs)):
            _summary(runs / name / f"seed{seed}", t, a, seed=seed, world=nproc)
            dirs.append(str(runs / name / f"seed{seed}"))
        while len(dirs) < 3:
            dirs.append(str(runs / name / f"seed{len(dirs)}"))
        rows.append(dict(name=name, group="ladder", values={}, nproc=nproc, seeds=3, note="", slug=name,
                         status=status, runs=dirs))
    (runs / "stack.json").write_text(json.dumps(dict(name="hand-made", device="cuda", rows=rows)))
    assert report.cli([f"--runs={runs}", f"--out={tmp_path / 'out'}"]) == 0
    got = {r["combination"]: r for r in _csv(tmp_path / "out" / "stack.csv")}
    assert float(got["baseline"]["time_to_target_s_mean"]) == pytest.approx(110.0)
    assert float(got["baseline"]["time_to_target_s_std"]) == pytest.approx(10.0)
    assert float(got["fast"]["time_to_target_s_mean"]) == pytest.approx(12.0)
    assert float(got["fast"]["speedup_vs_baseline"]) == pytest.approx(110.0 / 12.0)
    assert float(got["fast"]["final_test_acc_mean"]) == pytest.approx(0.916)
    assert float(got["fast"]["epochs_to_target_mean"]) == 5.0
    assert got["never"]["status"] == "never reached" and got["never"]["time_to_target_s_mean"] == ""
    assert got["some"]["status"] == "2/3 seeds reached" and got["some"]["speedup_vs_baseline"] == ""
    assert got["partial"]["status"] == "1/3 seeds run" and got["partial"]["time_to_target_s_mean"] == ""
    assert got["big"]["status"] == "needs 8 GPUs" and got["big"]["seeds"] == "0"
    assert set(report.CSV_COLUMNS) >= {"combination", "device", "world_size", "seeds", "time_to_target_s_mean",
                                      "time_to_target_s_std", "final_test_acc_mean", "final_test_acc_std",
                                      "epochs_to_target_mean", "img_per_s", "speedup_vs_baseline", "git_sha",
                                      "torch_version"}
    md = (tmp_path / "out" / "stack.md").read_text()
    assert "| baseline | 1 | 3/3 | 110.0 ± 10.0 | 1.00x |" in md
    assert "| big | 8 | 0/3 | needs 8 GPUs |" in md and "| never | 1 | 3/3 | never reached |" in md


def test_report_without_a_stack_is_one_line(tmp_path, capsys):
    assert report.cli([f"--runs={tmp_path}"]) == 2
    assert "run python -m fastres.tools.stack first" in capsys.readouterr().err


@pytest.mark.parametrize("damage, words", [
    ("manifest torn", "stack.json is not valid JSON"),
    ("manifest a list", "holds a JSON list, not the dict"),
    ("manifest without rows", "is not a fastres.tools.stack manifest"),
    ("row without runs", "is not a fastres.tools.stack manifest"),
    ("summary without keys", "lacks device, git_sha"),
    ("metrics line", "line 1 is not a metrics row"),
])
def test_a_damaged_stack_is_one_line_and_writes_nothing(tmp_path, capsys, damage, words):
    runs = tmp_path / "runs"
    _summary(runs / "a" / "seed0", 10.0, 0.92)
    manifest = dict(name="m", device="cuda", rows=[dict(name="a", group="ladder", values={}, nproc=1, seeds=1,
                                                        note="", slug="a", status="done",
                                                        runs=[str(runs / "a" / "seed0")])])
    text = json.dumps(manifest)
    if damage == "manifest torn":
        text = text[:40]
    elif damage == "manifest a list":
        text = json.dumps([manifest])
    elif damage == "manifest without rows":
        text = json.dumps(dict(name="m"))
    elif damage == "row without runs":
        del manifest["rows"][0]["runs"]
        text = json.dumps(manifest)
    elif damage == "summary without keys":
        p = runs / "a" / "seed0" / "summary.json"
        s = json.loads(p.read_text())
        del s["device"], s["git_sha"]
        p.write_text(json.dumps(s))
    elif damage == "metrics line":
        p = runs / "a" / "seed0" / "metrics.jsonl"
        p.write_text("{oops\n" + p.read_text())
    (runs / "stack.json").write_text(text)
    assert report.cli([f"--runs={runs}", f"--out={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastres: error: ") and "\n" not in err and words in err, err
    assert not (tmp_path / "out").exists()


def test_a_torn_summary_means_the_run_is_rerun(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "summary.json").write_text('{"finished": tr')
    assert not stack.finished(d, None, "c" * 16)
    (d / "summary.json").write_text('[1, 2]')
    assert not stack.finished(d, None, "c" * 16)


def _val_stack(runs, rows_spec, split="val"):
    rows = []
    for name, values, results in rows_spec:
        dirs = []
        for seed, (ttt, acc) in enumerate(results):
            d = runs / slugify(name) / f"seed{seed}"
            d.mkdir(parents=True)
            (d / "summary.json").write_text(json.dumps(dict(
                finished=True, target_acc=0.91, target_split=split, time_to_target_s=ttt,
                epochs_to_target=3 if ttt else None, final_val_acc=acc, final_test_acc=acc if split == "test" else None,
                img_per_s=1.0, device="GPU X", world_size=1, git_sha="a" * 40, code_hash="c" * 16,
                torch_version="2.x", seed=seed, config={})))
            (d / "metrics.jsonl").write_text(json.dumps(dict(epoch=1, train_time_s=1.0, val_acc=acc)) + "\n")
            dirs.append(str(d))
        dirs += [str(runs / slugify(name) / f"seed{k}") for k in range(len(dirs), 2)]
        rows.append(dict(name=name, group="ladder", values=values, nproc=1, seeds=2, note="", slug=slugify(name),
                         status="done", runs=dirs))
    (runs / "stack.json").write_text(json.dumps(dict(name="tune", device="cuda", rows=rows)))
    return runs


def test_pick_takes_the_fastest_row_every_seed_of_which_reached_the_target(tmp_path, capsys):
    tuning = {"data.val_size": 5000, "eval.on_test": False, "run.eval_every": 1}
    runs = _val_stack(tmp_path / "a", [
        ("as written", tuning, [(9.0, 0.915), (11.0, 0.912)]),
        ("short", {**tuning, "run.epochs": 20, "optim.milestones": [0.3, 0.6]}, [(6.0, 0.911), (7.0, 0.913)]),
        ("faster once", {**tuning, "run.epochs": 10}, [(3.0, 0.912), (None, 0.905)]),  # one seed missed
        ("one seed", {**tuning, "run.epochs": 5}, [(1.0, 0.95)]),  # incomplete
    ])
    assert report.cli([f"--runs={runs}", "--pick"]) == 0
    out = capsys.readouterr()
    assert "picked 'short'" in out.err
    assert out.out.split() == ["--optim.milestones=[0.3,0.6]", "--run.epochs=20"]  # tuning-only keys left out


def test_pick_without_a_timed_row_takes_the_most_accurate_complete_row(tmp_path, capsys):
    runs = _val_stack(tmp_path / "b", [
        ("40 epochs", {}, [(None, 0.892), (None, 0.894)]),
        ("30 epochs", {"run.epochs": 30}, [(None, 0.887), (None, 0.888)]),
        ("100 epochs", {"run.epochs": 100}, [(None, 0.908)]),  # 1 of 2 seeds: not eligible
    ])
    assert report.cli([f"--runs={runs}", "--pick"]) == 0
    out = capsys.readouterr()
    assert "picked '40 epochs'" in out.err and out.out.strip() == ""


def test_pick_refuses_a_stack_measured_on_the_test_set(tmp_path, capsys):
    runs = _val_stack(tmp_path / "c", [("r", {}, [(5.0, 0.92), (5.0, 0.92)])], split="test")
    assert report.cli([f"--runs={runs}", "--pick"]) == 2
    assert "validation split only" in capsys.readouterr().err


def test_report_notes_the_accuracy_without_tta_or_ema(tmp_path):
    runs = _val_stack(tmp_path / "t", [("flip", {"eval.tta": "flip"}, [(None, 0.905), (None, 0.907)]),
                                       ("both", {"eval.tta": "flip-translate"}, [(None, 0.91), (None, 0.91)]),
                                       ("plain", {}, [(None, 0.90), (None, 0.90)]),
                                       ("ema", {"optim.ema_decay": 0.99}, [(None, 0.91), (None, 0.91)])])
    for seed, plain in enumerate((0.90, 0.902)):
        for row, extra in (("flip", {}), ("both", {"final_val_acc_flip": 0.906})):
            path = runs / row / f"seed{seed}" / "summary.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), "final_val_acc_no_tta": plain, **extra}))
        path = runs / "ema" / f"seed{seed}" / "summary.json"  # optim.ema_decay: the trained weights' own score
        path.write_text(json.dumps({**json.loads(path.read_text()), "final_val_acc_no_ema": plain}))
    _, rows = report.collect(runs)
    notes = {r["combination"]: r["note"] for r in rows}
    assert notes == {"flip": "without TTA: 90.10%", "both": "without TTA: 90.10%; flip TTA alone: 90.60%",
                     "plain": "", "ema": "without EMA: 90.10%"}


def test_stack_png_panels_are_titled_in_percent_with_plain_log_ticks_and_a_labelled_target(tmp_path):
    runs = _val_stack(tmp_path / "p", [("as written", {}, [(9.0, 0.915), (11.0, 0.912)]),
                                       ("short", {}, [(None, 0.89), (None, 0.895)])])
    for d in runs.glob("*/seed*"):  # curves over 0.6 .. 20 s, so the log axis spans decades
        accs = [0.3, 0.6, 0.8, 0.88, json.loads((d / "summary.json").read_text())["final_val_acc"]]
        (d / "metrics.jsonl").write_text("".join(json.dumps(dict(epoch=e + 1, train_time_s=0.6 * 2.4 ** e,
                                                                 val_acc=a)) + "\n" for e, a in enumerate(accs)))
    manifest, rows = report.collect(runs)
    fig = report.stack_figure(manifest, rows)
    times, curves = fig.axes
    assert fig.get_suptitle() == "tune" and all(ax.get_title() for ax in fig.axes)
    assert curves.get_ylabel() == "validation accuracy (%)"
    assert max(max(line.get_ydata(), default=0) for line in curves.lines) > 1  # percent, as the label says
    fig.canvas.draw()  # tick labels are made at draw time
    labels = [t.get_text() for t in curves.get_xticklabels() if t.get_text()]
    assert "1" in labels and "10" in labels and not any("^" in t or "times" in t for t in labels), labels
    handles, names = curves.get_legend_handles_labels()
    assert "target 91%" in names and "target 91%" in [t.get_text() for t in curves.get_legend().get_texts()]
    assert times.get_xlim()[0] == 0  # no negative seconds
    report.build_report(runs, tmp_path / "out")
    assert (tmp_path / "out" / "stack.png").stat().st_size > 0
