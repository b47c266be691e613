"""The offline default: IDM on scikit-learn's bundled digits, against random real images.

``python -m experiments.digits`` needs no download and finishes in a few minutes on 2 CPU cores.
It condenses digits (16x16x1, 10 classes) at IPC 1 and IPC 10, evaluates each condensed set, and
evaluates random real images of the same budget (ipc per class, plain, no expansion) with the
same protocol, printing both side by side. Outputs go to ``--workdir`` (default runs/digits),
one sub-folder per ipc, plus ``comparison.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

import jax
import numpy as np

from idm_jax import data, evaluation
from idm_jax.runs import checkpoint, cli, failures


def random_real_baseline(dataset: data.Dataset, config, key) -> dict:
    """Evaluate ``ipc`` random real train images per class with the run's protocol (drawn from
    the training images the run condenses from: a validation split stays out)."""
    dataset, _ = data.split_validation(dataset, config.validation_per_class,
                                       config.validation_seed)
    rng = np.random.default_rng(config.seed)
    rows = np.concatenate([rng.choice(np.flatnonzero(dataset.train_labels == k), config.ipc,
                                      replace=False) for k in range(dataset.num_classes)])
    images = data.normalize(dataset.train_images[rows], dataset.mean, dataset.std)
    test_x = data.normalize(dataset.test_images, dataset.mean, dataset.std)
    return evaluation.evaluate_synset(
        key, images, dataset.train_labels[rows], test_x, dataset.test_labels,
        model=config.eval_model, num_classes=dataset.num_classes, num_models=config.num_eval,
        epochs=config.epoch_eval_train, batch_size=config.batch_train, lr=config.lr_net,
        momentum=config.net_momentum, weight_decay=config.net_weight_decay,
        dsa_strategy=config.dsa_strategy, expand=False, microbatch_size=config.microbatch)


def _parse_ipcs(text: str) -> list[int]:
    try:
        ipcs = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise cli.UserError(f"--ipcs must be comma-separated whole numbers such as 1,10; got "
                            f"{text!r}") from None
    if not ipcs or min(ipcs) < 1 or len(set(ipcs)) != len(ipcs):
        raise cli.UserError(f"--ipcs must name distinct values >= 1, got {text!r}")
    return ipcs


def _random_real_once(dataset: data.Dataset, config, workdir: str) -> dict:
    """The random-real baseline of a run, evaluated once and kept in ``random_real.json``
    beside it (re-used while the settings it depends on are the same)."""
    path = os.path.join(workdir, "random_real.json")
    fields = ("seed", "ipc", "eval_model", "num_eval", "epoch_eval_train", "batch_train",
              "lr_net", "net_momentum", "net_weight_decay", "dsa_strategy",
              "validation_per_class", "validation_seed")
    settings = {f: getattr(config, f) for f in fields}
    try:
        with open(path) as f:
            saved = json.load(f)
        if saved.get("settings") == settings:
            return saved["result"]
    except (OSError, ValueError, AttributeError, KeyError):
        pass
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 7)
    result = random_real_baseline(dataset, config, key)
    checkpoint.dump_json(path, {"settings": settings, "result": result})
    return result


@failures.user_facing
def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m experiments.digits", add_help=False)
    parser.add_argument("--ipcs", default="1,10", help="comma-separated ipc values")
    parser.add_argument("--workdir", default=os.path.join("runs", "digits"))
    parser.add_argument("-h", "--help", action="store_true")
    own, rest = parser.parse_known_args(argv)
    cli.enable_compilation_cache()
    if own.help:
        parser.print_help()
        print("\nOther flags as every experiment (python -m experiments.cifar10 --help); any "
              "config field can be set with --FIELD VALUE.")
        return {}
    ipcs = _parse_ipcs(own.ipcs)
    if os.path.exists(own.workdir) and not os.path.isdir(own.workdir):
        raise cli.UserError(f"--workdir {own.workdir} is a file; give a folder")
    dataset = data.load_dataset("digits")
    runs = {}
    for ipc in ipcs:       # every IPC's settings are checked before the first one runs
        args, config = cli.parse(["--ipc", str(ipc)] + list(rest), "digits", ipc)
        args.workdir = os.path.join(own.workdir, f"ipc{ipc}")
        cli.check_before_loading(config, args)
        cli.check_data_for(config, dataset)
        runs[ipc] = (args, config)
    comparison = {}
    for ipc, (args, config) in runs.items():
        print(f"== digits ipc {ipc}: condensing {config.iterations} iterations")
        idm = cli.run(config, args, dataset)
        random = _random_real_once(dataset, config, args.workdir)
        comparison[ipc] = {"idm": idm["mean"], "idm_std": idm["std"],
                           "random_real": random["mean"], "random_real_std": random["std"],
                           "num_eval": config.num_eval, "method": config.method}
    label = next(iter(comparison.values()), {}).get("method", "idm")
    print(f"\n  ipc | {label + ' condensed (%)':<18} | random real (%)")
    for ipc, row in comparison.items():
        print(f"  {ipc:>3} | {row['idm']:6.2f} +- {row['idm_std']:5.2f} | "
              f"{row['random_real']:6.2f} +- {row['random_real_std']:5.2f}")
    os.makedirs(own.workdir, exist_ok=True)
    checkpoint.dump_json(os.path.join(own.workdir, "comparison.json"),
                         {str(k): v for k, v in comparison.items()})
    return comparison


if __name__ == "__main__":
    main()
