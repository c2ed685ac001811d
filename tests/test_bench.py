from __future__ import annotations

import json

import pytest
import torch

from fastres import config
from fastres.errors import UserError
from fastres.log import read_metrics
from fastres.tools import bench

from conftest import ROOT


@pytest.mark.slow
def test_loader_bench_writes_rows_and_ratios(small_cifar, tmp_path, capsys):
    out = tmp_path / "loaders.json"
    args = ["--what", "loaders", "--loaders", "gpu,workers", "--repeats", "1", f"--out={out}",
            f"--data.dir={small_cifar}", "--optim.batch_size=50", "--model.depth=8", "--precision.amp=off",
            "--data.num_workers=1"]
    assert bench.cli(args) == 0
    rows = json.loads(out.read_text())
    assert [r["loader"] for r in rows] == ["gpu", "workers"]
    for r in rows:
        for key in ("loader", "device", "img_per_s", "epoch_s", "batch_size", "git_sha", "torch_version"):
            assert key in r
        assert r["img_per_s"] > 0 and r["epoch_s"] > 0 and r["batch_size"] == 50 and r["images"] == 500
        assert r["config"]["data"]["loader"] == r["loader"]
    table = capsys.readouterr().out
    assert "| gpu |" in table and "1.00x" in table
    assert (tmp_path / "loaders.md").read_text().count("\n| ") == 3  # header + 2 rows
    # a second run appends
    assert bench.cli([*args[:2], "--loaders", "gpu", *args[4:]]) == 0
    assert len(json.loads(out.read_text())) == 3


def test_end_to_end_epoch_is_the_trainers_second_epoch(small_cifar, tmp_path, monkeypatch):
    cfg = config.load(None, [f"--data.dir={small_cifar}", "--optim.batch_size=50", "--model.depth=8",
                             "--data.loader=gpu"])
    seen = {}
    real = bench.read_metrics

    def spy(path):
        seen["rows"] = real(path)
        return seen["rows"]

    monkeypatch.setattr(bench, "read_metrics", spy)
    e2e = bench.end_to_end_epoch(cfg)
    rows = seen["rows"]
    assert e2e["epoch_s"] == rows[1]["train_time_s"] - rows[0]["train_time_s"] > 0
    assert read_metrics is real


def test_bad_bench_arguments(capsys, small_cifar):
    assert bench.cli(["--what", "nothing"]) == 2
    assert bench.cli(["--what", "loaders", "--loaders", "gpu,turbo", f"--data.dir={small_cifar}"]) == 2
    assert bench.cli(["--repeats", "0"]) == 2
    assert bench.cli(["--steps", "x"]) == 2
    err = capsys.readouterr().err
    assert "--what" in err and "turbo" in err and "--repeats" in err and "--steps" in err


@pytest.mark.parametrize("text, words", [('{"rows": []}', "holds a JSON dict, not the list"),
                                         ('[{"a": 1}', "is not valid JSON")])
def test_a_damaged_results_file_is_kept_and_named(tmp_path, text, words):
    path = tmp_path / "bench.json"
    path.write_text(text)
    with pytest.raises(UserError, match=words):
        bench.append_rows(path, [dict(a=2)], "train")
    assert path.read_text() == text and not path.with_suffix(".md").exists()


def test_train_bench_row_and_ratios(small_cifar, tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["--config", "configs/fast.toml", f"--out={out}", "--steps", "3", "--warmup", "1", "--time-to-target",
            f"--data.dir={small_cifar}", "--precision.amp=off", "--precision.compile=false", "--model.depth=8",
            "--optim.batch_size=100", "--run.epochs=2", "--run.eval_every=1", "--run.target_acc=0.01",
            "--data.num_workers=1"]
    assert bench.cli(args) == 0
    (row,) = json.loads(out.read_text())
    for key in ("device", "config_name", "world_size", "batch_size", "amp", "img_per_s", "epoch_s",
                "floor_img_per_s", "speedup_vs_baseline", "time_to_target_s", "git_sha", "torch_version"):
        assert key in row, key
    assert row["config_name"] == "fast" and row["world_size"] == 1 and row["batch_size"] == 100
    assert row["speedup_vs_baseline"] == pytest.approx(row["img_per_s"] / row["baseline_img_per_s"])
    floor = min(row["matmul_flops"] / row["flops_per_img"], row["copy_bytes_per_s"] / row["bytes_per_img"])
    assert row["floor_img_per_s"] == pytest.approx(floor)
    assert row["fraction_of_floor"] == pytest.approx(row["img_per_s"] / floor)
    assert row["epoch_s"] == pytest.approx(row["step_s"] * (500 // 100))
    assert row["time_to_target_s"] is not None and row["time_to_target_with_eval_s"] > row["time_to_target_s"]
    assert "of floor" in capsys.readouterr().out and (tmp_path / "bench.md").exists()


def test_model_cost_counts_resnet20():
    cost = bench.model_cost(config.load(None))
    # forward: about 41M multiply-adds per image (He 2015 Table 6 era estimates); backward twice that
    assert 2.2e8 < cost["flops_per_img"] < 2.7e8
    assert cost["bytes_per_img"] > 1e6


def test_profile_writes_its_table_from_real_steps(tmp_path, capsys, monkeypatch):
    from fastres.tools import profile
    monkeypatch.setattr(profile, "TRACES", tmp_path / "traces")
    args = ["--what", "profile", "--steps", "3", f"--out={tmp_path / 'prof'}", "--label=tiny",
            "--data.source=synthetic", "--data.subset=512", "--model.depth=8", "--optim.batch_size=64",
            "--precision.compile=false", "--precision.amp=off", "--run.device=cpu"]
    assert bench.cli(args) == 0
    text = (tmp_path / "prof" / "tiny.txt").read_text()
    assert text == capsys.readouterr().out
    for line in ("A step alone", "B real loop", "C profiled", "GPU: no kernels", "top host ops", "aten::"):
        assert line in text, line
    assert "data synthetic, batch 64" in text and (tmp_path / "traces" / "tiny.trace.json.gz").stat().st_size > 0


DISPATCH = ["--data.source=synthetic", "--data.subset=1024", "--model.depth=8", "--optim.batch_size=64",
            "--precision.compile=false", "--precision.amp=off", "--run.device=cpu", "--data.loader=gpu"]


def test_dispatch_counts_the_host_ops_of_a_step(monkeypatch):
    from fastres.data.gpu import GpuLoader
    from fastres.tools import dispatch

    def counts(*extra):
        cfg = config.load(ROOT / "configs" / "fast.toml", [*DISPATCH, *extra])
        return dispatch.count_host_ops(cfg, torch.device("cpu"), steps=4, warmup=1)
    graphed = counts("--precision.step_graph=true")
    # two copies of the batch into the graph's inputs, the lr fill, the replay: the loader's views cost nothing
    assert graphed["per_step"] == 4 and graphed["by_source"] == {"step": 4}
    assert graphed["by_op"][("step", "graph replay")] == 1 and graphed["by_op"][("step", "aten::copy_")] == 2
    assert graphed["epoch_start"] > 4  # the epoch's augmentation, once an epoch
    assert counts("--precision.step_graph=true", "--optim.ema_decay=0.9")["per_step"] == 5  # + the EMA weight fill
    eager = counts()
    assert eager["per_step"] > 50 and ("step", "aten::_fused_sgd_") in eager["by_op"]

    real_iter = GpuLoader.__iter__

    def one_more(self):  # an extra op in every batch the loop takes
        for x, y in real_iter(self):
            yield x.add(0), y
    monkeypatch.setattr(GpuLoader, "__iter__", one_more)
    more = counts("--precision.step_graph=true")
    assert more["per_step"] == 5 and more["by_op"][("loader", "aten::add")] == 1


def test_dispatch_command_prints_the_count(capsys):
    assert bench.cli(["--what", "dispatch", "--steps", "3", *DISPATCH, "--precision.step_graph=true"]) == 0
    out = capsys.readouterr().out
    assert "host ops per step: 4" in out and "graph replay 1 (step)" in out and "counts as one op" in out
