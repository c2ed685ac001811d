"""Evaluation's test-time augmentation (eval.tta): the flip average, and the plain accuracy beside it."""

from __future__ import annotations

import pytest
import torch

from fastres import config, train
from fastres.data import normalize, to_batch
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
    x = to_batch(normalize(images), torch.float32, False)
    with torch.no_grad():
        plain, mirrored = model(x), model(x.flip(3))
    expected_plain = (plain.argmax(1) == labels).float().mean().item()
    expected_flip = (((plain + mirrored) / 2).argmax(1) == labels).float().mean().item()
    got = accuracies(model, images, labels, tta="flip")
    assert got == pytest.approx({"off": expected_plain, "flip": expected_flip})
    assert accuracy(model, images, labels) == pytest.approx(expected_plain)
    assert accuracies(model, images, labels) == pytest.approx({"off": expected_plain})


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


def test_a_run_with_tta_logs_both_accuracies(small_cifar, tmp_path):
    cfg = config.load(None, [f"--data.dir={small_cifar}", f"--run.out_dir={tmp_path / 'run'}", "--model.depth=8",
                             "--optim.batch_size=50", "--run.epochs=1", "--data.loader=gpu", "--data.val_size=50",
                             "--eval.tta=flip"])
    s = train.main(cfg)
    (row,) = read_metrics(tmp_path / "run")
    for split in ("test", "val"):
        assert 0 <= row[f"{split}_acc_no_tta"] <= 1 and 0 <= row[f"{split}_acc"] <= 1
    assert s["final_test_acc"] == row["test_acc"] and s["final_test_acc_no_tta"] == row["test_acc_no_tta"]
    assert s["final_val_acc_no_tta"] == row["val_acc_no_tta"]
