from __future__ import annotations

import json

from fastres import bench, config
from fastres.log import read_metrics


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


def test_bad_bench_arguments(capsys):
    assert bench.cli(["--what", "nothing"]) == 2
    assert bench.cli(["--loaders", "gpu,turbo"]) == 2
    assert bench.cli(["--repeats", "0"]) == 2
    err = capsys.readouterr().err
    assert "--what" in err and "turbo" in err and "--repeats" in err
