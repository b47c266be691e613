"""A whole condensation run: checkpoints and resuming, evaluations, the outputs of a work folder.

``condense_and_evaluate(config, dataset, workdir)`` is what the command line runs; it can be
called from a notebook or a sweep the same way. Everything of a run lives in ``workdir``:

  config.json        the resolved configuration and the data's shape
  checkpoints/       orbax checkpoints with digests; calling again with the same workdir resumes
                     the newest intact one (``checkpoint.Checkpointer.restore_latest``)
  metrics.jsonl      one JSON line per iteration (loss terms, queue accuracy, seconds) and per
                     eval, each iteration once however often the run was interrupted
  sessions.jsonl     every start of the run: time, host, iteration resumed from, config
  synthetic.png      the synthetic images, one row per class (also synthetic_<it>.png per eval)
  synthetic.npz ...  the condensed set in the layouts of ``idm_jax.runs.export``
  results.json       final per-model accuracies, mean and population std, wall times, device
  evaluation.json    while the final evaluation runs (CPU): each model's score as it finishes,
                     so a stopped evaluation resumes with the models left (``runs.evaluating``)

One process at a time uses a workdir (``workdir.lock``); ``restart=True`` moves the previous run
to ``previous/<time>/`` instead of deleting it. Every setting and the data are checked
(``validate``) before the folder is created or anything runs.

The loop never waits for the device on every iteration: metrics are fetched every
``log_every`` iterations (and before every checkpoint and evaluation), so an accelerator keeps
running ahead. Before a checkpoint is written, the fetched metrics of every iteration up to it
have passed the NaN/Inf policy (``iterating.check_finite``), so every checkpoint holds finite
images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import time
from typing import Optional

import jax
import numpy as np

from idm_jax import data, engine, iterating, methods
from idm_jax.accel import sharding
from idm_jax.runs import checkpoint, evaluating, outputs
from idm_jax.runs.evaluating import evaluate_images
from idm_jax.runs import window as window_lib
from idm_jax import validate
from idm_jax import real as real_lib
from idm_jax.runs import workdir as workdir_lib
from idm_jax.base import Method
from idm_jax.runs.stop import Interrupted, StopRequest
from idm_jax.config import Config


# The gradient norm of each loss term in the first matching pass (config.record_grad_norms),
# written at iteration 0 so that a resumed run still reports it.
GRAD_NORMS_FILE = "grad_norms.json"


def place_real(dataset: data.Dataset, mesh) -> real_lib.RealData:
    """The real training set on the run's devices.

    With several hosts each host places only the classes its devices hold
    (``real.real_from_host_shard``), so no device receives the whole train set. (The loaders
    still read the whole set into each host's RAM first.)
    """
    if jax.process_count() == 1:
        return real_lib.prepare_real(dataset.train_images, dataset.train_labels, dataset.mean,
                                     dataset.std, dataset.num_classes, mesh=mesh)
    labels = dataset.train_labels
    own = sharding.host_class_slice(dataset.num_classes, mesh)
    keep = (labels >= own.start) & (labels < own.stop)
    counts = np.bincount(labels, minlength=dataset.num_classes)
    return real_lib.real_from_host_shard(dataset.train_images[keep], labels[keep], counts,
                                         dataset.mean, dataset.std, mesh)


def prepare_data(config: Config, dataset: data.Dataset, mesh=None,
                 workdir: Optional[str] = None):
    """The run's data, checked before any work: (the dataset less its validation split, that
    split or None, the real data placed on ``mesh``). Raises ``validate.InvalidRun``."""
    try:    # the held-out images leave the dataset before anything can draw from it
        dataset, validation = data.split_validation(dataset, config.validation_per_class,
                                                    config.validation_seed)
    except ValueError as err:
        raise validate.InvalidRun(str(err)) from None
    validate.check_data(config, dataset.class_counts, source=f"dataset {dataset.name}")
    if workdir is not None:
        validate.check_workdir(workdir)
    return dataset, validation, place_real(dataset, mesh)


def condense_and_evaluate(config: Config, dataset: data.Dataset, workdir: str, *,
                          mesh=None, restart: bool = False, quiet: bool = False,
                          method: Optional[Method] = None) -> dict:
    """Condense ``dataset`` with ``config``'s method, evaluate the result and write every output.

    Args:
      config: the run's configuration (``idm_jax.config``); ``config.method`` names the method.
      dataset: the loaded data (``idm_jax.data.load_dataset``).
      workdir: the run folder; the newest intact checkpoint there is resumed.
      mesh: spread the run over this device mesh (``sharding.make_mesh``); None: one device.
      restart: move the workdir's previous run to ``previous/<time>/`` and start over.
      quiet: no progress bar.
      method: a ``base.Method`` object to run instead of the one ``config.method`` names; the
        run records its name as ``config.method`` (a resume checks that name, not its code).

    Returns the contents of ``results.json``.
    Raises:
      validate.InvalidRun: a setting or the data cannot make a run (before any work).
      workdir.WorkdirBusy: another process is running in ``workdir``.
      checkpoint.CheckpointMismatchError: the workdir's checkpoint was made with settings that
        change the result.
      iterating.NonFiniteError: the loss or images stopped being finite (the message names the
        newest intact checkpoint).
      Interrupted: Ctrl-C, SIGTERM or SIGUSR1 (``runs.stop``); a checkpoint was saved.
    """
    if method is not None and config.method != method.name:
        config = dataclasses.replace(config, method=method.name)
    dataset, validation, real = prepare_data(config, dataset, mesh, workdir)
    # make_engine checks the config against the images (validate.check_config) and sizes the
    # network calls to memory; both can refuse the run, so both come before the folder exists.
    eng = engine.make_engine(config, real.num_classes, real.image_shape, method=method,
                             max_per_class=real.max_per_class,
                             normalization=(dataset.mean, dataset.std))
    # With several hosts every host runs this function; only host 0 writes the shared outputs
    # (and holds the lock), and every host makes the same collective calls.
    main_host = jax.process_index() == 0
    created = not os.path.isdir(workdir)
    os.makedirs(workdir, exist_ok=True)
    try:
        with contextlib.ExitStack() as stack:
            busy = None
            try:
                stack.enter_context(workdir_lib.lock(workdir, enabled=main_host))
            except workdir_lib.WorkdirBusy as err:
                busy = err
            if sharding.any_host(busy is not None):    # every host stops, not only host 0
                raise busy or workdir_lib.WorkdirBusy(f"--workdir {workdir} is in use (host 0 "
                                                      f"could not lock it)")
            return _condense_and_evaluate(config, dataset, real, eng, workdir, mesh, restart,
                                          quiet, main_host, validation)
    except BaseException:
        if created and main_host and os.path.isdir(workdir):
            workdir_lib.remove_if_unused(workdir)
        raise


@dataclasses.dataclass
class _Session:
    """One start of a run: what its phases share."""

    config: Config
    dataset: data.Dataset
    real: real_lib.RealData
    eng: engine.Engine
    workdir: str
    main_host: bool
    checkpointer: checkpoint.Checkpointer
    meta: dict                        # what each checkpoint records of the data and method
    log: Optional[outputs.MetricsLog] = None      # opened once the resume trimmed the file
    last_saved: Optional[int] = None  # iteration of the newest checkpoint written or restored
    validation: Optional[data.ValidationSplit] = None     # held out of ``dataset``
    quiet: bool = False               # no progress bars

    def evaluate(self, state, it: int, final: bool = False) -> dict:
        """Evaluate the set of ``state`` with the config's protocol and log it; every host does
        it the same way (same key), host 0 writes the picture."""
        config, real = self.config, self.real
        images = sharding.to_host(state.images)
        key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config.seed),
                                                    1_000_003), it)
        bar, progress = outputs.evaluation_bar(config.num_eval, config.epoch_eval_train,
                                               config.eval_model, self.quiet or not self.main_host)
        try:
            if final:     # the long one: kept model by model (runs.evaluating)
                result = evaluating.evaluate_resumably(
                    images, self.dataset, config, key, self.test_x, iteration=it,
                    workdir=self.workdir, policy=self.eng.policy, validation=self.validation,
                    progress=progress, write=self.main_host)
            else:
                result = evaluate_images(images, self.dataset, config, key, self.test_x,
                                         self.eng.policy, self.validation, progress)
        finally:
            if bar is not None:
                bar.close()
        self.log.write({"event": "eval", "iteration": it, **result})
        if self.main_host and not final:
            outputs.save_grid(os.path.join(self.workdir, f"synthetic_{it}.png"),
                              self.to_pixels(images), real.num_classes)
            print(f"[it {it}] {config.eval_model} accuracy {result['mean']:.2f} +- "
                  f"{result['std']:.2f} % over {config.num_eval} models "
                  f"({result['seconds']:.0f} s)")
        return result

    @functools.cached_property
    def test_x(self):
        return data.normalize(self.dataset.test_images, self.dataset.mean, self.dataset.std)

    @functools.cached_property
    def to_pixels(self):
        """Normalised images -> [0, 1] pixels, as the pictures and exports show them."""
        return outputs.pixel_converter(self.config, np.asarray(self.real.mean),
                                       np.asarray(self.real.std))


class _RunLog:
    """What a run does with each fetched iteration: one line in ``metrics.jsonl`` and the
    NaN/Inf policy; ``moved`` advances the progress bar after a flush."""

    def __init__(self, run: _Session, progress):
        self.run, self.progress, self.last = run, progress, None

    def __call__(self, iteration: int, values: dict, seconds: float) -> None:
        record = {k: float(v) for k, v in values.items()}
        record.update(iteration=iteration, seconds=seconds)
        self.run.log.write(record)
        self.last = record
        self._check(record, iteration)

    def moved(self, count: int) -> None:
        if self.progress is not None and count:
            self.progress.update(count)
            self.progress.set_postfix(loss=f"{self.last['loss']:.3g}",
                                      acc=f"{self.last['extractor_acc']:.0f}%")

    def _check(self, record: dict, iteration: int) -> None:
        try:
            iterating.check_finite(record, iteration)
        except iterating.NonFiniteError as err:
            # Every checkpoint holds images that passed this check, and the run is
            # deterministic: resuming would repeat the failure with the same settings.
            run = self.run
            where = (f"the newest intact checkpoint is iteration {run.last_saved} in "
                     f"{run.checkpointer.directory}" if run.last_saved is not None
                     else "no checkpoint was written")
            raise iterating.NonFiniteError(
                f"{err}; {where}. Lower --lr_img or check the data, then start over with "
                f"--restart (or use another --workdir)") from None


def _condense_and_evaluate(config, dataset, real, eng, workdir, mesh, restart, quiet,
                           main_host, validation):
    if restart:       # only once everything that can fail before the first iteration passed
        moved = workdir_lib.set_aside(workdir) if main_host else None
        sharding.sync_hosts("idm_jax: previous run set aside")   # others wait for host 0
        if moved:
            print(f"restart: the previous run was moved to {moved}")
    if eng.policy.announcement():
        print(eng.policy.announcement())
    run = _Session(config, dataset, real, eng, workdir, main_host,
                   checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                           keep=config.keep_checkpoints),
                   checkpoint.data_meta(real, methods.provenance(config.method)),
                   validation=validation, quiet=quiet)
    try:
        state, sessions = _resume(run, mesh)
        start_it = int(state.iteration)
        run.log = outputs.MetricsLog(os.path.join(workdir, "metrics.jsonl") if main_host
                                     else os.devnull)
        state, condense_seconds = _iterate(run, state, mesh, quiet)
    except BaseException:
        if run.log is not None:
            run.log.close()
        run.checkpointer.close()
        raise
    run.checkpointer.close()
    return _final_results(run, state, start_it, sessions, condense_seconds)


def _resume(run: _Session, mesh):
    """Phase 1: the newest intact checkpoint (or a fresh state), and the session's records.
    Returns (state, the sessions recorded so far)."""
    config = run.config
    state = engine.init_state(run.eng, run.real, config.seed)
    if mesh is not None:  # also the restore template: checkpoints restore straight sharded
        state = engine.shard_state(state, mesh)
    restored, run.last_saved = run.checkpointer.restore_latest(state, config, run.meta)
    if restored is not None:
        state = restored
        print(f"resuming from iteration {run.last_saved} ({run.checkpointer.directory})")
    sessions = []
    if run.main_host:
        start_it = int(state.iteration)
        workdir_lib.trim_metrics(run.workdir, start_it)
        sessions = workdir_lib.record_session(run.workdir, config.to_dict(), start_it)
        checkpoint.dump_json(os.path.join(run.workdir, "config.json"),
                             dict(config.to_dict(), **{"data": run.meta}))
    return state, sessions


def _iterate(run: _Session, state, mesh, quiet: bool):
    """Phase 2: the iterations, metrics fetched in windows of ``log_every``, checkpoints,
    evaluations, stop signals. Returns (final state, seconds spent condensing in this session)."""
    config = run.config
    log_every = window_lib.log_window(config, run.eng.policy.platform)
    if config.record_grad_norms and int(state.iteration) == 0 and config.iterations > 0:
        norms = engine.first_pass_gradient_norms(run.eng, run.real, state, mesh)
        if run.main_host:
            checkpoint.dump_json(os.path.join(run.workdir, GRAD_NORMS_FILE), norms)
    step = engine.make_step(run.eng, run.real, mesh=mesh)
    progress = outputs.progress_bar(config, int(state.iteration), quiet or not run.main_host)
    written = _RunLog(run, progress)
    window = window_lib.MetricsWindow(written)
    last_plot = time.perf_counter()
    try:
        with StopRequest() as interrupt:
            for it, state, metrics in iterating.iterate(run.eng, run.real, state, step=step):
                window.add(it - 1, metrics)
                done = it >= config.iterations
                save = done or it % config.checkpoint_every == 0
                evaluate_now = bool(config.eval_every) and it % config.eval_every == 0 and not done
                # Where to flush must not depend on this host alone (any_host below is a
                # collective): with several hosts a signal waits for the next regular flush.
                stop_here = interrupt.requested and jax.process_count() == 1
                if not (save or evaluate_now or done or len(window) >= log_every
                        or stop_here):
                    continue
                written.moved(window.flush())
                # All hosts stop at the same iteration even if the signal reached only some of them.
                stop = sharding.any_host(interrupt.requested)
                if stop or save:
                    run.last_saved = run.checkpointer.save(state, config, run.meta)
                    # A picture of the run so far, at most once a minute (for long runs).
                    if run.main_host and time.perf_counter() - last_plot > 60:
                        outputs.save_metrics_plot(run.workdir)
                        last_plot = time.perf_counter()
                if stop:
                    raise Interrupted(it, run.checkpointer.directory,
                                      interrupt.signum or signal.SIGINT)
                if evaluate_now:
                    run.evaluate(state, it)
        if run.last_saved != int(state.iteration):   # e.g. iterations already reached
            run.checkpointer.save(state, config, run.meta)
    finally:
        if progress is not None:
            progress.close()
    return state, window.seconds


def _final_results(run: _Session, state, start_it: int, sessions: list,
                   condense_seconds: float) -> dict:
    """Phase 3: the exports, the reported evaluation (of the set after ``iterations``
    updates), ``results.json`` and the metrics plot."""
    config = run.config
    it = int(state.iteration)
    images = sharding.to_host(state.images)
    if run.main_host:
        outputs.export_set(run.workdir, images, run.real, config, run.to_pixels,
                           run.dataset.class_names, it)
    try:
        result = run.evaluate(state, it, final=True)
    finally:
        run.log.close()
    provenance = {k: v for k, v in run.meta.items() if k.startswith("method_")}
    results = {
        "dataset": config.dataset, "ipc": config.ipc, "iterations": it,
        "eval_model": config.eval_model, "accuracies": result["accuracies"],
        "mean": result["mean"], "std": result["std"], "num_eval": config.num_eval,
        "condense_seconds_this_session": condense_seconds,
        "resumed_from_iteration": start_it, "eval_seconds": result["seconds"],
        "device": outputs.device_description(), "processor": outputs.processor(),
        "jax_version": jax.__version__,
        "code_version": outputs.code_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "config": config.to_dict(),
        "method": dict(name=config.method, **provenance), "sessions": sessions}
    if run.validation is not None:
        results["validation"] = dict(run.validation.record(), **result["validation"])
    norms_path = os.path.join(run.workdir, GRAD_NORMS_FILE)
    if config.record_grad_norms and os.path.exists(norms_path):
        with open(norms_path) as f:
            results["grad_norms_it0"] = json.load(f)
    if run.main_host:
        results["condense_seconds"] = outputs.logged_seconds(run.workdir)
        checkpoint.dump_json(os.path.join(run.workdir, "results.json"), results)
        evaluating.discard(run.workdir)
        outputs.save_metrics_plot(run.workdir)
    held_out = ("" if run.validation is None else
                f" (validation {result['validation']['mean']:.2f} +- "
                f"{result['validation']['std']:.2f} %)")
    print(f"[it {it}] final {config.eval_model} accuracy {result['mean']:.2f} +- "
          f"{result['std']:.2f} %{held_out} over {config.num_eval} models; outputs in "
          f"{run.workdir}")
    return results


__all__ = ["Interrupted", "place_real", "prepare_data", "evaluate_images",
           "condense_and_evaluate"]
