"""The shared, thin command line of every experiment: flags -> config -> data -> run -> outputs.

Everything of a run lives in ``--workdir``:
  config.json        the resolved configuration
  checkpoints/       orbax checkpoints; re-running the same command resumes from the latest
  metrics.jsonl      one JSON line per iteration (loss terms, queue accuracy, seconds) and per eval
  synthetic.png      the synthetic images, one row per class (also synthetic_<it>.png per eval)
  synthetic.npz      the condensed set in [0,1] pixels with labels and normalisation constants
  results.json       final per-model accuracies, mean and std, wall times, device

Ctrl-C saves a checkpoint and exits cleanly (a second Ctrl-C aborts at once). A NaN or Inf loss
stops the run and names the iteration and the last good checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from typing import Optional, Sequence

import jax
import numpy as np

from idm_jax import checkpoint, condense, config as config_lib, data, evaluate, sharding
from idm_jax.config import Config


class UserError(Exception):
    """A problem the user can fix; printed without a traceback."""


# ----------------------------------------------------------------------------- flags
def build_parser(dataset: str, default_ipc: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m experiments.{dataset}",
        description=f"IDM dataset condensation of {dataset}. Any config field can be set with "
                    f"--FIELD VALUE (e.g. --ce_weight 0.1 --iterations 1000); see "
                    f"idm_jax/config.py for all of them.")
    parser.add_argument("--ipc", type=int, default=default_ipc, help="images per class")
    parser.add_argument("--preset", default=None,
                        help=f"named preset (default {dataset}-ipc<IPC>); "
                             f"one of {', '.join(sorted(config_lib.PRESETS))}")
    parser.add_argument("--workdir", default=None, help="run folder (default runs/<preset>)")
    parser.add_argument("--smoke", action="store_true", help="tiny variant that runs in seconds")
    parser.add_argument("--dm", action="store_true",
                        help="DM ablation: no partition-expand, no queue training, no CE")
    parser.add_argument("--source", default=None,
                        help="data source: tfds (default for TFDS datasets), npy, pickle, "
                             "digits, folder")
    parser.add_argument("--data_dir", default=None, help="folder for npy / pickle / folder")
    parser.add_argument("--tfds_data_dir", default=None, help="TFDS data folder")
    parser.add_argument("--class_list", default=None, help="imagenet_subset: wnid list file")
    parser.add_argument("--restart", action="store_true",
                        help="ignore existing checkpoints in the workdir and start over")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--devices", type=int, default=0,
                        help="devices to shard the class axis over (0: all available)")
    parser.add_argument("--distributed", action="store_true",
                        help="multi-host: call jax.distributed.initialize first (see README)")
    parser.add_argument("--coordinator_address", default=None, help="host0:port (--distributed)")
    parser.add_argument("--num_processes", type=int, default=None, help="hosts (--distributed)")
    parser.add_argument("--process_id", type=int, default=None, help="this host (--distributed)")
    return parser


def parse(argv: Optional[Sequence[str]], dataset: str, default_ipc: int):
    """Parse run flags and config overrides; returns (args, Config)."""
    parser = build_parser(dataset, default_ipc)
    args, rest = parser.parse_known_args(argv)
    overrides, i = {}, 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--"):
            raise UserError(f"unexpected argument {token!r}; config overrides look like "
                            f"--FIELD VALUE")
        name, _, value = token[2:].partition("=")
        if not _:
            if i + 1 >= len(rest):
                raise UserError(f"--{name} needs a value")
            value, i = rest[i + 1], i + 1
        overrides[name] = value
        i += 1
    preset = args.preset or f"{dataset}-ipc{args.ipc}"
    try:
        if preset in config_lib.PRESETS or args.preset:
            config = config_lib.get_preset(preset)
        else:  # an ipc without a paper preset: the ipc10 setting with this ipc
            base = config_lib.get_preset(f"{dataset}-ipc10")
            config = dataclasses.replace(base, ipc=args.ipc)
        if args.dm:
            config = config_lib.dm_ablation(config)
        if args.smoke:
            config = config_lib.smoke(config)
        if args.preset is None:
            overrides.setdefault("ipc", str(args.ipc))
        config = config_lib.override(config, overrides)
    except ValueError as err:
        raise UserError(str(err)) from None
    if config.dataset != dataset and args.preset is None:
        raise UserError(f"preset {preset} is for {config.dataset}, not {dataset}")
    if args.workdir is None:
        suffix = ("-dm" if args.dm else "") + ("-smoke" if args.smoke else "")
        args.workdir = os.path.join("runs", f"{dataset}-ipc{config.ipc}{suffix}")
    return args, config


# ----------------------------------------------------------------------------- outputs
def save_grid(path: str, images_01: np.ndarray, num_classes: int) -> None:
    """PNG of the synthetic set, one row per class: images (K*ipc, H, W, C) in [0,1]."""
    from PIL import Image  # only needed for this output

    n, h, w, c = images_01.shape
    ipc = n // num_classes
    zoom = max(1, 32 // h)                        # small images (digits) are hard to see
    pixels = (np.clip(images_01, 0, 1) * 255).round().astype(np.uint8)
    pixels = pixels.repeat(zoom, axis=1).repeat(zoom, axis=2)
    h, w, pad = h * zoom, w * zoom, 2
    grid = np.full((num_classes * (h + pad) + pad, ipc * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        row, col = divmod(i, ipc)
        top, left = pad + row * (h + pad), pad + col * (w + pad)
        grid[top:top + h, left:left + w] = pixels[i]
    mode = "L" if c == 1 else "RGB"
    Image.fromarray(grid[..., 0] if c == 1 else grid, mode).save(path)


class MetricsLog:
    def __init__(self, path: str):
        self._file = open(path, "a", buffering=1)

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()


def device_description() -> str:
    devices = jax.devices()
    return f"{len(devices)} x {devices[0].device_kind} ({jax.default_backend()})"


# ----------------------------------------------------------------------------- the run
def load_data(config: Config, args) -> data.Dataset:
    try:
        dataset = data.load_dataset(config.dataset, source=args.source, data_dir=args.data_dir,
                                    tfds_data_dir=args.tfds_data_dir,
                                    class_list=getattr(args, "class_list", None))
        if config.init != "noise":  # every init draw takes ipc distinct images of a class
            data.check_enough_per_class(dataset, config.ipc,
                                        f"for ipc={config.ipc} with init={config.init}")
    except (ValueError, FileNotFoundError) as err:
        raise UserError(str(err)) from None
    return dataset


def evaluate_state(images, dataset: data.Dataset, config: Config, key, test_x) -> dict:
    """Evaluate stored synthetic ``images`` (K*ipc, H, W, C), normalised, host or device array."""
    return evaluate.evaluate_synset(
        key, images, condense.synthetic_labels(dataset.num_classes, config.ipc),
        test_x, dataset.test_labels, model=config.eval_model, num_classes=dataset.num_classes,
        num_models=config.num_eval, epochs=config.epoch_eval_train,
        batch_size=config.batch_train, lr=config.lr_net, momentum=config.net_momentum,
        weight_decay=config.net_weight_decay, dsa_strategy=config.dsa_strategy,
        expand=config.partition_expand, partition_factor=config.partition_factor,
        microbatch_size=config.microbatch)


class _Interrupt:
    """First Ctrl-C asks the loop to checkpoint and stop; a second one aborts at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            signal.signal(signal.SIGINT, self._previous)
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: saving a checkpoint after this iteration (Ctrl-C again to abort)",
              file=sys.stderr)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)


def build_mesh(args):
    """The device mesh of the run, or None for a single device (the plain code path)."""
    if getattr(args, "distributed", False):
        sharding.initialize_distributed(args.coordinator_address, args.num_processes,
                                        args.process_id)
    count = getattr(args, "devices", 0) or jax.device_count()
    if count > jax.device_count():
        raise UserError(f"--devices {count} but only {jax.device_count()} are available")
    if jax.process_count() > 1 and count != jax.device_count():
        raise UserError(f"with {jax.process_count()} hosts the run uses every device of every "
                        f"host ({jax.device_count()}); drop --devices {count}")
    return sharding.make_mesh(count) if count > 1 else None


def place_real(dataset: data.Dataset, mesh) -> condense.RealData:
    """The real training set on the run's devices.

    With several hosts each host places only the classes its devices hold
    (``sharding.real_from_host_shard``), so no device and no host's device memory receives the
    whole train set. (The loaders still read the whole set into each host's RAM first.)
    """
    if jax.process_count() == 1:
        return condense.prepare_real(dataset.train_images, dataset.train_labels, dataset.mean,
                                     dataset.std, dataset.num_classes, mesh=mesh)
    labels = dataset.train_labels
    own = sharding.host_class_slice(dataset.num_classes, mesh)
    keep = (labels >= own.start) & (labels < own.stop)
    counts = np.bincount(labels, minlength=dataset.num_classes)
    return sharding.real_from_host_shard(dataset.train_images[keep], labels[keep], counts,
                                         dataset.mean, dataset.std, mesh)


def run(config: Config, args, dataset: Optional[data.Dataset] = None) -> dict:
    """Condense, evaluate and write every output of a run into ``args.workdir``."""
    os.makedirs(args.workdir, exist_ok=True)
    mesh = build_mesh(args)
    dataset = load_data(config, args) if dataset is None else dataset
    real = place_real(dataset, mesh)
    # With several hosts every host runs this function; only host 0 writes the shared outputs,
    # and every host makes the same collective calls (checkpoints, to_host, any_host).
    main_host = jax.process_index() == 0
    engine = condense.make_engine(config, real.num_classes, real.image_shape)
    meta = checkpoint.data_meta(real)
    checkpointer = checkpoint.Checkpointer(os.path.join(args.workdir, "checkpoints"),
                                           keep=config.keep_checkpoints)
    state = condense.init_state(engine, real, config.seed)
    if mesh is not None:  # also the restore template: checkpoints restore straight sharded
        state = sharding.shard_state(state, mesh)
    latest = checkpointer.latest_step()
    if latest is not None and not args.restart:
        try:
            state = checkpointer.restore(state, config, meta)
        except checkpoint.CheckpointMismatchError as err:
            raise UserError(f"{err} (or pass --restart to overwrite it)") from None
        print(f"resuming from iteration {int(state.iteration)} ({checkpointer.directory})")
    elif latest is not None:
        import shutil
        checkpointer.close()
        if main_host:
            shutil.rmtree(checkpointer.directory)
        sharding.sync_hosts("idm_jax: old checkpoints removed")   # others wait for host 0
        checkpointer = checkpoint.Checkpointer(os.path.join(args.workdir, "checkpoints"),
                                               keep=config.keep_checkpoints)
    if main_host:
        checkpoint.dump_json(os.path.join(args.workdir, "config.json"),
                             dict(config.to_dict(), **{"data": meta}))
    log = MetricsLog(os.path.join(args.workdir, "metrics.jsonl") if main_host else os.devnull)
    test_x = data.normalize(dataset.test_images, dataset.mean, dataset.std)
    eval_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1_000_003)

    def images_01(images):
        return np.clip(images * np.asarray(real.std) + np.asarray(real.mean), 0,
                       1) if config.normalize_train else np.clip(images, 0, 1)

    def intermediate_eval(s, it):
        # Every host gathers the images and evaluates them the same way (same key); host 0 writes.
        images = sharding.to_host(s.images)
        result = evaluate_state(images, dataset, config, jax.random.fold_in(eval_key, it),
                                test_x)
        log.write({"event": "eval", "iteration": it, **result})
        if main_host:
            save_grid(os.path.join(args.workdir, f"synthetic_{it}.png"), images_01(images),
                      real.num_classes)
        print(f"[it {it}] {config.eval_model} accuracy {result['mean']:.2f} +- "
              f"{result['std']:.2f} % over {config.num_eval} models ({result['seconds']:.0f} s)")

    step = condense.make_step(engine, real, mesh=mesh)
    start_it = int(state.iteration)
    last_saved = latest if latest is not None and not args.restart else None
    condense_seconds = 0.0
    progress = None
    if not args.quiet and main_host:
        from tqdm import tqdm
        progress = tqdm(total=config.iterations, initial=start_it, unit="it",
                        dynamic_ncols=True, desc=f"{config.dataset} ipc{config.ipc}")
    with _Interrupt() as interrupt:
        for state, metrics in condense.iterate(engine, real, state, step=step):
            it = int(state.iteration)
            condense_seconds += metrics["seconds"]
            log.write(metrics)
            if not np.isfinite(metrics["loss"]) or metrics.get("images_finite", 1.0) != 1.0:
                where = (f"the last good checkpoint is iteration {last_saved} in "
                         f"{checkpointer.directory}" if last_saved is not None
                         else "no checkpoint was written yet")
                what = (f"the loss became {metrics['loss']}" if not np.isfinite(metrics["loss"])
                        else "the synthetic images became NaN or Inf")
                raise UserError(f"{what} at iteration {metrics['iteration']}; {where}. Lower "
                                f"lr_img or check the data; re-running resumes from that "
                                f"checkpoint.")
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{metrics['loss']:.3g}",
                                     acc=f"{metrics['extractor_acc']:.0f}%")
            done = it >= config.iterations
            # All hosts stop at the same iteration even if Ctrl-C reached only some of them.
            stop = sharding.any_host(interrupt.requested)
            if stop or done or it % config.checkpoint_every == 0:
                last_saved = checkpointer.save(state, config, meta)
            if stop:
                if progress is not None:
                    progress.close()
                print(f"stopped at iteration {it}; checkpoint saved in {checkpointer.directory}. "
                      f"Re-run the same command to resume.")
                log.close()
                checkpointer.close()
                raise SystemExit(130)
            if config.eval_every and it % config.eval_every == 0 and not done:
                intermediate_eval(state, it)
    if progress is not None:
        progress.close()
    if last_saved != int(state.iteration):
        checkpointer.save(state, config, meta)
    checkpointer.close()

    # Final outputs: the reported evaluation is of the set after `iterations` updates.
    it = int(state.iteration)
    images = sharding.to_host(state.images)
    images_pixels = images_01(images)
    labels = np.asarray(condense.synthetic_labels(real.num_classes, config.ipc))
    # With the ImageNet quirk the stored images are already [0,1] pixels.
    mean, std = ((real.mean, real.std) if config.normalize_train
                 else (np.zeros_like(real.mean), np.ones_like(real.std)))
    if main_host:
        checkpoint.export_npz(os.path.join(args.workdir, "synthetic.npz"),
                              images, labels, mean, std,
                              partition_expand=config.partition_expand,
                              partition_factor=config.partition_factor,
                              normalized=config.normalize_train)
        save_grid(os.path.join(args.workdir, "synthetic.png"), images_pixels, real.num_classes)
    result = evaluate_state(images, dataset, config, jax.random.fold_in(eval_key, it), test_x)
    log.write({"event": "eval", "iteration": it, **result})
    log.close()
    results = {
        "dataset": config.dataset, "ipc": config.ipc, "iterations": it,
        "eval_model": config.eval_model, "accuracies": result["accuracies"],
        "mean": result["mean"], "std": result["std"], "num_eval": config.num_eval,
        "condense_seconds_this_session": condense_seconds,
        "resumed_from_iteration": start_it, "eval_seconds": result["seconds"],
        "device": device_description(), "jax_version": jax.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "config": config.to_dict()}
    if main_host:
        checkpoint.dump_json(os.path.join(args.workdir, "results.json"), results)
    print(f"[it {it}] final {config.eval_model} accuracy {result['mean']:.2f} +- "
          f"{result['std']:.2f} % over {config.num_eval} models; outputs in {args.workdir}")
    return results


def enable_compilation_cache() -> None:
    """Keep compiled programs on disk so a resumed or repeated run starts without recompiling.

    ``IDM_JAX_COMPILATION_CACHE`` sets the folder (default ~/.cache/idm-jax/xla); "off" disables.
    """
    path = os.environ.get("IDM_JAX_COMPILATION_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "idm-jax", "xla"))
    if path.lower() not in ("", "0", "off", "none"):
        jax.config.update("jax_compilation_cache_dir", path)


def main(dataset: str, default_ipc: int = 10, argv: Optional[Sequence[str]] = None) -> dict:
    """Entry point of ``python -m experiments.<dataset>``."""
    enable_compilation_cache()
    try:
        args, config = parse(argv, dataset, default_ipc)
        return run(config, args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
