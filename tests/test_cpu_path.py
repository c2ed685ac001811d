"""The CPU side of the JPEG path: the benchmark beside torchvision's reference loader, the smaller copy of a folder,
and the intra-op threads a process chooses when it shares its cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from test_folder import make_folder

from fastres import distributed, train
from fastres.data.folder import folder_index
from fastres.tools import bench, resize_folder, sharing
from fastres.tools.jpeg import write_jpegs


@pytest.mark.slow
def test_the_cpu_loaders_bench_measures_every_row_beside_the_reference(tmp_path, capsys):
    pytest.importorskip("torchvision.io", reason="the reference loader is torchvision's")
    out = tmp_path / "loaders-jpeg.md"
    assert bench.cli(["cpu-loaders", "--images=100", "--repeats=1", "--prepared-side=96", "--data.image_size=32",
                      "--optim.batch_size=16", "--data.num_workers=1", f"--out={out}"]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())
    names = [(r["what"], r["name"]) for r in rows]
    assert names[:5] == [("train", "reference (torchvision ImageFolder + v2)"),
                         ("train", "reference, copy at max side 96"), ("train", "fastres workers, pil decoder"),
                         ("train", "fastres workers, torchvision decoder")] + names[4:5]
    assert names[-2:] == [("eval", "reference (torchvision ImageFolder + v2)"),
                          ("eval", "fastres (decoded once at start)")]
    assert all(r["img_per_s"] > 0 and r["cores"] == distributed.cores() and r["images"] == 100 for r in rows)
    for r in rows:  # each ratio is to its transform's reference on the original files
        ref = next(q for q in rows if q["what"] == r["what"] and q["name"].startswith("reference ("))
        assert r["ratio"] == pytest.approx(r["img_per_s"] / ref["img_per_s"])
    printed = capsys.readouterr().out.strip().splitlines()
    best = max(r["ratio"] for r in rows if "workers" in r["name"] and "copy" not in r["name"])
    assert printed[-2] == f"workers vs reference: {best:.2f}x"
    fastest = max((r for r in rows if r["what"] == "train" and not r["name"].startswith("reference")),
                  key=lambda r: r["ratio"])
    assert printed[-1] == f"fastest vs reference: {fastest['ratio']:.2f}x ({fastest['name']})"
    text = out.read_text()
    assert f"{distributed.cores()} cores" in text and "cpu-loaders --images=100" in text and printed[-1] in text


def test_the_generated_set_is_imagenet_like_in_size_and_file_bytes(tmp_path):
    root = write_jpegs(tmp_path / "j", 60, detail=True)
    files = sorted((root / "train").rglob("*.jpg"))
    sizes = np.array([Image.open(p).size for p in files])
    assert 330 < sizes[:, 0].mean() < 470 and 280 < sizes[:, 1].mean() < 440
    assert 80e3 < np.mean([p.stat().st_size for p in files]) < 140e3  # ImageNet's mean is about 110 KB


def test_a_smaller_copy_keeps_names_classes_and_small_files_and_leaves_out_a_bad_one(tmp_path, capsys):
    src = make_folder(tmp_path / "src")
    Image.fromarray(np.full((300, 500, 3), 128, np.uint8)).save(src / "train" / "cat" / "big.jpg", quality=90)
    Image.fromarray(np.full((90, 40, 3), 128, np.uint8)).save(src / "val" / "dog" / "tall.png")
    (src / "train" / "cat" / "cut.jpg").write_bytes((src / "train" / "cat" / "big.jpg").read_bytes()[:2000])
    out = tmp_path / "small"
    assert resize_folder.cli([str(src), f"--out={out}", "--max-side=64", "--workers=2"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "left out" in err[0] and "cut.jpg" in err[0], err
    assert not (tmp_path / "small.partial").exists()
    before, after = folder_index(src), folder_index(out)
    assert after["classes"] == before["classes"]
    for sub in ("train", "val"):  # the same files (less the bad one) under the same names, with the same labels
        kept = [k for k, p in enumerate(before[sub]["paths"]) if not p.endswith("cut.jpg")]
        assert list(after[sub]["paths"]) == [before[sub]["paths"][k] for k in kept]
        assert list(after[sub]["labels"]) == [before[sub]["labels"][k] for k in kept]
    for rel in after["train"]["paths"] + after["val"]["paths"]:
        with Image.open(src / rel) as a, Image.open(out / rel) as b:
            assert b.format == a.format and max(b.size) <= 64, rel  # a PNG stays a PNG
            if max(a.size) <= 64:  # small enough: the very bytes
                assert (out / rel).read_bytes() == (src / rel).read_bytes(), rel
    assert Image.open(out / "train" / "cat" / "big.jpg").size == (64, 38)
    assert Image.open(out / "val" / "dog" / "tall.png").size == (28, 64)
    assert resize_folder.cli([str(src), f"--out={out}"]) == 2  # it exists: refused, nothing touched
    assert "exists" in capsys.readouterr().err


def test_run_threads_set_says_and_respects_the_environment(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert distributed.choose_threads(3, 0) == "intra-op threads: 3 (run.threads)" and torch.get_num_threads() == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert distributed.choose_threads(0, 4) == "intra-op threads: 1 ($OMP_NUM_THREADS)"
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(distributed, "cores", lambda: 8)
        for local, workers, busy, chosen in ((1, 0, 0.1, 8), (1, 3, 0.0, 5), (1, 0, 1.2, 7), (1, 7, 3.0, 1),
                                             (2, 2, 0.0, 2), (2, 0, 4.4, 4), (2, 0, 5.0, 3), (16, 0, 0.0, 1)):
            monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
            monkeypatch.setattr(distributed, "busy_cores", lambda b=busy: b)
            line = distributed.choose_threads(0, workers)
            assert torch.get_num_threads() == chosen and line.startswith(f"intra-op threads: {chosen} (8 core"), line
            assert f"{min(workers, max(1, 8 // local))} for loader workers" in line
    finally:
        torch.set_num_threads(before)


def test_busy_cores_sees_a_busy_program():
    mine = sorted(os.sched_getaffinity(0))
    spinner = subprocess.Popen([sys.executable, "-c",
                                f"import os; os.sched_setaffinity(0, {{{mine[0]}}})\nwhile True: pass"])
    try:
        time.sleep(0.5)  # past its start-up
        assert distributed.busy_cores(0.5) >= 0.6  # one core, less scheduling noise; other work only adds
    finally:
        spinner.kill()
        spinner.wait()


def test_the_process_entry_says_its_threads_in_the_start_up_log(small_cifar, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        assert train.cli([f"--data.dir={small_cifar}", "--data.subset=100", "--data.test_subset=50",
                          "--run.epochs=1", "--model.depth=8", "--optim.batch_size=50", "--run.threads=1",
                          f"--run.out_dir={tmp_path / 'r'}", "--log.every_steps=0"]) == 0
    finally:
        torch.set_num_threads(before)
    assert "fastres: intra-op threads: 1 (run.threads)" in capsys.readouterr().err


@pytest.mark.slow
def test_the_sharing_bench_runs_a_training_process_alone_and_beside_a_busy_one(tmp_path):
    rows = sharing.measure(bench.CONFIGS / "bench-sharing.toml",
                           ["--data.subset=200", "--data.test_subset=50", "--data.val_size=0", "--run.epochs=1",
                            "--model.depth=8", "--optim.batch_size=50"])
    assert [r["threads"] for r in rows] == ["torch's default (a thread a core)", "fastres's choice"]
    assert all(r["alone"] > 0 and r["beside"] > 0 and r["ratio"] == r["beside"] / r["alone"] for r in rows)
    assert rows[0]["line_alone"] == f"intra-op threads: {distributed.cores()} (run.threads)"
    assert rows[1]["line_alone"].startswith("intra-op threads: ")
    assert "busy with other programs" in rows[1]["line_beside"]
    assert "| fastres's choice |" in sharing.table(rows)
