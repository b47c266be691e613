"""Presets against reference table 8.3 (transcribed here by hand) and override parsing."""

import dataclasses

import pytest

from idm_jax import config as config_lib
from idm_jax import methods, validate
from idm_jax.config import Config
from idm_jax import presets

# Reference 8.3, one row per official command: ipc, ce_weight, batch_real, net_generate_interval,
# net_num, model_train_steps, eval_interval, batch_train, --aug.
TABLE_8_3 = {
    "cifar10-ipc1": (1, 0.5, 5000, 5, 100, 10, 100, 256, True),
    "cifar10-ipc10": (10, 0.5, 256, 30, 100, 10, 100, 256, True),
    "cifar10-ipc50": (50, 0.1, 256, 30, 100, 10, 500, 256, True),
    "cifar100-ipc1": (1, 0.5, 5000, 5, 100, 10, 100, 256, True),
    "cifar100-ipc10": (10, 0.1, 256, 30, 100, 50, 100, 256, True),
    "cifar100-ipc50": (50, 0.1, 256, 30, 100, 10, 500, 256, True),
    "tinyimagenet-ipc1": (1, 0.5, 256, 30, 100, 10, 100, 256, True),
    "tinyimagenet-ipc10": (10, 0.5, 256, 30, 100, 10, 500, 256, True),
    "tinyimagenet-ipc50": (50, 0.8, 256, 30, 100, 50, 1000, 256, True),
    "imagenet_subset-ipc1": (1, 3.0, 128, 50, 50, 10, 200, 128, True),
    "imagenet_subset-ipc10": (10, 3.0, 128, 50, 50, 10, 1000, 128, True),
    "imagenet_subset-ipc50": (50, 3.0, 128, 50, 100, 10, 500, 128, False),
}
COLUMNS = ("ipc", "ce_weight", "batch_real", "net_generate_interval", "net_num",
           "model_train_steps", "eval_interval", "batch_train", "partition_expand")

# Reference 8.1/8.2: flags shared by every command and parser defaults they keep.
SHARED = dict(dsa_strategy="color_crop_cutout_flip_scale_rotate", lr_img=0.2, num_eval=5,
              syn_ce=True, train_net_num=1, iterations=20000, epoch_eval_train=1000,
              lr_net=0.01, fetch_net_num=2, net_push_num=1, initial_models=3, img_momentum=0.5,
              net_momentum=0.9, net_weight_decay=5e-4, image_update="per_class")


@pytest.mark.parametrize("name", sorted(TABLE_8_3))
def test_preset_equals_official_command(name):
    preset = presets.get_preset(name)
    for column, want in zip(COLUMNS, TABLE_8_3[name]):
        assert getattr(preset, column) == want, (name, column)
    for field, want in SHARED.items():
        assert getattr(preset, field) == want, (name, field)
    imagenet = name.startswith("imagenet")
    assert preset.model == ("ConvNet_6" if imagenet else "ConvNet")
    assert preset.eval_model == preset.model
    assert preset.trained_bs == (128 if imagenet else 256)
    # Quirks are the faithful defaults (reference 10.5, 10.6).
    assert (preset.real_sampling == "first") == imagenet
    assert preset.normalize_train == (not imagenet)
    if name.startswith("tinyimagenet"):
        assert preset.init == "real"
    elif name == "imagenet_subset-ipc50":
        assert preset.init == "real"
    elif imagenet:
        assert preset.init == "mosaic_repeat"
    else:
        assert preset.init == "mosaic"


def test_every_table_row_has_a_preset():
    assert set(TABLE_8_3) <= set(presets.PRESETS)


def test_smoke_and_dm_variants():
    smoke = presets.get_preset("cifar10-ipc10-smoke")
    assert smoke.iterations <= 20 and smoke.ipc == 10 and smoke.dataset == "cifar10"
    dm = methods.with_method(presets.get_preset("cifar10-ipc10"), "dm")
    assert dm.method == "dm" and not dm.partition_expand and not dm.syn_ce
    assert dm.net_generate_interval == 1 and dm.init == "real"
    # DM's own optimiser: one step of lr 1 on the loss summed over classes.
    assert dm.image_update == "summed" and dm.lr_img == 1.0 and dm.img_momentum == 0.5
    # The old ablation keeps IDM's optimiser and says what it is.
    ablation = presets.get_preset("cifar10-ipc10-no-components")
    assert ablation.image_update == "per_class" and ablation.lr_img == 0.2
    assert not ablation.partition_expand and not ablation.syn_ce and ablation.fetch_net_num == 0


@pytest.mark.parametrize("preset", ["cifar10-ipc1", "cifar10-ipc10", "digits-ipc10",
                                    "imagenet_subset-ipc1"])
def test_smoke_changes_sizes_only_and_commutes_with_every_method(preset):
    base = presets.get_preset(preset)
    transforms = {"dm": lambda c: methods.with_method(c, "dm"),
                  "idm": lambda c: methods.with_method(c, "idm"),
                  "no-components": presets.without_components}
    for name, transform in transforms.items():
        method_then_smoke = presets.smoke(transform(base))
        assert method_then_smoke == transform(presets.smoke(base)), name
        changed = {f for f in config_lib.field_names()
                   if getattr(method_then_smoke, f) != getattr(transform(base), f)}
        assert changed <= set(presets.SIZE_FIELDS), (name, changed - set(
            presets.SIZE_FIELDS))
    # --smoke --method dm is DM: its schedule and optimiser survive the smoke sizes.
    dm_smoke = presets.smoke(methods.with_method(base, "dm"))
    assert (dm_smoke.net_generate_interval, dm_smoke.image_update, dm_smoke.lr_img) == (
        1, "summed", 1.0)
    # The ablation's one-model queue pushed every iteration survives too.
    ablation = presets.smoke(presets.without_components(base))
    assert (ablation.net_num, ablation.net_generate_interval) == (1, 1)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="cifar10-ipc10"):
        presets.get_preset("cifar10-ipc7")


def test_override_parses_by_type():
    base = presets.get_preset("cifar10-ipc10")
    new = config_lib.override(base, {"ipc": "50", "ce_weight": "0.1", "syn_ce": "false",
                                     "model": "ConvNetD4", "lr_img": 1})
    assert (new.ipc, new.ce_weight, new.syn_ce, new.model, new.lr_img) == (
        50, 0.1, False, "ConvNetD4", 1.0)
    assert isinstance(new.lr_img, float)


@pytest.mark.parametrize("bad, match", [
    ({"ipcc": "1"}, "unknown config field 'ipcc'.*valid fields: dataset"),
    ({"ipc": "ten"}, "'ipc' expects int"),
    ({"syn_ce": "maybe"}, "'syn_ce' expects bool"),
    ({"ipc": "0"}, "ipc must be >= 1"),
    ({"dataset": "cifar11"}, "unknown dataset"),
    ({"lr_img": "inf"}, "lr_img must be a finite number"),
    ({"ce_weight": "nan"}, "ce_weight must be a finite number"),
    ({"exports": "npz,tiff"}, r"exports: unknown layouts \['tiff'\]"),
])
def test_bad_overrides_fail_with_a_message(bad, match):
    with pytest.raises(ValueError, match=match):
        config_lib.override(Config(), bad)


@pytest.mark.parametrize("bad, match", [
    ({"image_update": "lbfgs"}, "--image_update must be one of per_class, summed, sgd, adam"),
    ({"method": "m4d"}, "--method 'm4d' is not a known method; valid: idm, dm"),
    ({"method": "no/such/file.py:MINE"}, "there is no file no/such/file.py"),
])
def test_method_settings_are_checked_before_any_work(bad, match):
    # The config itself accepts any name (a method file may add optimisers); the check that the
    # CLI and make_engine run refuses what no method can build, naming the flag.
    config = config_lib.override(Config(), bad)
    with pytest.raises(validate.InvalidRun, match=match):
        validate.check_method(config)


def test_json_round_trip():
    preset = presets.get_preset("imagenet_subset-ipc50")
    assert Config.from_json(preset.to_json()) == preset
    with pytest.raises(ValueError, match="unknown config fields"):
        Config.from_dict(dict(dataclasses.asdict(preset), bogus=1))
