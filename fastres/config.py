"""Typed configuration: one dataclass per section, TOML files, ``--section.key=value`` overrides.

The layout follows torchtitan: each section is a dataclass whose defaults are He et al. 2015's ResNet-20 recipe
(configs/baseline.toml spells the same values out; a test keeps the two equal), a TOML file may name a
parent with ``base = "other.toml"``, and the command line overrides single keys. Unknown keys, wrong
types and out-of-range values raise :class:`ConfigError` naming the key and the valid choices.
Builders take their own section only (``build_model(cfg.model)``), never the whole config.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastres.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class ConfigError(UserError):
    """A bad config file, key, type or value."""


def _opt(default, help: str, *, choices=None, ge=None, gt=None, le=None, lt=None, check=None):
    """A config field: default, one-line help, and what values are valid (checked by :func:`validate`)."""
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "check": check}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


FLIPS = ("random", "alternate")  # data.flip: the loaders draw by these (fastres/data/draws.py)
TTA = ("off", "flip", "flip-translate")  # eval.tta, in order of the views each adds (fastres/evaluate.py)
MAX_SEED = 2**32 - 1  # numpy's global seed takes at most 32 bits
MAX_EPOCHS = 1_000_000  # the step counts made from epochs stay exact integers and floats
MAX_IMAGES = 10_000_000  # more than any CIFAR-sized set holds: a typo, not a choice


IMAGENET_DEPTHS = (18, 34, 50, 101, 152)  # He 2015, Table 1


def _check_depth(depth: int, family: str = "cifar") -> str | None:
    if family == "imagenet":
        return None if depth in IMAGENET_DEPTHS else f"must be one of {IMAGENET_DEPTHS} for model.family = imagenet"
    if depth < 8 or (depth - 2) % 6 or depth > 10_000:
        return "must be 6n+2 with n >= 1, at most 10,000 (20, 32, 44, 56, 110, 1202 are the paper's)"
    return None


def _check_any_depth(depth: int) -> str | None:
    """The field's own check (a saved config has no family beside it): a depth of either family."""
    if _check_depth(depth, "cifar") and _check_depth(depth, "imagenet"):
        return f"must be 6n+2, at most 10,000 (family cifar), or one of {IMAGENET_DEPTHS} (family imagenet)"
    return None


def _check_milestones(ms: list[float]) -> str | None:
    if any(not 0.0 < m < 1.0 for m in ms):
        return "must be fractions of training strictly between 0 and 1, e.g. [0.5, 0.75]"
    if any(b <= a for a, b in zip(ms, ms[1:])):
        return "must be strictly increasing, e.g. [0.5, 0.75]"
    return None


@dataclass
class RunCfg:
    name: str = _opt("baseline", "run name; the run directory defaults to runs/<name>")
    seed: int = _opt(0, "seed for init, data order, augmentation and stochastic depth", ge=0, le=MAX_SEED)
    out_dir: str = _opt("", "run directory (default: runs/<name>)")
    epochs: int = _opt(164, "training epochs (He 2015: 64k iterations at batch 128 = 164 epochs)", ge=1,
                       le=MAX_EPOCHS)
    target_acc: float = _opt(0.91, "test accuracy whose first crossing gives time_to_target_s", gt=0.0, le=1.0)
    eval_every: int = _opt(1, "evaluate (and checkpoint) every this many epochs, and at the end", ge=1,
                           le=MAX_EPOCHS)
    stop_at_target: bool = _opt(False, "end the run at the first evaluation at or above run.target_acc (its summary "
                                "says stopped_at_target); for timing time to target, not final accuracy")
    resume: str = _opt("auto", "auto: continue from out_dir's checkpoint if any; never: refuse an existing "
                       "run; require: fail without one", choices=("auto", "never", "require"))
    device: str = _opt("auto", "auto: CUDA when available, else CPU", choices=("auto", "cpu", "cuda"))
    threads: int = _opt(0, "intra-op CPU threads of each process started by python -m fastres.train "
                        "(torch.set_num_threads); 0 = $OMP_NUM_THREADS when set, else chosen at start: the cores "
                        "this process may use (its CPU affinity, shared among torchrun's processes on the node) less "
                        "a folder's loader workers and less the cores other programs keep busy; the start-up log "
                        "says the choice", ge=0, le=4096)
    deterministic: bool = _opt(False, "deterministic kernels (torch.use_deterministic_algorithms, no cuDNN "
                               "autotuning): the same seed gives the same metrics, bit for bit")
    sync_debug: bool = _opt(False, "CUDA only: raise at any host-device synchronization inside the training "
                            "loop (torch.cuda.set_sync_debug_mode), to check the fast path has none")
    checkpoint_every_s: float = _opt(600.0, "also checkpoint inside an epoch, at a step boundary, once this many "
                                     "seconds have passed since the last checkpoint; 0 = only at evaluations", ge=0.0,
                                     le=1e9)
    collective_timeout_s: float = _opt(300.0, "several ranks: a collective that waits this long for another rank fails "
                                       "(one line naming the ranks that stopped answering) instead of hanging, so "
                                       "torchrun --max-restarts restarts the group; longer than any stretch one rank "
                                       "works alone (rank 0's first download of CIFAR-10, a checkpoint)", gt=0.0,
                                       le=1e6)


@dataclass
class DataCfg:
    dir: str = _opt("", "the data root: the folder holding cifar-10-batches-py, cifar-100-python and image folders "
                    "side by side (a path straight to a CIFAR batch folder, or to an image folder's train/ and val/, "
                    "works too); CIFAR is downloaded there when missing; default: $FASTRES_DATA, else data")
    folder: str = _opt("", "data.source = folder: the image folder in the data root "
                       "(data.dir/<folder>/train/<class>/*, e.g. imagenet); empty: data.dir holds train/ and val/")
    source: str = _opt("cifar10", "cifar10: the data set in data.dir; cifar100: CIFAR-100 (fine labels) in data.dir; "
                       "folder: ImageNet-style data.dir/train/<class>/* and val/<class>/* (JPEG, PNG; val/ is the "
                       "test split); synthetic: random uint8 images and labels of CIFAR-10's shape and split sizes, "
                       "made in memory (for throughput and profiling, where pixel values do not matter; its "
                       "accuracies mean nothing)", choices=("cifar10", "synthetic", "cifar100", "folder"))
    image_size: int = _opt(0, "the images' side, pixels; 0 = the source's: 224 for a folder (its random-resized "
                           "crop, and its evaluation side: a resize to side / 0.875, centre crop; eval.image_size "
                           "sets that apart), 32 for CIFAR; synthetic: the side of its random images (ResNet-50 "
                           "throughput at 224 without a data set)", ge=0, le=4096,
                           check=lambda n: "must be 0 (the source's) or at least 8" if 0 < n < 8 else None)
    min_res: int = _opt(0, "folder, progressive resizing (FFCV's ImageNet recipes): the training side until "
                        "data.start_ramp; 0 = off (data.image_size every epoch)", ge=0, le=4096)
    max_res: int = _opt(0, "progressive resizing: the training side from data.end_ramp on", ge=0, le=4096)
    start_ramp: int = _opt(0, "progressive resizing: the last epoch (0-based) at data.min_res; the side then rises in "
                           "a straight line, rounded to a multiple of 32, to data.max_res at data.end_ramp",
                           ge=0, le=MAX_EPOCHS)
    end_ramp: int = _opt(0, "progressive resizing: the first epoch (0-based) at data.max_res", ge=0, le=MAX_EPOCHS)
    skip_bad: bool = _opt(False, "folder: leave out files that fail a check (listed in the log, counted in the "
                          "summary) instead of stopping; a file that fails to decode while training becomes a grey "
                          "image")
    loader: str = _opt("workers", "workers: torch DataLoader + CPU workers (the baseline's path); "
                       "gpu: CIFAR's whole uint8 set on the device, augmented with tensor ops; a folder's files "
                       "decoded on the device by torchvision's nvJPEG; "
                       "dali: NVIDIA DALI pipeline (pip install nvidia-dali-cuda130)",
                       choices=("workers", "gpu", "dali"))
    augment: str = _opt("rrc", "folder: the training crop: rrc (torchvision's RandomResizedCrop to the side, "
                        "ImageNet's) or pad-crop (CIFAR's: a zero pad of 4 pixels and a random crop back, the CIFAR "
                        "loaders' own draws, for folders of data.image_size-square images such as CIFAR written as "
                        "files)", choices=("rrc", "pad-crop"))
    decoder: str = _opt("pil", "folder, workers loader: how a file is decoded, cropped and resized: pil (Pillow, as "
                        "torchvision's PIL path) or torchvision (torchvision.io's decoder and its antialiased tensor "
                        "resize)", choices=("pil", "torchvision"))
    dali_source: str = _opt("host", "dali loader: feed uint8 batches from host memory, or gather them from a "
                            "GPU-resident copy and hand them over zero-copy", choices=("host", "device"))
    flip: str = _opt("random", "training flips: random (each image mirrored with p = 1/2 every epoch, He 2015) or "
                     "alternate (random in epoch 0, then each image's flip inverted every epoch; Jordan 2024, "
                     "cifar10-airbench)", choices=FLIPS)
    val_size: int = _opt(0, "training images held out as a validation split (0 = none; e.g. 5000)", ge=0,
                         le=MAX_IMAGES)
    split_seed: int = _opt(0, "seed of the validation split (kept apart from run.seed so every seed "
                           "of a recipe is tuned on the same split)", ge=0, le=MAX_SEED)
    subset: int = _opt(0, "use only the first N training images (0 = all 50000; for smoke tests; folder: N drawn "
                       "with data.split_seed, as its files are in class order)", ge=0, le=MAX_IMAGES)
    test_subset: int = _opt(0, "evaluate on the first N test images (0 = all 10000; for smoke tests; folder: drawn)",
                            ge=0, le=MAX_IMAGES)
    num_workers: int = _opt(4, "CPU workers per rank: DataLoader processes (workers), DALI threads (dali)",
                            ge=0, le=1024)

    @property
    def side(self) -> int:
        """The images' side: data.image_size, or the source's (224 for a folder, 32 for CIFAR and synthetic)."""
        return self.image_size or (224 if self.source == "folder" else 32)


@dataclass
class ModelCfg:
    family: str = _opt("cifar", "cifar: ResNet-CIFAR, 3 stages at 16/32/64 channels (He 2015, sec. 4.2); imagenet: "
                       "torchvision's ResNet-18/34/50/101/152 (7x7 stem, max-pool, 4 stages; He 2015, Table 1)",
                       choices=("cifar", "imagenet"))
    depth: int = _opt(20, "depth: 6n+2 for family cifar (He 2015); 18, 34, 50, 101 or 152 for imagenet",
                      check=_check_any_depth)
    width: int = _opt(64, "family imagenet: channels of the first stage (64 = torchvision's; smaller for tests)",
                      ge=1, le=4096)
    block: str = _opt("post", "post: conv-BN-ReLU (He 2015); pre: BN-ReLU-conv (He 2016)",
                      choices=("post", "pre"))
    shortcut: str = _opt("A", "A: parameter-free stride + zero-pad; B: 1x1 conv + BN projection",
                         choices=("A", "B"))
    stochastic_depth: float = _opt(0.0, "death rate p_L of the last block (Huang 2016); 0 = off",
                                   ge=0.0, lt=1.0)
    sd_mode: str = _opt("linear", "linear: p_l = p_L * l / L (Huang 2016); uniform: p_l = p_L",
                        choices=("uniform", "linear"))
    zero_init_residual: bool = _opt(False, "start every residual branch at zero (Goyal et al. 2017)")
    blurpool: bool = _opt(False, "anti-aliased downsampling (BlurPool, Zhang 2019; FFCV's and Composer's ImageNet "
                          "recipes): a binomial low-pass filter before every strided convolution with 16 or more "
                          "inputs and in every max-pool")
    init: str = _opt("kaiming", "kaiming: He et al. 2015 normal init; lsuv: orthonormal, then each layer scaled "
                     "to unit output variance on real batches (Mishkin & Matas 2016)", choices=("kaiming", "lsuv"))
    lsuv_tol_var: float = _opt(0.1, "LSUV: stop scaling a layer once |output variance - 1| < this", gt=0.0,
                               le=1.0)
    lsuv_t_max: int = _opt(10, "LSUV: at most this many tries (each on a fresh mini-batch) per layer", ge=1,
                           le=10_000)
    dropout: float = _opt(0.0, "dropout rate between the two convolutions of every residual branch "
                          "(as Wide ResNets place it); 0 = off", ge=0.0, lt=1.0)
    dropout_kind: str = _opt("standard", "standard: inverted dropout of single activations; spatial: of whole "
                             "channels (SpatialDropout, Tompson et al. 2015)", choices=("standard", "spatial"))
    num_classes: int = _opt(0, "output classes; 0 = the data's (CIFAR-10: 10, CIFAR-100: 100, a folder: its class "
                            "folders), as torchvision's references take it from the data set; set, it must equal the "
                            "data's", ge=0, le=1_000_000, check=lambda n: "must be 0 (the data's) or at least 2"
                            if n == 1 else None)
    weights: str = _opt("", "start a fresh run from the weights in this file: a state dict saved from torchvision "
                        "(torch.save(torchvision.models.resnet50().state_dict(), PATH)) or from fastres (a "
                        "checkpoint.pt, or a model's state_dict()); the classifier keeps its own init where the file's "
                        "has another class count; empty = the init model.init names")


@dataclass
class OptimCfg:
    lr_per_128: float = _opt(0.1, "learning rate per 128 images: lr = lr_per_128 * batch_size / 128 "
                             "(Goyal et al. 2017)", gt=0.0, le=1000.0)
    batch_size: int = _opt(128, "global batch size, split evenly over ranks", ge=1, le=MAX_IMAGES)
    accum_steps: int = _opt(1, "micro-batches accumulated per optimizer step on each rank", ge=1, le=MAX_IMAGES)
    momentum: float = _opt(0.9, "SGD momentum", ge=0.0, lt=1.0)
    nesterov: bool = _opt(False, "Nesterov momentum")
    weight_decay: float = _opt(1e-4, "L2 weight decay on every parameter (He 2015)", ge=0.0, le=1.0)
    warmup_epochs: float = _opt(0.0, "linear per-iteration warmup from lr_per_128 to the scaled lr "
                                "(Goyal et al. 2017)", ge=0.0, le=MAX_EPOCHS)
    warmup_mode: str = _opt("gradual", "gradual: lr rises linearly over the warmup (Goyal et al. 2017); "
                            "constant: lr stays at its start value, then jumps (He 2015's ResNet-110)",
                            choices=("gradual", "constant"))
    warmup_start: float = _opt(1.0, "the warmup's first lr, as a multiple of lr_per_128 (Goyal: 1; He 2015's "
                               "ResNet-110: 0.1, i.e. 0.01)", gt=0.0, le=1000.0)
    schedule: str = _opt("step", "step: lr * gamma at each milestone; cosine: cosine decay to 0 after warmup; "
                         "linear: linear decay to 0 after warmup (cifar10-airbench's triangle, with warmup_epochs "
                         "as its rise); onecycle: lr and momentum as torch.optim.lr_scheduler.OneCycleLR with "
                         "max_lr = the scaled lr (Smith & Topin 2019; its own warm-up: needs warmup_epochs = 0)",
                         choices=("step", "cosine", "linear", "onecycle"))
    milestones: list[float] = _opt([0.5, 0.75], "step schedule: fractions of training where lr *= gamma "
                                   "(He 2015: 32k and 48k of 64k iterations)", check=_check_milestones)
    gamma: float = _opt(0.1, "step schedule: lr factor at each milestone", gt=0.0, le=1.0)
    onecycle_pct_start: float = _opt(0.3, "onecycle: fraction of the steps the lr rises over (OneCycleLR's "
                                     "pct_start)", gt=0.0, lt=1.0)
    onecycle_div_factor: float = _opt(25.0, "onecycle: the first lr is the scaled lr / this (OneCycleLR's "
                                      "div_factor)", ge=1.0, le=1e6)
    onecycle_final_div_factor: float = _opt(1e4, "onecycle: the last lr is the first lr / this (OneCycleLR's "
                                            "final_div_factor)", ge=1.0, le=1e12)
    momentum_min: float = _opt(0.85, "onecycle: the momentum at the peak lr; it replaces optim.momentum, cycling "
                               "opposite to the lr (OneCycleLR's base_momentum; Smith 2018)", ge=0.0, lt=1.0)
    momentum_max: float = _opt(0.95, "onecycle: the momentum at the first and last step (OneCycleLR's "
                               "max_momentum); = momentum_min holds it constant", ge=0.0, lt=1.0)
    lookahead_k: int = _opt(0, "Lookahead: every k steps the slow weights (and BN statistics) move lookahead_alpha "
                            "of the way to the fast ones, which restart from them (Zhang et al. 2019; "
                            "cifar10-airbench's lookahead_state: k = 5); 0 = off", ge=0, le=1_000_000)
    lookahead_alpha: float = _opt(0.5, "Lookahead: the slow weights' step toward the fast ones (Zhang et al. "
                                  "2019: 0.5)", gt=0.0, le=1.0)
    wd_bn_bias: bool = _opt(True, "weight decay on BatchNorm weights and biases and on every bias too; false puts "
                            "them in an SGD parameter group without it (Goyal et al. 2017 sec. 5.1; torchvision "
                            "references' --norm-weight-decay 0)")
    impl: str = _opt("default", "SGD implementation: default (torch's choice), foreach (one kernel per op "
                     "over all tensors) or fused (one kernel for the whole update)",
                     choices=("default", "foreach", "fused"))
    name: str = _opt("sgd", "the optimizer: sgd (momentum SGD), or lars (layer-wise adaptive rate scaling, You et "
                     "al. 2017, as MLPerf's ResNet-50 uses it for large batches: each tensor's step scaled by "
                     "optim.lars_trust x |w| / (|g| + wd |w|); BatchNorm parameters and biases excluded, without "
                     "weight decay)", choices=("sgd", "lars"))
    lars_trust: float = _opt(0.001, "lars: the trust coefficient (You et al. 2017's eta; MLPerf: 0.001)", gt=0.0,
                             le=1.0)
    label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy loss", ge=0.0, lt=1.0)
    ema_decay: float = _opt(0.0, "score an exponential moving average of the weights and BN statistics at every "
                            "evaluation, updated after each step with decay min(d, (1+t)/(10+t)) (Polyak "
                            "averaging; hlb-cifar10, timm's ModelEmaV2; fastres/techniques.py); the trained weights' "
                            "own accuracy (their running BN statistics) is logged beside it as <split>_acc_no_ema; "
                            "0 = off",
                            ge=0.0, lt=1.0)


@dataclass
class PrecisionCfg:
    amp: str = _opt("off", "autocast: fp16 (with GradScaler) or bf16", choices=("off", "fp16", "bf16"))
    channels_last: bool = _opt(False, "NHWC memory format for the model and its inputs")
    compile: bool = _opt(False, "torch.compile the model (compiled before training; compile_s in the summary)")
    compile_mode: str = _opt("default", "torch.compile mode; reduce-overhead replays the compiled step as CUDA "
                             "graphs", choices=("default", "reduce-overhead", "max-autotune",
                                                "max-autotune-no-cudagraphs"))
    step_graph: bool = _opt(False, "capture the whole training step (forward, loss, backward, fused SGD) as one "
                            "CUDA graph and replay it (fastres/step.py); needs optim.impl = fused, no stochastic "
                            "depth, no fp16, one rank, and a compile_mode without CUDA graphs of its own")


@dataclass
class EvalCfg:
    precise_bn: bool = _opt(False, "before each evaluation, recompute BN statistics with the current weights "
                            "over un-augmented training images instead of the running averages")
    precise_bn_batches: int = _opt(200, "precise BN: training batches (per rank, at the training batch size) "
                                   "to average over", ge=1, le=MAX_IMAGES)
    tta: str = _opt("off", "test-time augmentation: flip averages each image's logits with its mirror "
                    "image's (cifar10-airbench); flip-translate adds the flip averages of the image moved one "
                    "pixel each way (6 passes; airbench's tta_level 2); the plain accuracy is logged beside it "
                    "as <split>_acc_no_tta", choices=TTA)
    on_test: bool = _opt(True, "evaluate on the test set; false (for tuning) never touches it and measures "
                         "time to target on the validation split")
    image_size: int = _opt(0, "folder: the evaluation side, apart from the training one (FixRes, Touvron et al. "
                           "2019; FFCV trains at 160-192 and evaluates at 256); 0 = data.image_size", ge=0, le=4096)
    resize_ratio: float = _opt(0.875, "folder: evaluation resizes the shorter side to image_size / this, then takes "
                               "the centre crop (torchvision's references: 224 of 256)", gt=0.1, le=1.0)


@dataclass
class LogCfg:
    every_steps: int = _opt(50, "write the training batch's loss and the lr to TensorBoard every this many steps "
                            "(read without waiting for the device); 0 = only at evaluations", ge=0,
                            le=10**9)


@dataclass
class Config:
    run: RunCfg = field(default_factory=RunCfg)
    data: DataCfg = field(default_factory=DataCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    precision: PrecisionCfg = field(default_factory=PrecisionCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    log: LogCfg = field(default_factory=LogCfg)


SECTIONS: dict[str, type] = typing.get_type_hints(Config)  # section name -> its dataclass
# Keys a resumed run may change: where things are and how they are loaded, not what is trained.
# run.out_dir: where it lives, moved or not; run.collective_timeout_s: how long a rank waits for the others.
RESUME_MAY_DIFFER = ("run.resume", "run.device", "run.threads", "run.sync_debug", "run.checkpoint_every_s",
                     "run.out_dir", "run.collective_timeout_s", "data.dir", "data.num_workers", "log.every_steps",
                     "model.weights")
# Keys whose 0 means "the data's": a run that set the value the data gives is the same run (checked when built).
FROM_DATA = ("model.num_classes", "data.image_size")


def _hints(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


def _type_name(tp) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, "a list of numbers")


# --------------------------------------------------------------------------------------------- coercion

def _coerce(value: Any, tp, where: str) -> Any:
    """A TOML value as the field's type; ConfigError naming ``where`` when it does not fit."""
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{where} = {value!r} must be a finite number")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(tp) is list:
        if isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                           for v in value):
            return [float(v) for v in value]
    else:  # pragma: no cover - a new field type needs a branch here
        raise TypeError(f"unsupported config type {tp} for {where}")
    raise ConfigError(f"{where} = {value!r} has the wrong type: expected {_type_name(tp)}")


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _parse_cli_value(text: str, tp, where: str) -> Any:
    """A command-line string as the field's type (``--optim.milestones=0.5,0.75`` or ``=[0.5,0.75]``)."""
    s = text.strip()
    if tp is str:
        return s[1:-1] if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"" else s
    if tp is bool:
        if s.lower() in _TRUE:
            return True
        if s.lower() in _FALSE:
            return False
        raise ConfigError(f"{where} = {text!r} has the wrong type: expected true or false")
    try:
        if typing.get_origin(tp) is list:
            inner = s[1:-1] if s.startswith("[") and s.endswith("]") else s
            return [float(v) for v in inner.split(",") if v.strip()]
        if tp is int:
            return int(s)
        return _coerce(float(s), tp, where)
    except ValueError:
        raise ConfigError(f"{where} = {text!r} has the wrong type: expected {_type_name(tp)}") from None


# --------------------------------------------------------------------------------------------- loading

def parse_toml(path: Path) -> dict[str, Any]:
    """The TOML table in ``path`` (a config or a stack file); a ConfigError if it is not UTF-8 TOML."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: malformed TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text TOML file") from None


def _read_toml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A TOML file with its ``base`` chain merged in (child keys win)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to this file")
    if not path.is_file():
        hint = " (it is a directory)" if path.is_dir() else ""
        raise ConfigError(f"config file {path} not found{hint}: pass an existing file to --config")
    data = parse_toml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a file name string, e.g. base = \"baseline.toml\"")
    merged = _read_toml(path.parent / base, seen + (path,))
    for section, values in data.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def _apply(cfg: Config, data: dict[str, Any], source: str) -> None:
    """Set every ``[section] key = value`` of ``data`` on ``cfg``; errors name ``source`` and the key."""
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section [{section}] (valid: {', '.join(SECTIONS)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: '{section}' must be a table: [{section}] followed by key = value")
        sec = getattr(cfg, section)
        hints = _hints(type(sec))
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(f"{source}: unknown key '{section}.{key}' "
                                  f"(valid: {', '.join(hints)})")
            setattr(sec, key, _coerce(value, hints[key], f"{section}.{key}"))


def _apply_overrides(cfg: Config, overrides: list[str]) -> None:
    for item in overrides:
        body = item[2:]
        if not item.startswith("--") or "=" not in body or "." not in body.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} must look like --section.key=value, e.g. --model.depth=56")
        dotted, text = body.split("=", 1)
        section, key = dotted.split(".", 1)
        if section not in SECTIONS:
            raise ConfigError(f"{item}: unknown section '{section}' (valid: {', '.join(SECTIONS)})")
        hints = _hints(SECTIONS[section])
        if key not in hints:
            raise ConfigError(f"{item}: unknown key '{dotted}' (valid: {', '.join(hints)})")
        setattr(getattr(cfg, section), key, _parse_cli_value(text, hints[key], dotted))


def _check_fields(cfg: Config) -> None:
    """Raise ConfigError for the first value outside its field's choices or range."""
    for section in SECTIONS:
        sec = getattr(cfg, section)
        for f in dataclasses.fields(sec):
            m, v, where = f.metadata, getattr(sec, f.name), f"{section}.{f.name}"
            if m.get("choices") and v not in m["choices"]:
                raise ConfigError(f"{where} = {v!r} is not one of: {', '.join(map(str, m['choices']))}")
            for op, ok, word in (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                                 ("le", lambda a, b: a <= b, "<="), ("lt", lambda a, b: a < b, "<")):
                if m.get(op) is not None and not ok(v, m[op]):
                    raise ConfigError(f"{where} = {v!r} is out of range: must be {word} {m[op]}")
            if m.get("check") and (msg := m["check"](v)):
                raise ConfigError(f"{where} = {v!r} {msg}")


def _check_step_graph(cfg: Config, world: int) -> None:
    """The first setting a whole-step CUDA graph (fastres/step.py) cannot hold."""
    pre = "precision.step_graph = true"
    if cfg.model.stochastic_depth > 0:
        raise ConfigError(f"{pre} cannot capture stochastic depth (its per-step drops are Python branches): "
                          "set model.stochastic_depth = 0 or precision.step_graph = false")
    if cfg.precision.amp == "fp16":
        raise ConfigError(f"{pre} cannot capture fp16's GradScaler (it decides on the host whether to step): "
                          "use precision.amp = bf16 or off")
    if cfg.optim.name == "sgd" and cfg.optim.impl != "fused":
        raise ConfigError(f"{pre} needs optim.impl = fused (the SGD that reads its learning rate on the device), "
                          f"not {cfg.optim.impl!r}")
    if cfg.precision.compile and cfg.precision.compile_mode in ("reduce-overhead", "max-autotune"):
        raise ConfigError(f"{pre} cannot contain compile_mode {cfg.precision.compile_mode!r}, which makes CUDA "
                          "graphs of its own: use precision.compile_mode = default or max-autotune-no-cudagraphs")
    if world > 1:
        raise ConfigError(f"{pre} runs on one rank only for now (DDP's all-reduce inside the graph is not "
                          f"validated), and this run has {world}: set precision.step_graph = false")


def _check_optim(cfg: OptimCfg) -> None:
    """The [optim] section's own combinations."""
    if cfg.name == "lars" and cfg.schedule == "onecycle":
        raise ConfigError("optim.name = lars keeps its own momentum, which one-cycle's scheduled momentum would "
                          "replace: use optim.schedule = step, cosine or linear with LARS")
    if cfg.name == "lars" and cfg.impl != "default":
        raise ConfigError(f"optim.impl = {cfg.impl} chooses torch's SGD kernels; LARS is fastres's own (foreach "
                          "ops, graph-safe): remove optim.impl")
    if cfg.nesterov and cfg.momentum == 0 and cfg.schedule != "onecycle":
        raise ConfigError("optim.nesterov = true needs optim.momentum > 0")
    if cfg.schedule == "onecycle":
        _check_onecycle(cfg)


def _check_onecycle(cfg: OptimCfg) -> None:
    """What one-cycle cannot combine with: a warm-up of its own, a momentum range upside down."""
    if cfg.warmup_epochs:
        raise ConfigError(f"optim.schedule = onecycle is its own warm-up (its first onecycle_pct_start of the steps), "
                          f"and optim.warmup_epochs = {cfg.warmup_epochs}: set optim.warmup_epochs = 0")
    if cfg.momentum_min > cfg.momentum_max:
        raise ConfigError(f"optim.momentum_min = {cfg.momentum_min} is above optim.momentum_max = "
                          f"{cfg.momentum_max}: swap them (one-cycle's momentum is lowest at the peak lr)")
    if cfg.nesterov and cfg.momentum_min == 0:
        raise ConfigError("optim.nesterov = true needs optim.momentum_min > 0 with optim.schedule = onecycle")


def _check_resolution(cfg: Config) -> None:
    """Progressive resizing and the evaluation side: folders only, the ramp's ends in order."""
    d, e = cfg.data, cfg.eval
    if (d.min_res or d.max_res or d.start_ramp or d.end_ramp or e.image_size) and d.source != "folder":
        raise ConfigError("data.min_res / max_res / start_ramp / end_ramp and eval.image_size apply to data.source = "
                          "folder only (CIFAR images are 32x32): remove them")
    if e.resize_ratio != EvalCfg().resize_ratio and d.source != "folder":
        raise ConfigError("eval.resize_ratio applies to data.source = folder only: remove it")
    if bool(d.min_res) != bool(d.max_res) or (not d.max_res and (d.start_ramp or d.end_ramp)):
        raise ConfigError("progressive resizing needs data.min_res and data.max_res both (and the ramp's "
                          "data.start_ramp and data.end_ramp), or none of them")
    if d.min_res > d.max_res or d.start_ramp > d.end_ramp:
        raise ConfigError(f"progressive resizing runs from data.min_res = {d.min_res} at epoch data.start_ramp = "
                          f"{d.start_ramp} up to data.max_res = {d.max_res} at data.end_ramp = {d.end_ramp}: give the "
                          "smaller side and the earlier epoch first")


def _check_data_model(cfg: Config) -> None:
    """The model and data keys that only make sense together."""
    m, d = cfg.model, cfg.data
    if msg := _check_depth(m.depth, m.family):
        raise ConfigError(f"model.depth = {m.depth} {msg}")
    if d.source in ("cifar10", "cifar100") and d.image_size not in (0, 32):
        raise ConfigError(f"data.image_size = {d.image_size} applies to data.source = folder or synthetic (CIFAR "
                          "images are 32x32): remove it")
    if m.family == "cifar" and m.width != ModelCfg().width:
        raise ConfigError(f"model.width = {m.width} applies to model.family = imagenet only: remove it")
    _check_resolution(cfg)
    classes = {"cifar10": 10, "synthetic": 10, "cifar100": 100}.get(d.source)  # a folder's are known once indexed
    if m.num_classes and classes and m.num_classes != classes:
        raise ConfigError(f"model.num_classes = {m.num_classes} but the data's labels go up to {classes - 1} "
                          f"(data.source = {d.source} has {classes} classes): remove it (the model follows the data) "
                          f"or set model.num_classes = {classes}")
    if m.weights and m.init == "lsuv":
        raise ConfigError("model.weights and model.init = lsuv both make the starting weights: remove one")
    if d.folder and (d.source != "folder" or Path(d.folder).is_absolute() or ".." in Path(d.folder).parts):
        raise ConfigError(f"data.folder = {d.folder!r} names an image folder inside data.dir for data.source = "
                          "folder: give its name (e.g. imagenet), or put a path in data.dir")
    if d.augment != "rrc" and d.source != "folder":
        raise ConfigError(f"data.augment = {d.augment} applies to data.source = folder (the CIFAR sources are "
                          "pad-cropped already): remove it")
    if d.decoder != "pil" and (d.source != "folder" or d.loader != "workers"):
        raise ConfigError(f"data.decoder = {d.decoder} applies to a folder read by the workers loader (the gpu loader "
                          "decodes with torchvision on the device, dali with DALI): remove it")
    if d.source == "folder" and (cfg.eval.precise_bn or m.init == "lsuv"):
        raise ConfigError("eval.precise_bn and model.init = lsuv read the training images from memory, which "
                          "data.source = folder does not hold: turn them off for folders")


def validate(cfg: Config, world: int = 1) -> None:
    """Raise ConfigError for the first bad value: a field outside its choices or range, then a combination that
    cannot run on ``world`` ranks. Called at load, so a stack rejects a bad row before any row runs."""
    _check_fields(cfg)
    _check_data_model(cfg)
    batch, accum = cfg.optim.batch_size, cfg.optim.accum_steps
    if batch % (world * accum):
        ranks = " or a number of ranks (torchrun's nodes x processes) that divides it" if world > 1 else ""
        raise ConfigError(f"optim.batch_size = {batch} does not split evenly over {world} rank(s) x "
                          f"{accum} accumulation step(s): use a multiple of {world * accum}{ranks}")
    if not cfg.eval.on_test and not cfg.data.val_size:
        raise ConfigError("eval.on_test = false needs a validation split to measure: set data.val_size (e.g. 5000)")
    _check_optim(cfg.optim)
    if cfg.optim.schedule == "onecycle" and cfg.precision.amp == "fp16" and cfg.optim.impl == "fused":
        raise ConfigError("optim.schedule = onecycle with precision.amp = fp16 cannot use optim.impl = fused (its "
                          "kernel unscales the gradients after one-cycle's momentum has read them): use "
                          "precision.amp = bf16 or optim.impl = foreach")
    if cfg.precision.step_graph:
        _check_step_graph(cfg, world)


def load(path: str | os.PathLike | None = None, overrides: list[str] | None = None, world: int = 1) -> Config:
    """Defaults, then the TOML file (with its ``base`` chain), then ``--section.key=value`` overrides, validated
    for ``world`` ranks.

    Resolves the defaults that depend on the environment: ``data.dir`` ($FASTRES_DATA, else
    data) and ``run.out_dir`` (runs/<name>).
    """
    cfg = Config()
    if path is not None:
        _apply(cfg, _read_toml(Path(path)), str(path))
    _apply_overrides(cfg, overrides or [])
    validate(cfg, world)
    if not cfg.data.dir:
        cfg.data.dir = os.environ.get("FASTRES_DATA") or "data"
    if not cfg.run.out_dir:
        cfg.run.out_dir = str(Path("runs") / cfg.run.name)
    return cfg


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """Split argv into (--config path, overrides). ``--section.key value`` is accepted too."""
    path, overrides, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c"):
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a file, e.g. --config configs/smoke.toml")
            path, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg.startswith("--") and "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            overrides.append(f"{arg}={argv[i + 1]}")
            i += 1
        elif arg.startswith("--"):
            overrides.append(arg)
        else:
            raise ConfigError(f"unexpected argument {arg!r}: use --config FILE and --section.key=value")
        i += 1
    return path, overrides


def help_text(prog: str) -> str:
    """Every key with its type, default and meaning, for ``--help``."""
    lines = [f"usage: {prog} [--config FILE.toml] [--section.key=value ...]", ""]
    for section, cls in SECTIONS.items():
        lines.append(f"[{section}]")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            choices = f" {{{'|'.join(f.metadata['choices'])}}}" if f.metadata.get("choices") else ""
            lines.append(f"  --{section}.{f.name}={default!r}{choices}\n      {f.metadata['help']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- output

def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def with_values(cfg: Config, values: dict[str, Any] | None = None, source: str = "values", *,
                overrides: list[str] = (), world: int = 1) -> Config:
    """A copy of ``cfg`` with ``{"section.key": value}`` set (TOML-typed values, checked as a file's), then
    ``--section.key=value`` command-line overrides, validated once for ``world`` ranks: the one way to derive a
    config from another."""
    nested: dict[str, dict[str, Any]] = {}
    for dotted, value in (values or {}).items():
        if "." not in dotted:
            raise ConfigError(f"{source}: '{dotted}' must be a dotted key like \"model.depth\"")
        section, key = dotted.split(".", 1)
        nested.setdefault(section, {})[key] = value
    out = copy.deepcopy(cfg)
    _apply(out, nested, source)
    _apply_overrides(out, list(overrides))
    validate(out, world)
    return out


def from_dict(data: dict[str, Any]) -> Config:
    """The inverse of :func:`to_dict` (same checks as a TOML file)."""
    cfg = Config()
    _apply(cfg, data, "saved config")
    _check_fields(cfg)  # a saved config was whole when written; the run that reads it validates it for its world
    return cfg


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_toml(cfg: Config) -> str:
    """The resolved config as a TOML file that :func:`load` reads back to an equal Config."""
    out = []
    for section, values in to_dict(cfg).items():
        out.append(f"[{section}]")
        out += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        out.append("")
    return "\n".join(out)


def diff(a: dict[str, Any], b: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ between two :func:`to_dict` results (minus ``ignore``).

    A key one side lacks counts as its default: a checkpoint or summary written before the key existed comes
    from a run that behaved as the default does (each technique's off setting is the old behaviour), so
    resuming it after an upgrade continues the same run. A key the code no longer knows differs. A key of
    :data:`FROM_DATA` set on one side and 0 (the data's) on the other does not differ here: the build checks it.
    """
    defaults = to_dict(Config())
    keys = []
    for section in sorted(set(a) | set(b)):
        sa, sb, sd = a.get(section, {}), b.get(section, {}), defaults.get(section, {})
        for key in sorted(set(sa) | set(sb)):
            dotted = f"{section}.{key}"
            va, vb = sa.get(key, sd.get(key)), sb.get(key, sd.get(key))
            if dotted not in ignore and va != vb and not (dotted in FROM_DATA and 0 in (va, vb)):
                keys.append(dotted)
    return keys
