from __future__ import annotations

import dataclasses

import pytest
import tomllib

from fastres import config
from fastres.config import ConfigError

from conftest import ROOT, run_cli

CONFIGS = ROOT / "configs"


def test_choices_match_the_modules_that_take_them():
    """data.flip and eval.tta are checked against config's choices, and the modules that take them draw by the
    same tuples (one definition, in config), so a valid config cannot end in a module's traceback."""
    from fastres.config import FLIPS
    from fastres.evaluate import TTA
    meta = {f.name: f.metadata for cls in (config.DataCfg, config.EvalCfg) for f in dataclasses.fields(cls)}
    assert meta["flip"]["choices"] == FLIPS and meta["tta"]["choices"] == TTA
    assert meta["flip"]["choices"] is FLIPS and meta["tta"]["choices"] is TTA


def test_baseline_toml_equals_the_defaults():
    # `python -m fastres.train` with no flags and `--config configs/baseline.toml` train the same recipe.
    assert config.to_dict(config.load(CONFIGS / "baseline.toml")) == config.to_dict(config.load(None))
    # and it spells out every key (the README says so), but the two paths whose defaults depend on the machine
    written = tomllib.loads((CONFIGS / "baseline.toml").read_text())
    keys = {f"{sec}.{k}" for sec, values in config.to_dict(config.load(None)).items() for k in values}
    missing = keys - {f"{sec}.{k}" for sec, values in written.items() if isinstance(values, dict) for k in values}
    assert missing == {"run.out_dir", "data.dir"}


def test_baseline_is_the_seed_recipe():
    cfg = config.load(None)
    assert (cfg.model.depth, cfg.model.block, cfg.model.shortcut, cfg.model.stochastic_depth) == (20, "post", "A", 0.0)
    assert (cfg.optim.batch_size, cfg.optim.lr_per_128) == (128, 0.1)
    assert (cfg.optim.momentum, cfg.optim.weight_decay) == (0.9, 1e-4)
    assert (cfg.optim.schedule, cfg.optim.milestones, cfg.optim.warmup_epochs) == ("step", [0.5, 0.75], 0.0)
    assert (cfg.precision.amp, cfg.precision.channels_last, cfg.precision.compile) == ("off", False, False)
    assert (cfg.data.loader, cfg.run.epochs, cfg.run.target_acc) == ("workers", 164, 0.91)
    # every lever off (tests/test_levers.py checks the optimizer they leave is torch's plain SGD, bit for bit)
    assert (cfg.optim.lookahead_k, cfg.optim.wd_bn_bias, cfg.optim.ema_decay) == (0, True, 0.0)
    assert (cfg.data.flip, cfg.eval.tta, cfg.model.zero_init_residual) == ("random", "off", False)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    if "[stack]" in path.read_text():  # stack files: rows of train configs
        from fastres.tools import stack
        assert stack.load_stack(path).rows
    else:
        config.load(path)


def test_base_merges_parent_and_child_wins(tmp_path):
    (tmp_path / "parent.toml").write_text('[model]\ndepth = 56\nblock = "pre"\n[optim]\nbatch_size = 256\n')
    (tmp_path / "child.toml").write_text('base = "parent.toml"\n[model]\nblock = "post"\n')
    cfg = config.load(tmp_path / "child.toml")
    assert (cfg.model.depth, cfg.model.block, cfg.optim.batch_size) == (56, "post", 256)


def test_overrides_are_typed_from_the_dataclass():
    cfg = config.load(None, ["--model.depth=56", "--optim.lr_per_128=0.2", "--precision.channels_last=true",
                             "--optim.milestones=0.3,0.6", "--run.name=123", "--model.stochastic_depth=0"])
    assert cfg.model.depth == 56 and isinstance(cfg.model.depth, int)
    assert cfg.optim.lr_per_128 == 0.2 and cfg.precision.channels_last is True
    assert cfg.optim.milestones == [0.3, 0.6]
    assert cfg.run.name == "123" and cfg.run.out_dir == "runs/123"
    assert cfg.model.stochastic_depth == 0.0 and isinstance(cfg.model.stochastic_depth, float)
    assert config.load(None, ["--optim.milestones=[0.25, 0.5]"]).optim.milestones == [0.25, 0.5]


def test_overrides_beat_the_file(tmp_path):
    (tmp_path / "c.toml").write_text("[model]\ndepth = 56\n")
    assert config.load(tmp_path / "c.toml", ["--model.depth=32"]).model.depth == 32


def test_parse_args_forms():
    assert config.parse_args(["--config", "a.toml", "--model.depth", "56", "--run.seed=3"]) == (
        "a.toml", ["--model.depth=56", "--run.seed=3"])
    assert config.parse_args(["--config=b.toml"]) == ("b.toml", [])


def test_data_dir_from_env_then_default(monkeypatch):
    monkeypatch.setenv("FASTRES_DATA", "/somewhere/cifar")
    assert config.load(None).data.dir == "/somewhere/cifar"
    assert config.load(None, ["--data.dir=/x"]).data.dir == "/x"
    monkeypatch.delenv("FASTRES_DATA")
    assert config.load(None).data.dir == "data"  # the data root, holding cifar-10-batches-py and the rest


@pytest.mark.parametrize("override, words", [
    ("--model.dpth=20", ["model.dpth", "valid:", "depth"]),
    ("--modle.depth=20", ["modle", "valid:", "model"]),
    ("--model.depth=abc", ["model.depth", "integer"]),
    ("--model.depth=21", ["model.depth", "6n+2"]),
    ("--model.depth=2", ["model.depth", "6n+2"]),
    ("--model.block=mid", ["model.block", "post, pre"]),
    ("--model.shortcut=C", ["model.shortcut", "A, B"]),
    ("--model.sd_mode=exp", ["model.sd_mode", "uniform, linear"]),
    ("--model.stochastic_depth=1.0", ["model.stochastic_depth", "<"]),
    ("--model.stochastic_depth=-0.1", ["model.stochastic_depth", ">="]),
    ("--data.loader=fast", ["data.loader", "workers, gpu"]),
    ("--data.val_size=-1", ["data.val_size", ">="]),
    ("--optim.batch_size=0", ["optim.batch_size", ">="]),
    ("--optim.lr_per_128=0", ["optim.lr_per_128", ">"]),
    ("--optim.lr_per_128=nan", ["optim.lr_per_128", "finite"]),
    ("--optim.momentum=1.5", ["optim.momentum", "<"]),
    ("--optim.schedule=exp", ["optim.schedule", "step, cosine, linear, onecycle"]),
    ("--optim.milestones=0.75,0.5", ["optim.milestones", "increasing"]),
    ("--optim.milestones=0.5,1.5", ["optim.milestones", "between 0 and 1"]),
    ("--precision.amp=fp8", ["precision.amp", "off, fp16, bf16"]),
    ("--precision.compile=maybe", ["precision.compile", "true or false"]),
    ("--run.resume=sometimes", ["run.resume", "auto, never, require"]),
    ("--run.target_acc=1.5", ["run.target_acc", "<="]),
    ("--run.epochs=0", ["run.epochs", ">="]),
    ("model.depth=20", ["--section.key=value"]),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        config.load(None, [override])
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.parametrize("text, words", [
    ("[model]\ndpth = 20\n", ["unknown key 'model.dpth'", "depth"]),
    ("[modle]\ndepth = 20\n", ["unknown section [modle]"]),
    ("[model]\ndepth = \"twenty\"\n", ["model.depth", "integer"]),
    ("[model]\ndepth = 20.5\n", ["model.depth", "integer"]),
    ("[precision]\ncompile = 1\n", ["precision.compile", "true or false"]),
    ("[optim]\nmilestones = 0.5\n", ["optim.milestones", "list"]),
    ("[model\ndepth = 20\n", ["malformed TOML"]),
    ("model = 3\n", ["'model' must be a table"]),
    ("base = 3\n", ["'base' must be a file name"]),
    ("base = \"nope.toml\"\n", ["nope.toml", "not found"]),
])
def test_bad_files_name_the_cause(tmp_path, text, words):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        config.load(path)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_missing_file_and_base_loop(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "absent.toml")
    (tmp_path / "a.toml").write_text('base = "b.toml"\n')
    (tmp_path / "b.toml").write_text('base = "a.toml"\n')
    with pytest.raises(ConfigError, match="loops"):
        config.load(tmp_path / "a.toml")


def test_toml_round_trip(tmp_path):
    cfg = config.load(None, ["--model.depth=56", "--optim.milestones=0.3,0.6", "--run.name=a \"quoted\" name"])
    path = tmp_path / "resolved.toml"
    path.write_text(config.to_toml(cfg))
    assert config.load(path) == cfg
    assert config.from_dict(config.to_dict(cfg)) == cfg


def test_diff_names_changed_keys():
    a = config.to_dict(config.load(None))
    b = config.to_dict(config.load(None, ["--model.depth=56", "--run.resume=never"]))
    assert config.diff(a, b) == ["model.depth", "run.resume"]
    assert config.diff(a, b, ignore=("run.resume",)) == ["model.depth"]
    assert config.diff(a, a) == []


def test_diff_takes_a_key_written_before_it_existed_as_its_default():
    """A checkpoint saved before optim.ema_decay (or any later flag) existed ran as that flag's default does."""
    new = config.to_dict(config.load(None))
    old = {section: {k: v for k, v in keys.items() if k not in ("ema_decay", "flip")} for section, keys in new.items()}
    assert config.diff(old, new) == [] and config.diff(new, old) == []
    changed = config.to_dict(config.load(None, ["--optim.ema_decay=0.9"]))
    assert config.diff(old, changed) == ["optim.ema_decay"]
    gone = {**new, "optim": {**new["optim"], "retired_key": 1}}  # a key this code does not know
    assert config.diff(gone, new) == ["optim.retired_key"]


def test_help_lists_every_key():
    text = config.help_text("prog")
    for section, cls in config.SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"--{section}.{f.name}=" in text


def test_cli_config_error_is_one_line_and_exit_2():
    r = run_cli(["--model.depth=21"], timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert r.stderr.startswith("fastres: error: model.depth = 21")
