"""Every paper setting as a named preset, and the transforms that derive the others.

A preset is the official command's flags on top of ``Config``'s defaults (docs/FAITHFULNESS.md,
"presets"), so each can be read line by line against ``command.txt``. ``NAME-smoke`` is the
seconds-long CPU variant of a preset (sizes only, never the method), ``NAME-no-components`` the
ablation without IDM's components. Another method on a preset: ``methods.with_method``.
"""

from __future__ import annotations

import dataclasses

from idm_jax.config import Config

def _cifar(dataset, ipc, **flags):
    return Config(dataset=dataset, ipc=ipc, **flags)


PRESETS: dict[str, Config] = {
    "cifar10-ipc1": _cifar("cifar10", 1, ce_weight=0.5, batch_real=5000,
                           net_generate_interval=5, eval_interval=100),
    "cifar10-ipc10": _cifar("cifar10", 10, ce_weight=0.5, eval_interval=100),
    "cifar10-ipc50": _cifar("cifar10", 50, ce_weight=0.1, eval_interval=500),
    "cifar100-ipc1": _cifar("cifar100", 1, ce_weight=0.5, batch_real=5000,
                            net_generate_interval=5, eval_interval=100),
    "cifar100-ipc10": _cifar("cifar100", 10, ce_weight=0.1, model_train_steps=50,
                             eval_interval=100),
    "cifar100-ipc50": _cifar("cifar100", 50, ce_weight=0.1, eval_interval=500),
    # TinyImageNet: the official --aug initialises each image with ONE full real image (the
    # mosaic condition is inverted in IDM_tiny.py; docs/FAITHFULNESS.md, "quirks and options");
    # PE is still applied.
    "tinyimagenet-ipc1": _cifar("tinyimagenet", 1, init="real", ce_weight=0.5,
                                eval_interval=100),
    "tinyimagenet-ipc10": _cifar("tinyimagenet", 10, init="real", ce_weight=0.5,
                                 eval_interval=500),
    "tinyimagenet-ipc50": _cifar("tinyimagenet", 50, init="real", ce_weight=0.8,
                                 model_train_steps=50, eval_interval=1000),
    # ImageNet subset (ConvNet_6, 224 px): the script's quirks are the defaults
    # (docs/FAITHFULNESS.md, "quirks and options"): unnormalised real train images, the first
    # batch_real images of a class every time, and a mosaic of the same ipc images in every
    # quadrant. Queue training uses batches of batch_real.
    "imagenet_subset-ipc1": Config(
        dataset="imagenet_subset", ipc=1, model="ConvNet_6", eval_model="ConvNet_6",
        ce_weight=3.0, batch_real=128, net_generate_interval=50, net_num=50, eval_interval=200,
        batch_train=128, trained_bs=128, real_sampling="first", normalize_train=False,
        init="mosaic_repeat"),
    "imagenet_subset-ipc10": Config(
        dataset="imagenet_subset", ipc=10, model="ConvNet_6", eval_model="ConvNet_6",
        ce_weight=3.0, batch_real=128, net_generate_interval=50, net_num=50, eval_interval=1000,
        batch_train=128, trained_bs=128, real_sampling="first", normalize_train=False,
        init="mosaic_repeat"),
    # IPC50 runs without --aug (no PE, single-image init). The official command expects
    # pretrained queue models that no released code loads (docs/FAITHFULNESS.md,
    # "known differences"); we start from random models and say so in the README.
    "imagenet_subset-ipc50": Config(
        dataset="imagenet_subset", ipc=50, model="ConvNet_6", eval_model="ConvNet_6",
        ce_weight=3.0, batch_real=128, net_generate_interval=50, net_num=100, eval_interval=500,
        batch_train=128, trained_bs=128, real_sampling="first", normalize_train=False,
        init="real", partition_expand=False),
    # Offline default (ours, not a paper setting): scikit-learn digits at 16x16x1, sized to
    # finish in 3 to 4 minutes on 2 CPU cores (IPC 1 and 10 with their baselines). The
    # class-aware CE term is off: digits' queue models pass 90% accuracy within a few dozen
    # iterations, so its weight (ce_weight x accuracy%) nears 50 and it swamps the MMD term.
    # Measured (3 eval models each): IPC 10 fell from 96.3% at the mosaic initialisation to
    # 92.1% with CE, 95.4% with ce_weight 0.05, and rose to 97.6% without CE; IPC 1 reached
    # 88.8% with CE and 95.5% without (BENCHMARKS.md).
    "digits-ipc1": Config(dataset="digits", ipc=1, model="ConvNetW32", eval_model="ConvNetW32",
                          iterations=100, batch_real=64, trained_bs=64, net_num=20,
                          net_generate_interval=5, eval_interval=50, syn_ce=False, num_eval=3,
                          epoch_eval_train=200, eval_every=0, checkpoint_every=50),
    "digits-ipc10": Config(dataset="digits", ipc=10, model="ConvNetW32", eval_model="ConvNetW32",
                           iterations=100, batch_real=64, trained_bs=64, net_num=20,
                           net_generate_interval=5, eval_interval=50, syn_ce=False, num_eval=3,
                           epoch_eval_train=200, eval_every=0, checkpoint_every=50),
}


def get_preset(name: str) -> Config:
    """The named preset; ``NAME-smoke`` gives its ``smoke`` variant, ``NAME-no-components`` IDM
    without its components. (Another method on a preset: ``methods.with_method``.)"""
    for suffix, transform in (("-smoke", smoke), ("-no-components", without_components)):
        if name.endswith(suffix):
            return transform(get_preset(name[: -len(suffix)]))
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))} "
                         f"(append -smoke for a seconds-long CPU run, -no-components for IDM "
                         f"without PE, queue training and CE)")
    return PRESETS[name]


# What ``smoke`` may change: sizes and lengths, never a method's schedule or optimiser (the
# queue's intervals, the image optimiser, the objective stay as the method set them).
SIZE_FIELDS = ("model", "eval_model", "iterations", "batch_real", "trained_bs",
               "model_train_steps", "net_num", "initial_models", "eval_interval", "num_eval",
               "epoch_eval_train", "batch_train", "eval_every", "checkpoint_every")


def smoke(config: Config) -> Config:
    """A variant of ``config`` with the same method that runs in seconds on a CPU: smaller
    networks, batches, queue and evaluation, 10 iterations (only ``SIZE_FIELDS`` change, each
    only downwards, so the order in which smoke and a method are applied does not matter)."""
    return dataclasses.replace(
        config, model="ConvNetW32" if config.model == "ConvNet" else config.model,
        eval_model="ConvNetW32" if config.eval_model == "ConvNet" else config.eval_model,
        iterations=10, batch_real=min(config.batch_real, 32),
        trained_bs=min(config.trained_bs, 32),
        model_train_steps=min(config.model_train_steps, 2), net_num=min(config.net_num, 6),
        initial_models=min(config.initial_models, 3), eval_interval=min(config.eval_interval, 5),
        num_eval=2, epoch_eval_train=4, batch_train=64, eval_every=0, checkpoint_every=5)


def without_components(config: Config) -> Config:
    """IDM without its three components: no PE, no queue training, no CE (an ablation).

    A fresh random extractor every iteration (queue of one model, pushed every iteration, never
    trained) and the single-image init; the image optimiser stays IDM's (one step per class,
    ``lr_img`` unchanged), so only the three components change. This is not DM: see ``dm``.
    """
    return dataclasses.replace(
        config, partition_expand=False, init="real", syn_ce=False, model_train_steps=0,
        fetch_net_num=0, net_num=1, initial_models=1, net_generate_interval=1)


__all__ = ["PRESETS", "get_preset", "smoke", "SIZE_FIELDS", "without_components"]
