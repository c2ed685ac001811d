"""optim.ema_decay: the weight average (fastres/optim.py) and what the training loop does with it."""

from __future__ import annotations

import pytest
import torch

from fastres import checkpoint, config, train
from fastres.data import cifar
from fastres.errors import UserError
from fastres.evaluate import accuracy
from fastres.log import read_metrics
from fastres.model import build_model
from fastres.techniques import WeightEMA

from conftest import killed_after_first_checkpoint

GRAPHABLE = ["--optim.impl=fused", "--optim.schedule=cosine", "--optim.nesterov=true"]


def tiny(small_cifar, out, *overrides: str) -> config.Config:
    return config.load(None, [f"--data.dir={small_cifar}", f"--run.out_dir={out}", "--model.depth=8",
                              "--optim.batch_size=50", "--run.epochs=2", "--data.loader=gpu", "--data.val_size=50",
                              *GRAPHABLE, *overrides])


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(config.load(None, ["--model.depth=8"]).model)


def test_the_average_follows_the_warmed_up_decay_over_parameters_and_bn_statistics():
    model = small_model()
    avg = WeightEMA(model, decay=0.9)
    floats = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    assert avg.names == list(floats) and any("running_var" in k for k in avg.names)
    assert not any("num_batches_tracked" in k for k in avg.names)
    ref = {k: v.clone().double() for k, v in floats.items()}
    gen = torch.Generator().manual_seed(1)
    for t in range(15):
        with torch.no_grad():
            for v in model.state_dict().values():
                if v.is_floating_point():
                    v.add_(torch.randn(v.shape, generator=gen))  # a "step": weights and BN statistics move
        d = min(0.9, (1 + t) / (10 + t))  # 0.1, 0.18, 0.25, ...; capped at 0.9 from t = 80
        for k, v in model.state_dict().items():
            if k in ref:
                ref[k] = d * ref[k] + (1 - d) * v.double()
        avg.update()
    assert avg.updates == 15 and avg.decay_at(0) == pytest.approx(0.1) and avg.decay_at(1000) == 0.9
    for name, a in zip(avg.names, avg.avg):
        torch.testing.assert_close(a.double(), ref[name], rtol=1e-5, atol=1e-5, msg=name)


def test_swapped_in_scores_the_average_and_puts_the_weights_back_even_after_an_error():
    model = small_model()
    avg = WeightEMA(model, decay=0.5)
    with torch.no_grad():
        for t in avg.avg:
            t.fill_(0.25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with avg.swapped_in():
        for name, t in model.state_dict().items():
            assert torch.equal(t, torch.full_like(t, 0.25)) if name in avg.names else torch.equal(t, before[name])
        model.state_dict()["stem.bn.running_mean"].fill_(7.0)  # what precise BN would do: dropped afterwards
    with pytest.raises(RuntimeError, match="inside"):
        with avg.swapped_in():
            raise RuntimeError("inside")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(torch.equal(t, torch.full_like(t, 0.25)) for t in avg.avg)  # the average itself is untouched


def test_state_round_trip_and_what_does_not_fit():
    a = WeightEMA(small_model(), decay=0.99)
    for _ in range(3):
        with torch.no_grad():
            for p in a.live:
                p.add_(1.0)
        a.update()
    b = WeightEMA(small_model(), decay=0.99)
    b.load_state_dict(a.state_dict())
    assert b.updates == 3 and all(torch.equal(x, y) for x, y in zip(a.avg, b.avg))
    state = a.state_dict()
    with pytest.raises(ValueError, match="holds"):
        b.load_state_dict({**state, "avg": dict(list(state["avg"].items())[1:])})
    with pytest.raises(RuntimeError):
        b.load_state_dict({**state, "avg": {**state["avg"], a.names[0]: torch.zeros(2)}})
    with pytest.raises(TypeError, match="updates"):
        b.load_state_dict({**state, "updates": -1})
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        WeightEMA(small_model(), decay=1.0)


def test_training_is_untouched_and_the_average_is_what_is_scored(small_cifar, tmp_path):
    """ema_decay changes what is evaluated, never what is trained: the weights equal the run without it bit
    for bit, <target>_acc_no_ema equals that run's accuracy, and <target>_acc is the saved average's."""
    off = train.main(tiny(small_cifar, tmp_path / "off"))
    on = train.main(tiny(small_cifar, tmp_path / "on", "--optim.ema_decay=0.8"))
    a, b = (checkpoint.load(tmp_path / r / checkpoint.NAME) for r in ("off", "on"))
    assert "ema" not in a and set(b["ema"]) == {"updates", "avg"}
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    rows_off, rows_on = read_metrics(tmp_path / "off"), read_metrics(tmp_path / "on")
    assert [r["test_acc"] for r in rows_off] == [r["test_acc_no_ema"] for r in rows_on]
    assert "test_acc_no_ema" not in rows_off[0] and off["final_test_acc_no_ema"] is None
    assert on["final_test_acc_no_ema"] == off["final_test_acc"] and on["final_val_acc_no_ema"] is None

    cfg = tiny(small_cifar, tmp_path / "on", "--optim.ema_decay=0.8")
    steps = on["steps"]
    assert b["ema"]["updates"] == steps
    model = build_model(cfg.model)
    model.load_state_dict({**b["model"], **b["ema"]["avg"]})
    assert any(not torch.equal(b["ema"]["avg"][k], b["model"][k]) for k in b["ema"]["avg"])
    data = cifar.split(cifar.read_cifar10(small_cifar), val_size=50, split_seed=cfg.data.split_seed)
    for split, key in ((data.test, "final_test_acc"), (data.val, "final_val_acc")):
        assert accuracy(model, torch.from_numpy(split.x), torch.from_numpy(split.y)) == on[key]


def test_resume_equals_uninterrupted_and_a_checkpoint_without_its_average_is_refused(small_cifar, tmp_path,
                                                                                     monkeypatch):
    extra = ["--optim.ema_decay=0.9", "--optim.batch_size=100", "--optim.warmup_epochs=1"]
    train.main(tiny(small_cifar, tmp_path / "a", *extra))
    killed_after_first_checkpoint(monkeypatch, lambda: train.main(tiny(small_cifar, tmp_path / "b", *extra)))
    path = tmp_path / "b" / checkpoint.NAME
    saved = path.read_bytes()
    state = checkpoint.load(path)
    del state["ema"]
    checkpoint.save(path, state)
    with pytest.raises(UserError, match="does not fit this run .*ema part is missing"):
        train.main(tiny(small_cifar, tmp_path / "b", *extra))
    path.write_bytes(saved)
    train.main(tiny(small_cifar, tmp_path / "b", *extra))
    a, b = checkpoint.load(tmp_path / "a" / checkpoint.NAME), checkpoint.load(path)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["ema"]["updates"] == b["ema"]["updates"]
    assert all(torch.equal(a["ema"]["avg"][k], b["ema"]["avg"][k]) for k in a["ema"]["avg"])
    ra, rb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [(r["test_acc"], r["test_acc_no_ema"]) for r in ra] == [(r["test_acc"], r["test_acc_no_ema"]) for r in rb]


def test_the_step_graph_holds_the_update_and_equals_the_plain_run_on_cpu(small_cifar, tmp_path):
    extra = ["--optim.ema_decay=0.9", "--optim.warmup_epochs=1"]
    plain = train.main(tiny(small_cifar, tmp_path / "plain", *extra))
    graphed = train.main(tiny(small_cifar, tmp_path / "graph", *extra, "--precision.step_graph=true"))
    a, b = (checkpoint.load(tmp_path / r / checkpoint.NAME) for r in ("plain", "graph"))
    assert all(torch.equal(a["ema"]["avg"][k], b["ema"]["avg"][k]) for k in a["ema"]["avg"])
    assert plain["final_test_acc"] == graphed["final_test_acc"]
    assert plain["final_test_acc_no_ema"] == graphed["final_test_acc_no_ema"]


def test_a_checkpoint_from_before_the_flag_resumes_as_flag_off(small_cifar, tmp_path, monkeypatch):
    """A run checkpointed by code that had no optim.ema_decay (its saved config lacks the key) resumes as the
    same run; asking it for an average it never kept is refused in one line."""
    train.main(tiny(small_cifar, tmp_path / "a"))
    killed_after_first_checkpoint(monkeypatch, lambda: train.main(tiny(small_cifar, tmp_path / "b")))
    path = tmp_path / "b" / checkpoint.NAME
    state = checkpoint.load(path)
    del state["config"]["optim"]["ema_decay"]
    checkpoint.save(path, state)
    with pytest.raises(UserError, match=r"different config \(optim.ema_decay\)"):
        train.main(tiny(small_cifar, tmp_path / "b", "--optim.ema_decay=0.9"))
    train.main(tiny(small_cifar, tmp_path / "b"))
    a, b = checkpoint.load(tmp_path / "a" / checkpoint.NAME), checkpoint.load(path)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
