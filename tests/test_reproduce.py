"""Reproducing He 2015: precise BN, LSUV, gradient accumulation, dropout, determinism, curves, the depth table."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastres import checkpoint, config, evaluate, log, train
from fastres.config import ModelCfg
from fastres.evaluate import precise_bn_
from fastres.log import TIMING_FIELDS, read_metrics
from fastres.model import build_model, count_params, lsuv_
from fastres.step import train_on_batch
from fastres.tools import report


def tiny(small_cifar, tmp_path, *overrides):
    return config.load(None, [f"--data.dir={small_cifar}", f"--run.out_dir={tmp_path / 'run'}",
                              "--model.depth=8", "--optim.batch_size=50", "--run.epochs=2", "--data.loader=gpu",
                              "--data.val_size=50", *overrides])


# ------------------------------------------------------------------------------------------- precise BN

def _stem_bn_after_precise_bn(model, images, **kw):
    """precise_bn_ on ``model``, and the stem conv's outputs it made (the stem BN's inputs)."""
    seen = []
    hook = model.stem.conv.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    used = precise_bn_(model, images, **kw)
    hook.remove()
    return used, seen


def _pooled(outs):
    """Per channel: the mean and the population (biased) variance of every value in ``outs``, pooled."""
    values = torch.cat(outs).double().transpose(0, 1).flatten(1)
    return values.mean(1).float(), values.var(1, unbiased=False).float()


def test_precise_bn_pools_the_values_of_all_batches():
    torch.manual_seed(0)
    model = build_model(ModelCfg(depth=8, stochastic_depth=0.5, dropout=0.3)).eval()
    images = torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8)
    params = {k: v.clone() for k, v in model.named_parameters()}
    bn = model.stem.bn
    used, seen = _stem_bn_after_precise_bn(model, images, micro_batch=32, batches=2)
    assert used == 64 and len(seen) == 2  # two batches, not all three
    mean, var = _pooled(seen)
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var)
    assert bn.momentum == 0.1 and not model.training  # restored
    assert all(torch.equal(params[k], v) for k, v in model.named_parameters())  # weights untouched
    assert not bn._forward_pre_hooks and not bn._forward_hooks  # its hooks are gone


def test_precise_bn_pooled_variance_is_not_the_mean_of_batch_variances():
    """Two batches whose stem outputs have different means (dark images, then bright ones): the pooled
    variance holds the spread between the batches' means too, which averaging per-batch variances (the
    estimator precise BN used before, fvcore's _MeanOfBatchVarianceEstimator) misses."""
    torch.manual_seed(0)
    model = build_model(ModelCfg(depth=8)).eval()
    dark = torch.randint(0, 64, (32, 3, 32, 32), dtype=torch.uint8)
    bright = torch.randint(192, 256, (32, 3, 32, 32), dtype=torch.uint8)
    bn = model.stem.bn
    used, seen = _stem_bn_after_precise_bn(model, torch.cat([dark, bright]), micro_batch=32, batches=2)
    assert used == 64 and len(seen) == 2
    mean, var = _pooled(seen)
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var)
    within = torch.stack([o.var((0, 2, 3), unbiased=False) for o in seen]).mean(0)
    between = torch.stack([o.mean((0, 2, 3)) for o in seen]).var(0, unbiased=False)
    torch.testing.assert_close(bn.running_var, within + between)  # the law of total variance
    mean_of_variances = torch.stack([o.var((0, 2, 3)) for o in seen]).mean(0)  # the old estimate
    assert not torch.allclose(bn.running_var, mean_of_variances, rtol=0.1)
    assert (bn.running_var > 2 * mean_of_variances).any()


def _precise_bn_rank(rank, world, folder, images):
    """One gloo rank of the test below: precise BN on its share of ``images``; its BN buffers to a file."""
    torch.distributed.init_process_group("gloo", store=torch.distributed.FileStore(str(folder / "store"), world),
                                         rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = build_model(ModelCfg(depth=8))
        precise_bn_(model, images, micro_batch=16, batches=2, rank=rank, world=world)
        torch.save({k: v for k, v in model.state_dict().items() if "running" in k}, folder / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_precise_bn_pools_exactly_over_ranks(tmp_path):
    """2 gloo ranks x 2 batches of 16 == 1 process x the same 4 batches: the sums are pooled, not averaged."""
    import torch.multiprocessing as mp
    images = torch.cat([torch.randint(0, 128, (32, 3, 32, 32)), torch.randint(128, 256, (32, 3, 32, 32))])
    images = images.to(torch.uint8)[torch.arange(64).view(2, 32).T.flatten()]  # rank 0 dark, rank 1 bright
    mp.start_processes(_precise_bn_rank, args=(2, tmp_path, images), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    model = build_model(ModelCfg(depth=8))
    used, seen = _stem_bn_after_precise_bn(model, torch.cat([images[0::2], images[1::2]]), micro_batch=16, batches=4)
    assert used == 64 and len(seen) == 4
    mean, var = _pooled(seen)  # all 64 images' values: rank 0's dark ones and rank 1's bright ones
    torch.testing.assert_close(ranks[0]["stem.bn.running_mean"], mean)
    torch.testing.assert_close(ranks[0]["stem.bn.running_var"], var)
    for k, v in model.state_dict().items():
        if "running" in k:
            torch.testing.assert_close(ranks[0][k], v, msg=k)
            assert torch.equal(ranks[0][k], ranks[1][k]), k  # every rank holds the same statistics


def test_precise_bn_in_a_run_records_both_accuracies(small_cifar, tmp_path):
    train.main(tiny(small_cifar, tmp_path, "--eval.precise_bn=true", "--eval.precise_bn_batches=4"))
    rows = read_metrics(tmp_path / "run")
    assert all(0 <= r["test_acc_running_bn"] <= 1 and 0 <= r["test_acc"] <= 1 for r in rows)


# ------------------------------------------------------------------------------------------- LSUV

def test_lsuv_brings_every_layer_to_unit_variance():
    torch.manual_seed(0)
    model = build_model(ModelCfg(init="lsuv", shortcut="B"))
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    gen = torch.Generator().manual_seed(0)
    # the forward order, seen from the outside: each conv / fc layer when it first runs
    names = {m: n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    forward_order = []
    hooks = [m.register_forward_hook(lambda mod, i, o: forward_order.append(names[mod])) for m in names]
    with torch.no_grad():
        model.eval()(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    model.train()
    assert sorted(forward_order) == sorted(names.values())  # every layer, once
    assert forward_order != list(names.values())  # not the registration order: option B's shortcut conv
    assert forward_order.index("blocks.3.shortcut.conv") < forward_order.index("blocks.3.branch.conv1")  # runs first
    records = lsuv_(model, lambda: torch.randn(64, 3, 32, 32, generator=gen), tol_var=0.1, t_max=10)
    assert [r["layer"] for r in records] == forward_order
    for r in records:
        assert abs(r["var_last"] - 1) < 0.1 or r["tries"] == 10, r
    assert any(abs(r["var_before"] - 1) >= 0.1 for r in records)  # there was something to fix
    after = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running averages put back
    # measured again on a fresh batch, from the outside: unit variance at every conv
    outs = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda mod, i, o, n=n: outs.__setitem__(n, o.var().item()))
    from fastres.model import batchnorm_train_mode
    with torch.no_grad(), batchnorm_train_mode(model):
        model(torch.randn(256, 3, 32, 32, generator=gen))
    assert all(0.8 < v < 1.2 for v in outs.values()), outs


def test_lsuv_orthonormal_start_and_zero_branches():
    model = build_model(ModelCfg(init="lsuv", block="pre", zero_init_residual=True))
    w = model.blocks[0].branch.conv1.weight.flatten(1)
    torch.testing.assert_close(w @ w.T, torch.eye(w.shape[0]), atol=1e-5, rtol=0)  # orthonormal rows
    records = lsuv_(model, lambda: torch.randn(32, 3, 32, 32), t_max=3)
    zero = [r for r in records if r["layer"].endswith("conv2") and r["layer"].startswith("blocks")]
    assert zero and all(r["skipped"] for r in zero)  # zero-initialized branches are left at zero
    assert all(model.blocks[i].branch.conv2.weight.abs().sum() == 0 for i in range(3))


def test_lsuv_in_a_run_logs_the_variances(small_cifar, tmp_path):
    train.main(tiny(small_cifar, tmp_path, "--model.init=lsuv", "--run.epochs=1"))
    records = json.loads((tmp_path / "run" / "lsuv.json").read_text())
    assert len(records) == 8 and all({"layer", "var_before", "var_last", "tries"} <= set(r) for r in records)


# ------------------------------------------------------------------------------------------- accumulation

def _grads(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def _one_step(model, x, y, accum):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: only the gradient matters here
    grads = {}

    def keep(_opt):
        grads["g"] = _grads(model)
    opt.register_step_pre_hook(lambda o, a, k: keep(o))
    loss, correct = train_on_batch(model, opt, torch.amp.GradScaler("cpu", enabled=False), x, y, accum=accum)
    return grads["g"], loss, correct


def test_accumulation_equals_a_k_times_larger_batch_without_bn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 30 * 30, 10))
    x, y = torch.randn(24, 3, 32, 32), torch.randint(0, 10, (24,))
    g1, l1, c1 = _one_step(model, x, y, accum=1)
    for k in (2, 3, 4):
        gk, lk, ck = _one_step(model, x, y, accum=k)
        for a, b in zip(g1, gk):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(lk, l1)
        assert torch.equal(ck, c1)


def test_accumulation_with_bn_normalizes_each_micro_batch():
    """With BatchNorm, k micro-batches are k 'ghost batches': each normalized over its own images."""
    torch.manual_seed(0)
    model = build_model(ModelCfg(depth=8))
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    gk, _, _ = _one_step(model, x, y, accum=2)
    model.zero_grad()
    for m in range(2):  # by hand: every 2nd image, mean loss / 2
        (F.cross_entropy(model(x[m::2]), y[m::2]) / 2).backward()
    for a, b in zip(gk, _grads(model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()  # one batch of 16: different statistics, different gradient
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(gk, _grads(model)))


# ------------------------------------------------------------------------------------------- dropout

@pytest.mark.parametrize("kind", ["standard", "spatial"])
def test_dropout(kind):
    torch.manual_seed(0)
    base = build_model(ModelCfg())
    torch.manual_seed(0)
    off = build_model(ModelCfg(dropout=0.0, dropout_kind=kind))
    assert list(base.state_dict()) == list(off.state_dict())  # off: no module added
    torch.manual_seed(0)
    on = build_model(ModelCfg(dropout=0.5, dropout_kind=kind))
    assert count_params(on) == count_params(base) and list(on.state_dict()) == list(base.state_dict())
    x = torch.randn(4, 3, 32, 32)
    on.eval()
    torch.testing.assert_close(on(x), on(x))  # eval mode is deterministic
    base.load_state_dict(on.state_dict())
    base.eval()
    torch.testing.assert_close(on(x), base(x))  # and equals the network without dropout
    drop = on.blocks[0].branch.drop
    drop.train()
    h = torch.ones(2, 16, 8, 8)
    out = drop(h)
    assert set(out.unique().tolist()) <= {0.0, 2.0}  # inverted: survivors scaled by 1 / (1 - p)
    if kind == "spatial":  # whole channels at once
        per_channel = out.flatten(2)
        assert torch.all((per_channel == 0).all(-1) | (per_channel == 2).all(-1))
    else:
        assert not torch.all((out.flatten(2) == 0).all(-1) | (out.flatten(2) == 2).all(-1))


# ------------------------------------------------------------------------------------------- determinism

def test_same_seed_twice_gives_identical_metrics(small_cifar, tmp_path):
    extra = ["--run.deterministic=true", "--data.loader=workers", "--data.num_workers=1",
             "--model.dropout=0.2", "--model.stochastic_depth=0.3", "--model.init=lsuv"]
    train.main(tiny(small_cifar, tmp_path / "a", *extra))
    train.main(tiny(small_cifar, tmp_path / "b", *extra))
    timing = set(TIMING_FIELDS)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "a" / "run")) == strip(read_metrics(tmp_path / "b" / "run"))
    wa = checkpoint.load(tmp_path / "a" / "run" / checkpoint.NAME)["model"]
    wb = checkpoint.load(tmp_path / "b" / "run" / checkpoint.NAME)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    train.main(tiny(small_cifar, tmp_path / "c", *extra, "--run.seed=1"))
    assert strip(read_metrics(tmp_path / "c" / "run")) != strip(read_metrics(tmp_path / "a" / "run"))


# ------------------------------------------------------------------------------------------- curves + table

def test_every_run_draws_its_error_curves(small_cifar, tmp_path, monkeypatch):
    """curves.png after the last evaluation, and in between once log.CURVES_EVERY_S have passed since the last
    drawing: on a clock that moves 1 s an evaluation, 3 evaluations draw at the 2nd and 3rd (every 1.5 s), or at
    the 3rd alone (every hour)."""
    drawn, clock = [], [0.0]
    real_plot, real_evaluation = log.plot_curves, train._evaluation
    monkeypatch.setattr(log, "plot_curves", lambda rows, path, name: (drawn.append(len(rows)),
                                                                        real_plot(rows, path, name)))
    monkeypatch.setattr(log, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(train, "_evaluation", lambda *a: (clock.__setitem__(0, clock[0] + 1), real_evaluation(*a))[1])
    for every_s, expected in ((1.5, [2, 3]), (3600.0, [3])):
        drawn.clear()
        monkeypatch.setattr(log, "CURVES_EVERY_S", every_s)
        train.main(tiny(small_cifar, tmp_path / str(every_s), "--run.epochs=3"))
        assert drawn == expected
    png = tmp_path / "3600.0" / "run" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_metrics(tmp_path / "3600.0" / "run")
    assert len(rows) == 3 and all(0 <= r["train_acc"] <= 1 for r in rows)


def test_depth_table_from_hand_made_summaries(tmp_path):
    runs = tmp_path / "runs"
    rows = []
    for depth, errs, status in ((20, [8.5, 8.9], "done"), (32, [7.6], "incomplete"), (110, [], "needs 1 GPU")):
        dirs = []
        for seed in range(2):
            d = runs / f"r{depth}" / f"seed{seed}"
            dirs.append(str(d))
            if seed < len(errs):
                d.mkdir(parents=True)
                (d / "summary.json").write_text(json.dumps(dict(
                    finished=True, target_acc=0.91, time_to_target_s=None, epochs_to_target=None,
                    final_test_acc=1 - errs[seed] / 100, img_per_s=1.0, device="GPU X", world_size=1,
                    git_sha="b" * 40, torch_version="2.x", params=count_params(build_model(ModelCfg(depth=depth))),
                    config={"model": {"depth": depth}})))
        rows.append(dict(name=f"ResNet-{depth}", group="ladder", values={}, nproc=1, seeds=2, note="",
                         slug=f"r{depth}", status=status, runs=dirs))
    (runs / "stack.json").write_text(json.dumps(dict(name="depths", device="cuda", report="depths", rows=rows)))
    report.build_report(runs, tmp_path / "out")
    with open(tmp_path / "out" / "resnet-depths.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["depth"] for r in table] == ["20"]  # 32 has 1 of 2 seeds, 110 needs a GPU
    r = table[0]
    assert r["params"] == "269722" and float(r["paper_err"]) == 8.75
    assert float(r["test_err_mean"]) == pytest.approx(8.7)
    assert float(r["test_err_std"]) == pytest.approx(0.2828, abs=1e-3)
    assert float(r["diff_vs_paper"]) == pytest.approx(-0.05)
    md = (tmp_path / "out" / "resnet-depths.md").read_text()
    assert "| 20 | 269,722 | 2 | 8.70 ± 0.28 | 8.75 | -0.05 |" in md and "ResNet-110 (needs 1 GPU)" in md


def test_depth_table_header_without_runs(tmp_path):
    from fastres.tools import stack
    st = stack.load_stack(config.Path(__file__).parent.parent / "configs" / "depths.toml")
    st.runs_dir, st.out = tmp_path / "runs", tmp_path / "out"
    stack.run_stack(st, [], dry_run=True, say=lambda *a: None)
    report.build_report(st.runs_dir, st.out)
    assert (st.out / "resnet-depths.csv").read_text().strip() == ",".join(report.DEPTH_COLUMNS)


def test_tuning_runs_never_touch_the_test_set(small_cifar, tmp_path, monkeypatch):
    seen = []
    real_one, real_all = evaluate.accuracy, evaluate.accuracies

    def spy(real):
        def scored(model, images, labels, **kw):
            seen.append(len(labels))
            return real(model, images, labels, **kw)
        return scored

    monkeypatch.setattr(evaluate, "accuracy", spy(real_one))
    monkeypatch.setattr(evaluate, "accuracies", spy(real_all))
    s = train.main(tiny(small_cifar, tmp_path, "--eval.on_test=false", "--run.target_acc=0.01",
                        "--data.test_subset=77"))
    assert 77 not in seen and set(seen) == {50}  # only the 50 validation images were ever scored
    assert s["target_split"] == "val" and s["final_test_acc"] is None and s["time_to_target_s"] is not None
    assert all(r["test_acc"] is None for r in read_metrics(tmp_path / "run"))
    with pytest.raises(train.UserError, match="data.val_size"):
        train.main(tiny(small_cifar, tmp_path / "x", "--eval.on_test=false", "--data.val_size=0"))
