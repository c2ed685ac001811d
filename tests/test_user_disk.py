"""What a user's disk and habits bring: odd file names, links, special files, permissions, files that change under a
run, a damaged cache, a touched metrics file; and the advice each error gives, followed."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from test_folder import cfg_for, loader, make_folder, needs

from fastres import build, checkpoint, config, train
from fastres.data import folder as folder_mod
from fastres.data.folder import folder_index, load_folder
from fastres.errors import UserError, shown
from fastres.log import METRICS

from conftest import ROOT, killed_after_first_checkpoint


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "imgs")


def folder_args(folder, out, *extra):
    return [f"--data.dir={folder}", "--data.source=folder", "--data.loader=workers", "--data.image_size=32",
            "--data.num_workers=0", "--model.family=imagenet", "--model.depth=18", "--model.width=8",
            "--optim.batch_size=8", "--run.epochs=1", "--run.device=cpu", f"--run.out_dir={out}",
            "--log.every_steps=0", "--run.target_acc=0.25", *extra]


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fastres: error:")]
    assert len(err) == 1, err
    return err[0]


def save_jpeg(path, side=(24, 20), colour=90):
    Image.fromarray(np.full((side[1], side[0], 3), colour, np.uint8)).save(path, "JPEG", quality=90)


# ------------------------------------------------------------------------------------- names a file system allows

def test_names_that_are_not_utf8_or_hold_a_newline_train_and_are_named_escaped(folder, tmp_path, capsys):
    cat = folder / "train" / "cat"
    odd = [os.fsdecode(b"caf\xe9.jpg"), "two\nlines.jpg", "tab\there.jpg"]
    for name in odd:
        save_jpeg(cat / name)
    index = folder_index(folder, tmp_path / "cache")
    again = folder_index(folder, tmp_path / "cache")  # read back from the cache: the same names, aligned
    for ix in (index, again):
        assert len(ix["train"]["paths"]) == len(ix["train"]["labels"]) == 27
        assert all(f"train/cat/{name}" in ix["train"]["paths"] for name in odd)
    assert train.cli(folder_args(folder, tmp_path / "run")) == 0
    (cat / odd[1]).write_bytes((cat / odd[1]).read_bytes()[:300])  # now it does not decode
    assert train.cli(folder_args(folder, tmp_path / "run2", "--run.epochs=2", "--optim.batch_size=27")) == 2
    line = one_error_line(capsys)
    assert "'" + str(cat) + "/two\\nlines.jpg'" in line and "not an image Pillow can read" in line, line
    assert shown(cat / odd[0]).endswith("caf\\xe9.jpg'")


def test_a_link_loop_a_dangling_link_and_a_special_file_are_named_not_a_hang(folder, tmp_path, capsys):
    cat = folder / "train" / "cat"
    os.symlink("loop.jpg", cat / "loop.jpg")  # a link to itself
    os.symlink("gone.jpg", cat / "dangling.jpg")
    os.symlink("..", cat / "up")  # a folder link back up: a folder inside a class folder
    os.mkfifo(cat / "pipe.jpg")  # opening it for reading would wait for a writer forever
    r = subprocess.run([sys.executable, "-m", "fastres.train", *folder_args(folder, tmp_path / "run")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("fastres: error:") == 1, r.stderr
    assert "and 3 more problem(s)" in r.stderr and "data.skip_bad" in r.stderr, r.stderr
    bad = dict(folder_index(folder)["bad"])
    assert "cannot be read" in bad["train/cat/loop.jpg"] and "dangling" in bad["train/cat/dangling.jpg"]
    assert "folder inside a class folder" in bad["train/cat/up"] and "not a regular file" in bad["train/cat/pipe.jpg"]
    assert train.cli(folder_args(folder, tmp_path / "skip", "--data.skip_bad=true")) == 0
    assert not (tmp_path / "run").exists()  # the failed start left nothing behind
    del capsys


def test_a_fifo_named_like_a_cifar_batch_is_one_line_not_a_hang(cifar_dir, tmp_path):
    data = tmp_path / "cifar-10-batches-py"
    data.mkdir()
    for f in cifar_dir.iterdir():
        os.symlink(f, data / f.name)  # links to the real files are read through
    (data / "data_batch_3").unlink()
    os.mkfifo(data / "data_batch_3")  # a read would wait for a writer forever
    r = subprocess.run([sys.executable, "-m", "fastres.train", f"--data.dir={data}", "--run.epochs=1",
                        f"--run.out_dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "data_batch_3 cannot be read (is a FIFO, not a regular file)" in r.stderr, r.stderr
    assert r.stderr.count("fastres: error:") == 1 and not (tmp_path / "run").exists(), r.stderr


def test_a_class_folder_this_process_cannot_list_is_named(folder, tmp_path, capsys, monkeypatch):
    locked = folder / "train" / "dog"
    if os.geteuid() != 0:
        locked.chmod(0)
    else:  # root reads every folder: the listing fails as it does for a user
        real = folder_mod.os.scandir

        def refused(path="."):
            if isinstance(path, (str, os.PathLike)) and os.fspath(path) == str(locked):
                raise PermissionError(13, "Permission denied", str(path))
            return real(path)
        monkeypatch.setattr(folder_mod.os, "scandir", refused)
    try:
        assert train.cli(folder_args(folder, tmp_path / "run")) == 2
        line = one_error_line(capsys)
        assert f"{locked}: is a folder this process cannot list (Permission denied; chmod" in line, line
        assert "chmod" in line
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("kind", ["workers", "workers-tv", "gpu", "dali"])
def test_a_file_removed_after_indexing_is_named_with_what_to_do(folder, tmp_path, kind):
    needs(kind)
    d = load_folder(cfg_for(folder), tmp_path / "run")
    gone = folder / d.train.paths[0]
    gone.unlink()
    ld = loader(d.train, kind, b=len(d.train), seed=3)
    with pytest.raises(UserError) as e:
        for _ in ld:
            pass
    msg = str(e.value)
    assert str(gone) in msg and "cannot be read (No such file or directory)" in msg, msg
    assert "re-index" in msg and "data.skip_bad" in msg and "\n" not in msg


def test_a_damaged_cached_index_is_rebuilt(folder, tmp_path):
    first = folder_index(folder, tmp_path)
    cache = tmp_path / folder_mod.INDEX
    for damage in (b"PK\x03\x04 not a zip", cache.read_bytes()[:100], b""):
        cache.write_bytes(damage)
        again = folder_index(folder, tmp_path)
        assert list(again["train"]["paths"]) == list(first["train"]["paths"])
        assert np.load(cache)["train_labels"].tolist() == list(first["train"]["labels"])


def test_phone_camera_jpegs_train_with_every_loader(folder, tmp_path):
    """MPO: the JPEG a phone writes with a second frame (a depth map, a preview) after the first; EXIF and a
    progressive scan too."""
    cat = folder / "train" / "cat"
    a = Image.fromarray(np.full((20, 24, 3), 200, np.uint8))
    a.save(cat / "phone.jpg", "MPO", save_all=True, append_images=[a.resize((12, 10))])
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotated
    a.save(cat / "exif.jpg", "JPEG", exif=exif, progressive=True)
    with Image.open(cat / "phone.jpg") as im:
        assert im.format == "MPO"
    for kind in ("workers", "dali"):
        if kind == "dali":
            pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
        assert train.main(config.load(None, folder_args(folder, tmp_path / kind, f"--data.loader={kind}")))["finished"]


# ------------------------------------------------------------------------------------- a run directory a user touched

def test_a_metrics_row_of_the_wrong_type_is_named_at_resume(small_cifar, tmp_path, monkeypatch, capsys):
    args = [f"--data.dir={small_cifar}", "--data.subset=200", "--data.test_subset=50", "--run.epochs=2",
            "--model.depth=8", "--optim.batch_size=50", f"--run.out_dir={tmp_path / 'r'}", "--log.every_steps=0"]
    killed_after_first_checkpoint(monkeypatch, lambda: train.main(config.load(None, args)))
    metrics = tmp_path / "r" / METRICS
    row = json.loads(metrics.read_text().splitlines()[0])
    metrics.write_text(json.dumps({**row, "epoch": None}) + "\n" + json.dumps(row) + "\n")
    capsys.readouterr()
    assert train.cli(args) == 2
    line = one_error_line(capsys)
    assert f"{metrics} line 1: epoch is null, not a whole number" in line, line
    metrics.write_text(json.dumps({**row, "test_acc": "high"}) + "\n" + json.dumps(row) + "\n")
    assert train.cli(args) == 2
    assert 'test_acc is "high", not a number' in one_error_line(capsys)


# ------------------------------------------------------------------------------------- advice that works when followed

def test_the_advice_for_a_changed_config_works_when_followed(small_cifar, tmp_path, capsys):
    base = [f"--data.dir={small_cifar}", "--data.subset=100", "--data.test_subset=50", "--run.epochs=1",
            "--model.depth=8", "--optim.batch_size=50", "--log.every_steps=0"]
    os.chdir(tmp_path)
    assert train.cli(base) == 0
    assert train.cli([*base, "--optim.lr_per_128=0.2"]) == 2
    line = one_error_line(capsys)
    assert "another --run.out_dir (or --run.name)" in line and "resume=never" not in line, line
    assert train.cli([*base, "--optim.lr_per_128=0.2", "--run.name=lr02"]) == 0  # the advice, followed


def test_a_corrupt_evaluation_image_says_what_skip_bad_does_there(folder, tmp_path, capsys):
    val = sorted((folder / "val" / "cat").glob("*.jpg"))[0]
    val.write_bytes(val.read_bytes()[:-20])  # its header reads, its pixels do not
    assert train.cli(folder_args(folder, tmp_path / "run")) == 2
    line = one_error_line(capsys)
    assert str(val) in line and "data.skip_bad = true to leave it out of evaluation" in line, line
    s = train.main(config.load(None, folder_args(folder, tmp_path / "skip", "--data.skip_bad=true")))
    assert s["finished"] and s["skipped_files"] >= 1


def test_images_added_after_a_checkpoint_are_named_as_the_cause(folder, tmp_path, monkeypatch, capsys):
    args = folder_args(folder, tmp_path / "run", "--run.epochs=2")
    killed_after_first_checkpoint(monkeypatch, lambda: train.main(config.load(None, args)))
    for k in range(3):
        save_jpeg(folder / "train" / "cat" / f"new{k}.jpg")
    capsys.readouterr()
    assert train.cli(args) == 2
    line = one_error_line(capsys)
    assert "the data changed since" in line and "24 training images" in line and "27 training images" in line, line
    assert "damaged" not in line and "put the data back" in line
    for k in range(3):
        (folder / "train" / "cat" / f"new{k}.jpg").unlink()
    assert train.cli(args) == 0  # put back: it resumes


def test_a_diverging_run_says_whether_a_checkpoint_is_kept(small_cifar, tmp_path, capsys, monkeypatch):
    real = build.build_schedule

    def exploding(cfg, steps_per_epoch, epochs):  # a learning rate that blows up from the first step
        s = real(cfg, steps_per_epoch, epochs)

        class Exploding(type(s)):
            def __call__(self, step):
                return 1e30

        return Exploding(**{f.name: getattr(s, f.name) for f in dataclasses.fields(s)})

    monkeypatch.setattr(build, "build_schedule", exploding)
    args = [f"--data.dir={small_cifar}", "--data.subset=100", "--data.test_subset=50", "--run.epochs=2",
            "--model.depth=8", "--optim.batch_size=50", f"--run.out_dir={tmp_path / 'r'}"]
    assert train.cli(args) == 2
    line = one_error_line(capsys)
    assert "NaN/inf" in line and "no checkpoint had been written, so nothing is kept" in line, line
    assert not (tmp_path / "r" / checkpoint.NAME).exists()


# ------------------------------------------------------------------------------------- no silent surprises

def test_warm_up_longer_than_the_run_is_said(small_cifar, tmp_path, capsys):
    assert train.cli([f"--data.dir={small_cifar}", "--data.subset=100", "--data.test_subset=50", "--run.epochs=1",
                      "--model.depth=8", "--optim.batch_size=50", "--optim.warmup_epochs=2",
                      f"--run.out_dir={tmp_path / 'r'}"]) == 0
    assert "warning: optim.warmup_epochs = 2 is not shorter than run.epochs = 1" in capsys.readouterr().err


def test_files_left_out_or_trained_grey_are_said_on_the_console(folder, tmp_path, capsys):
    cat = folder / "train" / "cat"
    (cat / "empty.jpg").write_bytes(b"")  # left out at index time
    cut = sorted(cat.glob("*.jpg"))[0]
    cut.write_bytes(cut.read_bytes()[:-20])  # a header that reads, pixels that do not: grey at decode time
    assert train.cli(folder_args(folder, tmp_path / "run", "--data.skip_bad=true")) == 0
    err = capsys.readouterr().err
    assert "data.skip_bad: left out 1 file(s)" in err and "empty.jpg" in err, err
    assert "data.skip_bad: 1 training file(s) did not decode and trained as grey images" in err and cut.name in err


def test_a_failed_start_leaves_no_run_directory(small_cifar, tmp_path, capsys):
    out = tmp_path / "runs" / "r"
    assert train.cli([f"--data.dir={small_cifar}", "--data.subset=100000", f"--run.out_dir={out}"]) == 2
    assert not out.exists() and "data.subset" in one_error_line(capsys)
    out.mkdir(parents=True)
    (out / "mine.txt").write_text("a user's file")
    assert train.cli([f"--data.dir={small_cifar}", "--data.subset=100000", f"--run.out_dir={out}"]) == 2
    assert (out / "mine.txt").read_text() == "a user's file"  # a directory it did not make is left as it was


def test_an_interruption_and_its_resume_count_the_same_way_and_a_finished_run_says_so(small_cifar, tmp_path,
                                                                                      monkeypatch, capsys):
    args = [f"--data.dir={small_cifar}", "--data.subset=200", "--data.test_subset=50", "--run.epochs=2",
            "--model.depth=8", "--optim.batch_size=50", f"--run.out_dir={tmp_path / 'r'}",
            "--run.checkpoint_every_s=1e-9", "--log.every_steps=0"]
    killed_after_first_checkpoint(monkeypatch, lambda: train.main(config.load(None, args)))  # after step 1
    capsys.readouterr()
    assert train.cli(args) == 0
    err = capsys.readouterr().err
    assert "fastres: resuming at epoch 1 step 1\n" in err, err
    assert train.cli(args) == 0  # started again: finished
    err = capsys.readouterr().err
    assert "holds a finished run (2 of 2 epochs): nothing to train" in err and "resuming" not in err, err
    assert "done:" not in err


def test_the_report_reads_the_last_stacks_runs_by_default(tmp_path, monkeypatch, capsys):
    from fastres.tools import report, stack
    monkeypatch.chdir(tmp_path)
    assert stack.cli([f"--config={ROOT / 'configs' / 'stack-smoke.toml'}", "--dry-run"]) == 0
    assert (tmp_path / "runs" / ".last-stack").read_text().strip().endswith("stack-smoke")
    capsys.readouterr()
    assert report.cli(["--out=rep"]) == 0
    assert (tmp_path / "rep").is_dir() and "run python -m fastres.tools.stack first" not in capsys.readouterr().err


def test_a_cut_off_file_under_dali_is_fastres_line_alone(folder, tmp_path):
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    cut = sorted((folder / "train" / "cat").glob("*.jpg"))[0]
    cut.write_bytes(cut.read_bytes()[:-20])  # its header reads, its scan stops short
    r = subprocess.run([sys.executable, "-m", "fastres.train",
                        *folder_args(folder, tmp_path / "run", "--data.loader=dali", "--run.threads=1")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    err = [line for line in r.stderr.splitlines() if not line.startswith("fastres: ") or "error" in line]
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("fastres: error: "), r.stderr
    assert str(cut) in err[0] and "[ERROR]" not in r.stderr
