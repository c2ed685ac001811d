"""Evaluation's test-time augmentation (eval.tta): the flip average, and the plain accuracy beside it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastres import config, train
from fastres.data.base import normalize, to_batch
from fastres.data.cifar import MEAN, STD
from fastres.data.draws import PAD
from fastres.evaluate import accuracies, accuracy
from fastres.log import read_metrics


class LeftRight(torch.nn.Module):
    """Class 0 if the left half is brighter, 1 if the right half is: its mirror image says the opposite."""

    def forward(self, x):
        left, right = x[..., :16].mean((1, 2, 3)), x[..., 16:].mean((1, 2, 3))
        return torch.stack([left - right, right - left, torch.zeros_like(left)], 1)


def test_flip_averages_each_images_logits_with_its_mirror_images():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 10))
    images = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (300,))
    x = to_batch(normalize(images, MEAN, STD), torch.float32, False)
    with torch.no_grad():
        plain, mirrored = model(x), model(x.flip(3))
    expected_plain = (plain.argmax(1) == labels).float().mean().item()
    expected_flip = (((plain + mirrored) / 2).argmax(1) == labels).float().mean().item()
    got = accuracies(model, images, labels, tta="flip")
    assert got == pytest.approx({"off": expected_plain, "flip": expected_flip})
    assert accuracy(model, images, labels) == pytest.approx(expected_plain)
    assert accuracies(model, images, labels) == pytest.approx({"off": expected_plain})


def test_flip_translate_weighs_the_flip_average_and_two_moved_images():
    """Half the flip average, a quarter each of the flip averages of the training crops at offsets PAD -+ 1."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 32 * 32, 10))  # no pooling: a moved image scores differently
    images = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (300,))

    def flip_avg(u8):
        x = normalize(u8, MEAN, STD)
        return (model(x) + model(x.flip(3))) / 2

    padded = np.pad(images.numpy(), ((0, 0), (0, 0), (PAD, PAD), (PAD, PAD)))  # the training's crops
    crops = [torch.from_numpy(padded[..., o:o + 32, o:o + 32].copy()) for o in (PAD - 1, PAD + 1)]
    with torch.no_grad():
        plain = model(normalize(images, MEAN, STD))
        flip = flip_avg(images)
        both = flip / 2 + (flip_avg(crops[0]) + flip_avg(crops[1])) / 4
    acc = {k: (v.argmax(1) == labels).float().mean().item()
           for k, v in (("off", plain), ("flip", flip), ("flip-translate", both))}
    assert (both.argmax(1) != flip.argmax(1)).any()  # the moved images change some answers
    assert accuracies(model, images, labels, tta="flip-translate") == pytest.approx(acc)  # every level on the way


def test_flip_can_change_the_answer():
    """Mirror-symmetric evidence cancels: every image of a left-right model ties, its first class wins."""
    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    images[:2, ..., :16] = 200  # brighter left half: class 0
    images[2:, ..., 16:] = 200  # brighter right half: class 1
    labels = torch.tensor([0, 0, 1, 1])
    got = accuracies(LeftRight(), images, labels, tta="flip")
    assert got["off"] == 1.0 and got["flip"] == 0.5  # averaged logits tie at 0: argmax is class 0 for all
    with pytest.raises(ValueError, match="tta 'mirror'"):
        accuracies(LeftRight(), images, labels, tta="mirror")


@pytest.mark.parametrize("tta", ["flip", "flip-translate"])
def test_a_run_with_tta_logs_both_accuracies(small_cifar, tmp_path, tta):
    cfg = config.load(None, [f"--data.dir={small_cifar}", f"--run.out_dir={tmp_path / 'run'}", "--model.depth=8",
                             "--optim.batch_size=50", "--run.epochs=1", "--data.loader=gpu", "--data.val_size=50",
                             f"--eval.tta={tta}"])
    s = train.main(cfg)
    (row,) = read_metrics(tmp_path / "run")
    for split in ("test", "val"):
        assert 0 <= row[f"{split}_acc_no_tta"] <= 1 and 0 <= row[f"{split}_acc"] <= 1
    assert s["final_test_acc"] == row["test_acc"] and s["final_test_acc_no_tta"] == row["test_acc_no_tta"]
    assert s["final_val_acc_no_tta"] == row["val_acc_no_tta"]
    # flip-translate also logs the flip average alone; flip has nothing more to show
    assert ("test_acc_flip" in row) == (tta == "flip-translate")
    assert s["final_val_acc_flip"] == row.get("val_acc_flip")
