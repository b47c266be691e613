"""Typed configuration of a condensation run: its fields, their checks, overrides and resume rules.

The paper settings are named presets in ``idm_jax.presets``.

Field names follow the official IDM flags where one exists (docs/FAITHFULNESS.md, "presets"), so
a preset can be checked line by line against ``command.txt``. Choices where the official code has
a quirk carry the faithful behaviour as the default; the fix is an explicit option
(docs/FAITHFULNESS.md, "quirks and options").
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from typing import Any, Mapping

INITS = ("mosaic", "mosaic_repeat", "real", "noise")
REAL_SAMPLINGS = ("random", "first")
DTYPES = ("float32", "bfloat16")
DISTANCES = ("linear", "gaussian", "characteristic")
PARTITIONS = ("uniform", "multiscale", "nonuniform")
MOMENTS = ("covariance", "variance")
EXPORT_FORMATS = ("npz", "expanded", "png", "torch")   # idm_jax.runs.export.FORMATS
DATASETS = ("cifar10", "cifar100", "mnist", "fashion_mnist", "svhn", "digits", "tinyimagenet",
            "imagenet_subset")


@dataclasses.dataclass(frozen=True)
class Config:
    """Every knob of an IDM run. Units: iterations, images, epochs; learning rates are raw."""

    # --- what to condense
    dataset: str = "cifar10"
    ipc: int = 10                       # synthetic images per class (the stored budget)
    model: str = "ConvNet"              # matching / queue architecture (official name string)
    seed: int = 0
    method: str = "idm"                 # idm|dm|m3d|ncfm|iid|path.py:NAME (idm_jax.methods)

    # --- synthetic set and its optimiser (docs/FAITHFULNESS.md, "init", "image update")
    iterations: int = 20000             # outer iterations; the loop runs it = 0..iterations
    init: str = "mosaic"                # mosaic | mosaic_repeat | real | noise
    partition_expand: bool = True       # the official --aug: PE in matching and evaluation
    partition_factor: int = 2
    partition: str = "uniform"          # beyond IDM: uniform | multiscale | nonuniform
    partition_ratio: float = 0.4        # nonuniform: where each side is cut (fraction)
    lr_img: float = 0.2
    img_momentum: float = 0.5
    image_update: str = "per_class"     # the image optimiser (image_update.OPTIMIZERS): official
                                        # per_class | summed (DM) | sgd | adam
    batch_real: int = 256               # real images per class per iteration (whole class if fewer)
    real_sampling: str = "random"       # "first": ImageNet-script quirk, the first batch_real
                                        # images of each class every time
    normalize_train: bool = True        # False: ImageNet-script quirk, real train images in [0,1]
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    match_dsa_strategy: str = ""        # DSA during matching when it differs from the one of
                                        # evaluation ("" the same: IDM, DM); M3D and NCFM run
                                        # color+crop+cutout (idm_jax.augment)

    # --- loss (docs/FAITHFULNESS.md, "matching", "class-aware CE")
    syn_ce: bool = True
    ce_weight: float = 0.5              # multiplied by the extractor's training accuracy in %

    # --- beyond IDM: the matching objective (README "Beyond IDM"; faithful: linear, weight 0)
    distance: str = "linear"            # linear (IDM/DM mean MMD) | gaussian | characteristic
    mmd_bandwidths: str = ""            # gaussian: comma-separated sigmas; "" median heuristic
    mmd_unbiased: bool = False          # gaussian: leave the diagonal out of within-set terms
    cf_frequencies: int = 1024          # characteristic: random frequencies per class and pass
    cf_scale: float = 1.0               # characteristic: frequency std is cf_scale / sqrt(D)
    moment: str = "covariance"          # the moment term: covariance | variance
    moment_weight: float = 0.0          # weight of the moment term; 0 leaves it out
    match_weight: float = 1.0           # weight of the matching distance; 0 is the CE-only
                                        # control (the distance is still logged, unweighted)
    calibration_weight: float = 0.0     # > 0: after matching, a CE pass on the schedule's
                                        # calibration network (NCFM: 1)
    pool_dir: str = ""                  # a pretrained pool (experiments.pretrain; NCFM, IID)
    auxiliary_model: str = ""           # a second network embedding the synthetic views for
                                        # the objective ("" none; IID: ResNet18)

    # --- model queue (docs/FAITHFULNESS.md, "model queue")
    net_num: int = 100                  # queue capacity
    initial_models: int = 3
    net_generate_interval: int = 30
    net_push_num: int = 1
    train_net_num: int = 1              # extractors per iteration (matching)
    fetch_net_num: int = 2              # queue models trained per iteration
    model_train_steps: int = 10
    trained_bs: int = 256
    lr_net: float = 0.01
    net_momentum: float = 0.9
    net_weight_decay: float = 5e-4
    eval_interval: int = 100            # meters reset every eval_interval iterations

    # --- a validation split (ours; idm_jax.data.validation): training images held out of the
    # condensation and scored by the evaluation beside the test set, to choose settings on
    validation_per_class: int = 0       # images per class held out; 0: none
    validation_seed: int = 0            # the split's own seed (the same for every run seed)

    # --- evaluation protocol (docs/FAITHFULNESS.md, "evaluation")
    eval_model: str = "ConvNet"
    num_eval: int = 5
    epoch_eval_train: int = 1000        # the loop runs epochs 0..epoch_eval_train (1001 epochs)
    batch_train: int = 256
    eval_every: int = 5000              # intermediate evaluations (0: only the final one)

    # --- run mechanics (ours)
    compute_dtype: str = "float32"      # "bfloat16": mixed precision; images/optimisers stay f32
    microbatch: int = -1                # images per network call: -1 auto (16 on CPU; on
                                        # accelerators whole batches, or what fits the memory
                                        # budget: idm_jax.accel.memory), 0 whole batch; same values
    memory_budget_gb: float = -1.0      # accelerators: GiB for the run (-1: 90 % of the device)
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = -1                 # fetch metrics from the device every N iterations:
                                        # -1 auto (1 on CPU, 100 on accelerators); same result
    exports: str = "npz,expanded,png,torch"   # layouts of the final set (idm_jax.runs.export)
    record_grad_norms: bool = False     # record the gradient norm of each loss term at
                                        # iteration 0 (grad_norms.json; one more compile)

    def __post_init__(self):
        def need(cond, message):
            if not cond:
                raise ValueError(message)

        need(self.dataset in DATASETS,
             f"unknown dataset {self.dataset!r}; valid: {', '.join(DATASETS)}")
        need(self.ipc >= 1, f"ipc must be >= 1, got {self.ipc}")
        need(self.iterations >= 0, f"iterations must be >= 0, got {self.iterations}")
        need(self.init in INITS, f"init must be one of {INITS}, got {self.init!r}")
        need(bool(self.method.strip()), "method must name a method (idm, dm, or "
             "path/to/file.py:NAME)")
        need(self.real_sampling in REAL_SAMPLINGS,
             f"real_sampling must be one of {REAL_SAMPLINGS}, got {self.real_sampling!r}")
        need(self.compute_dtype in DTYPES,
             f"compute_dtype must be one of {DTYPES}, got {self.compute_dtype!r}")
        need(self.partition_factor >= 1, "partition_factor must be >= 1")
        need(self.partition in PARTITIONS,
             f"unknown partition {self.partition!r}; valid: {', '.join(PARTITIONS)}")
        need(0.0 < self.partition_ratio < 1.0,
             f"partition_ratio must lie strictly between 0 and 1, got {self.partition_ratio}")
        need(self.distance in DISTANCES,
             f"unknown distance {self.distance!r}; valid: {', '.join(DISTANCES)}")
        need(self.moment in MOMENTS, f"unknown moment {self.moment!r}; valid: {', '.join(MOMENTS)}")
        need(self.cf_frequencies >= 1, f"cf_frequencies must be >= 1, got {self.cf_frequencies}")
        need(math.isfinite(self.cf_scale) and self.cf_scale > 0,
             f"cf_scale must be a finite number > 0, got {self.cf_scale}")
        need(math.isfinite(self.moment_weight) and self.moment_weight >= 0,
             f"moment_weight must be a finite number >= 0, got {self.moment_weight}")
        need(self.calibration_weight >= 0,
             f"calibration_weight must be >= 0, got {self.calibration_weight}")
        need(math.isfinite(self.match_weight) and self.match_weight >= 0,
             f"match_weight must be a finite number >= 0, got {self.match_weight}")
        for f in dataclasses.fields(self):    # inf or nan in any rate or weight is a typo
            value = getattr(self, f.name)
            need(not isinstance(value, float) or math.isfinite(value),
                 f"{f.name} must be a finite number, got {value}")
        self.bandwidths  # parses and checks mmd_bandwidths
        need(bool(self.export_formats),   # parses and checks exports
             f"exports must name at least one layout of {', '.join(EXPORT_FORMATS)} (comma-"
             f"separated); got {self.exports!r}")
        need(self.log_every == -1 or self.log_every >= 1,
             f"log_every must be -1 (automatic) or >= 1, got {self.log_every}")
        need(self.microbatch >= -1, f"microbatch must be -1 (automatic), 0 (whole batches) or "
             f"a chunk size >= 1, got {self.microbatch}")
        for name in ("batch_real", "trained_bs", "batch_train", "net_num", "initial_models",
                     "net_generate_interval", "train_net_num", "eval_interval", "num_eval",
                     "checkpoint_every", "keep_checkpoints"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("validation_per_class", "net_push_num", "fetch_net_num",
                     "model_train_steps", "epoch_eval_train", "eval_every", "ce_weight",
                     "lr_img", "lr_net"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.initial_models <= self.net_num,
             f"initial_models ({self.initial_models}) exceeds the queue capacity net_num "
             f"({self.net_num})")
        need(self.fetch_net_num <= self.net_num, "fetch_net_num exceeds the queue capacity")
        need(self.train_net_num <= self.initial_models,
             "train_net_num exceeds the number of models in the initial queue")

    # --- derived quantities
    @property
    def bandwidths(self) -> tuple[float, ...] | None:
        """``mmd_bandwidths`` as floats; None for the median heuristic."""
        if not self.mmd_bandwidths.strip():
            return None
        try:
            values = tuple(float(v) for v in self.mmd_bandwidths.split(","))
        except ValueError:
            raise ValueError(f"mmd_bandwidths must be comma-separated numbers such as "
                             f"'1,2,4', got {self.mmd_bandwidths!r}") from None
        if not all(math.isfinite(v) and v > 0 for v in values):
            raise ValueError(f"mmd_bandwidths must all be finite and > 0, got "
                             f"{self.mmd_bandwidths!r}")
        return values

    @property
    def matching_dsa(self) -> str:
        """The DSA strategy of matching: ``match_dsa_strategy``, else ``dsa_strategy``."""
        return self.match_dsa_strategy or self.dsa_strategy

    @property
    def export_formats(self) -> tuple[str, ...]:
        """``exports`` as a tuple of layout names (see ``idm_jax.runs.export``)."""
        formats = tuple(f.strip() for f in self.exports.split(",") if f.strip())
        unknown = sorted(set(formats) - set(EXPORT_FORMATS))
        if unknown:
            raise ValueError(f"exports: unknown layouts {unknown}; valid: "
                             f"{', '.join(EXPORT_FORMATS)} (comma-separated)")
        return formats

    @property
    def pieces(self) -> int:
        """Training images per stored image: factor**2 with IDM's partition-and-expand (1 + f**2
        multi-scale, 4 non-uniform), 1 without."""
        if not self.partition_expand:
            return 1
        return {"uniform": self.partition_factor ** 2, "multiscale": 1 + self.partition_factor ** 2,
                "nonuniform": 4}[self.partition]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Config":
        unknown = set(values) - set(field_names())
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}; valid: "
                             f"{', '.join(field_names())}")
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        return cls.from_dict(json.loads(text))


def field_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(Config))


# Run mechanics: how a run is carried out, never what it computes (microbatch changes only the
# float summation order, and a run moved to another kind of device needs it). Two finished runs
# that differ only in these are the same result.
MECHANICS = ("checkpoint_every", "keep_checkpoints", "log_every", "exports", "microbatch",
             "memory_budget_gb", "record_grad_norms")

# Fields a run may be resumed with a different value of: the mechanics, the iteration target and
# the evaluation protocol (which reads the set but never changes it). The resumed run then ends
# exactly as an uninterrupted run with the new value would. Every other field changes the
# condensed set, so a checkpoint made with another value is refused.
RESUMABLE_FIELDS = MECHANICS + ("iterations", "eval_every", "eval_model", "num_eval",
                                "epoch_eval_train", "batch_train")


def result_differences(saved: Mapping[str, Any], config: Config) -> list[str]:
    """The result-changing fields where ``config`` differs from ``saved`` (a config dict), as
    ``"field: saved -> now"`` lines. Fields absent from ``saved`` (an older version) count as
    their default."""
    defaults = Config()
    lines = []
    for name in field_names():
        if name in RESUMABLE_FIELDS:
            continue
        before = saved.get(name, getattr(defaults, name))
        now = getattr(config, name)
        if before != now:
            lines.append(f"{name}: {before!r} -> {now!r}")
    return lines


def _parse_value(name: str, kind: type, raw: Any) -> Any:
    if not isinstance(raw, str):
        if kind is float and isinstance(raw, int) and not isinstance(raw, bool):
            return float(raw)
        if isinstance(raw, kind) and not (kind is int and isinstance(raw, bool)):
            return raw
        raise ValueError(f"config field {name!r} expects {kind.__name__}, got {raw!r}")
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return kind(raw)
    except ValueError:
        raise ValueError(f"config field {name!r} expects {kind.__name__}, got {raw!r}") from None


def override(config: Config, overrides: Mapping[str, Any]) -> Config:
    """Return ``config`` with fields replaced; string values are parsed by the field's type.

    Raises ValueError naming the field and listing the valid fields for unknown names, and
    naming the expected type for values that do not parse.
    """
    hints = typing.get_type_hints(Config)
    parsed = {}
    for name, raw in overrides.items():
        if name not in hints:
            raise ValueError(f"unknown config field {name!r}; valid fields: "
                             f"{', '.join(field_names())}")
        parsed[name] = _parse_value(name, hints[name], raw)
    return dataclasses.replace(config, **parsed)


__all__ = ["DISTANCES", "PARTITIONS", "MOMENTS", "Config", "override", "field_names", "MECHANICS",
           "RESUMABLE_FIELDS", "result_differences"]
