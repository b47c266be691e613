"""A grid of settings condensed together (sharing one extractor schedule) gives each setting
the very state, and so the results, of its own separate run."""

import dataclasses
import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idm_jax import data, engine as engine_lib, grid, presets
from idm_jax.runs import grid_run, tuning
from idm_jax.runs.stop import Interrupted

# The CPU protocol shrunk to seconds on digits, with IDM's CE term on (the digits preset has it
# off) so that the grid varies both settings a tuning varies.
SMALL = dict(iterations=6, batch_real=16, trained_bs=32, model_train_steps=2, net_num=4,
             initial_models=2, num_eval=1, epoch_eval_train=2, batch_train=64,
             model="ConvNetW32", eval_model="ConvNetW32", checkpoint_every=3, syn_ce=True,
             ce_weight=0.5, exports="npz", log_every=2)
POINTS = [{"lr_img": 1.0, "ce_weight": 1.0}, {"lr_img": 10.0, "ce_weight": 0.2}]   # factors


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits")


def test_only_the_image_update_settings_may_differ():
    base = dataclasses.replace(presets.get_preset("cifar10-ipc1"), eval_every=0)
    grid.check_shareable([base, dataclasses.replace(base, lr_img=1.0, ce_weight=2.0)])
    for field, value in (("seed", 1), ("partition_factor", 4), ("net_generate_interval", 7),
                         ("calibration_weight", 0.5), ("eval_every", 50)):
        with pytest.raises(ValueError, match=field):
            grid.check_shareable([base, dataclasses.replace(base, **{field: value})])


def test_states_of_other_iterations_are_not_stacked_into_a_grid():
    state = engine_lib.CondenseState(images=jnp.ones((2, 3)), image_opt_state=(jnp.ones((2, 3)),),
                                     extractors=(), key=np.zeros(2, np.uint32),
                                     iteration=np.int32(4))
    stacked = grid.stack_trials([state, state.replace(images=jnp.zeros((2, 3)))])
    np.testing.assert_array_equal(grid.trial_state(stacked, 1).images, np.zeros((2, 3)))
    for other in (state.replace(iteration=np.int32(5)), state.replace(key=np.ones(2, np.uint32))):
        with pytest.raises(ValueError, match="one iteration of one seed"):
            grid.stack_trials([state, other])


def test_settings_own_checkpoints_of_different_extractors_are_not_stacked(monkeypatch, capsys):
    """Resuming a grid from its settings' own checkpoints requires one extractor schedule:
    with the extractors' arrays equal the states are stacked, with one array differing the grid
    starts over and says why."""
    from idm_jax.runs import checkpoint

    def state(extractor_value):
        return engine_lib.CondenseState(
            images=jnp.ones((2, 3)), image_opt_state=(jnp.ones((2, 3)),),
            extractors={"w": jnp.full((4,), extractor_value)}, key=np.zeros(2, np.uint32),
            iteration=np.int32(3))

    saved = {}

    class OwnCheckpoints:          # each setting's folder restores the state saved for it
        def __init__(self, directory, keep):
            self.directory = directory

        def restore_latest(self, template, config, meta):
            return saved[os.path.dirname(self.directory)], None

        def close(self):
            pass

    monkeypatch.setattr(grid_run, "_own_latest", lambda directory: 3)
    monkeypatch.setattr(checkpoint, "Checkpointer", OwnCheckpoints)
    engines = [type("Engine", (), {"config": presets.get_preset("digits-ipc1")})()] * 2
    fresh = grid.stack_trials([state(0.0), state(0.0)])
    saved.update(a=state(1.0), b=state(1.0))
    stacked = grid_run._from_own_checkpoints(engines, ["a", "b"], {}, fresh)
    np.testing.assert_array_equal(grid.trial_state(stacked, 1).extractors["w"], np.ones(4))
    assert "resuming the grid from its settings' own checkpoints at iteration 3" in \
        capsys.readouterr().out
    saved.update(b=state(2.0))
    assert grid_run._from_own_checkpoints(engines, ["a", "b"], {}, fresh) is None
    assert "hold different extractors or iterations" in capsys.readouterr().out


class StopAfter:
    """``StopRequest``'s stand-in: asked once per iteration, it answers yes at the ``n``-th."""

    def __init__(self, n: int):
        self.asked, self.n, self.signum = 0, n, int(signal.SIGTERM)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    @property
    def requested(self) -> bool:
        self.asked += 1
        return self.asked >= self.n


def test_a_tuning_condensed_together_and_stopped_once_matches_a_separate_run(
        digits, tmp_path, monkeypatch):
    from idm_jax.runs import run as run_lib

    monkeypatch.setattr(tuning, "grid", lambda c: [{k: getattr(c, k) * f for k, f in p.items()}
                                                   for p in POINTS])
    common = dict(validation_per_class=5, trial_seed=5, test_seeds=(), quiet=True)
    # A tuning at 3 iterations, raised to 6: the grid starts from its settings' own
    # checkpoints at 3, is stopped at 5 and resumes from its own checkpoint.
    tuning.run_tuning(digits, "idm", str(tmp_path), overrides=dict(SMALL, iterations=3),
                      **common)
    with monkeypatch.context() as patch:
        patch.setattr(grid_run, "StopRequest", lambda: StopAfter(2))
        with pytest.raises(Interrupted, match="stopped at iteration 5"):
            tuning.run_tuning(digits, "idm", str(tmp_path), overrides=SMALL, **common)
    summary = tuning.run_tuning(digits, "idm", str(tmp_path), overrides=SMALL, **common)
    root = tmp_path / "idm"
    for row in summary["grid"]:
        run = root / tuning.trial_name(row["setting"]) / "seed5"
        sessions = [json.loads(line)["from_iteration"] for line in open(run / "sessions.jsonl")]
        # The grid, the evaluation at 3, the grid from the settings' checkpoints, the grid
        # resumed, the evaluation at 6.
        assert sessions == [0, 3, 3, 5, 6]
        assert (run / grid_run.GRID_FILE).exists()
        logged = [json.loads(line)["iteration"] for line in open(run / "metrics.jsonl")
                  if "event" not in json.loads(line)]
        assert logged == list(range(6))       # each iteration logged once
    assert not os.path.exists(root / "grid-seed5" / "checkpoints")
    # The second setting run on its own: the same images and evaluation, to the last bit.
    config = tuning.study.budget_config("digits", "cpu", 1, dict(SMALL, validation_per_class=5),
                                        "idm")
    setting = summary["grid"][1]["setting"]
    config = dataclasses.replace(config, seed=5, **setting)
    alone = run_lib.condense_and_evaluate(config, digits, str(tmp_path / "alone"), quiet=True)
    run = root / tuning.trial_name(setting) / "seed5"
    together = json.load(open(run / "results.json"))
    for field in ("accuracies", "validation", "grad_norms_it0"):
        assert together[field] == alone[field], field
    def images(folder):
        with np.load(folder / "synthetic.npz") as stored:
            return stored["images"]

    np.testing.assert_array_equal(images(run), images(tmp_path / "alone"))
    first = root / tuning.trial_name(summary["grid"][0]["setting"]) / "seed5"
    assert not np.array_equal(images(first), images(run))       # two settings, two sets


def test_a_setting_that_stops_being_finite_is_recorded_failed_and_set_aside(tmp_path):
    base = presets.get_preset("digits-ipc1")
    configs = [base, dataclasses.replace(base, lr_img=1e3)]
    directories = [str(tmp_path / "a"), str(tmp_path / "b")]
    for directory in directories:
        os.makedirs(directory)
    logs = grid_run._start_trials(configs, directories, {}, 0, str(tmp_path / "grid"))
    metrics = {"loss": np.array([1.0, np.nan]), "images_finite": np.array([1.0, 1.0]),
               "queue_size": np.float32(3)}
    failed = {}
    grid_run._log_iteration(configs, directories, logs, metrics, 4, 2.0, failed)
    for log in logs:
        log.close()
    assert list(failed) == [1] and "iteration 4" in failed[1]
    record = json.load(open(tmp_path / "b" / tuning.FAILED_FILE))
    assert record["config"] == configs[1].to_dict()
    # Deterministic: a failure within N iterations holds for more, not for fewer or other settings.
    more, fewer = (dataclasses.replace(configs[1], iterations=configs[1].iterations + k)
                   for k in (10, -1))
    assert grid_run.failed_record(more, directories[1]) == record
    assert grid_run.failed_record(fewer, directories[1]) is None
    assert grid_run.failed_record(dataclasses.replace(more, lr_img=1.0), directories[1]) is None
    line = json.loads(open(tmp_path / "a" / "metrics.jsonl").read())
    assert (line["loss"], line["seconds"], line["queue_size"]) == (1.0, 1.0, 3.0)
    state = engine_lib.CondenseState(images=jnp.ones((2, 3)), image_opt_state=(jnp.ones((2, 3)),),
                                     extractors=(), key=np.zeros(2, np.uint32),
                                     iteration=np.int32(4))
    state = grid_run._set_aside_failed(state, failed)
    np.testing.assert_array_equal(state.images, [[1, 1, 1], [0, 0, 0]])
    np.testing.assert_array_equal(state.image_opt_state[0], [[1, 1, 1], [0, 0, 0]])


def test_a_grid_keeps_its_members_and_leaves_a_folder_of_other_settings_alone(tmp_path):
    base = dataclasses.replace(presets.get_preset("digits-ipc1"), eval_every=0)
    configs = [dataclasses.replace(base, lr_img=base.lr_img * f) for f in (1, 10, 100)]
    folders = [str(tmp_path / name) for name in ("a", "b", "c")]
    grid_dir = tmp_path / "grid"
    for folder in folders:
        os.makedirs(folder)
    assert grid_run.members(configs, folders, str(grid_dir)) == [0, 1, 2]
    # b failed, c holds a run of another seed: a new grid takes a alone (so none is run).
    with open(os.path.join(folders[1], tuning.FAILED_FILE), "w") as f:
        json.dump({"failed": "nan", "config": configs[1].to_dict()}, f)
    with open(os.path.join(folders[2], "config.json"), "w") as f:
        json.dump(dataclasses.replace(configs[2], seed=9).to_dict(), f)
    assert grid_run.members(configs, folders, str(grid_dir)) == [0]
    # An unfinished grid of a, b and c keeps all three, so its checkpoints still fit.
    os.makedirs(grid_dir / "checkpoints")
    with open(grid_dir / grid_run.MEMBERS_FILE, "w") as f:
        json.dump(folders, f)
    assert grid_run.members(configs, folders, str(grid_dir)) == [0, 1, 2]
    # Without that grid: settings condensed before to one iteration join a grid together; when
    # their own runs stopped at different iterations, only those not begun do.
    shutil.rmtree(grid_dir)
    os.remove(os.path.join(folders[1], tuning.FAILED_FILE))
    os.remove(os.path.join(folders[2], "config.json"))
    for folder in folders:
        os.makedirs(os.path.join(folder, "checkpoints", "3"))
    assert grid_run.members(configs, folders, str(grid_dir)) == [0, 1, 2]
    os.makedirs(os.path.join(folders[1], "checkpoints", "5"))
    shutil.rmtree(os.path.join(folders[2], "checkpoints"))
    assert grid_run.members(configs, folders, str(grid_dir)) == [2]


def test_a_grid_fetches_metrics_in_windows_timed_once_they_arrive(tmp_path, monkeypatch):
    """The loop with a stand-in step: metrics fetched every ``log_every`` iterations (and at the
    save), each line timed after its window's fetch, a NaN caught in its window."""
    import time
    import types

    from idm_jax.runs import outputs

    base = dataclasses.replace(presets.get_preset("digits-ipc1"), iterations=5, eval_every=0,
                               checkpoint_every=100, log_every=2)
    configs = [base, dataclasses.replace(base, lr_img=base.lr_img * 10)]
    directories = [str(tmp_path / name) for name in ("a", "b")]
    for directory in directories:
        os.makedirs(directory)
    logs = [outputs.MetricsLog(os.path.join(d, "metrics.jsonl")) for d in directories]

    def step(state, real):      # returns at once; setting b's loss is NaN from iteration 3
        it = int(state.iteration)
        return state.replace(iteration=state.iteration + 1), {
            "loss": np.array([1.0, np.nan if it >= 3 else 2.0]), "images_finite": np.ones(2)}

    fetches = []

    def slow_fetch(tree):       # the device's work arrives with the fetch
        fetches.append(len(tree))
        time.sleep(0.05 * len(tree))
        return tree

    saved = []
    saver = types.SimpleNamespace(directory=str(tmp_path / "grid"),
                                  save=lambda state, *_: saved.append(int(state.iteration)))
    monkeypatch.setattr(grid, "make_grid_step", lambda engines, real: step)
    monkeypatch.setattr(grid_run.jax, "device_get", slow_fetch)
    engines = [types.SimpleNamespace(policy=types.SimpleNamespace(platform="cpu"))] * 2
    state = engine_lib.CondenseState(images=jnp.ones((2, 3)), image_opt_state=(jnp.ones((2, 3)),),
                                     extractors=(), key=np.zeros(2, np.uint32),
                                     iteration=np.int32(0))
    failed = {}
    state = grid_run._iterate(configs, directories, engines, None, state, logs, saver, {},
                              failed, quiet=True)
    for log in logs:
        log.close()
    assert fetches == [2, 2, 1] and saved == [5]
    assert list(failed) == [1] and "iteration 3" in failed[1]
    np.testing.assert_array_equal(state.images[1], 0)
    for directory, last in zip(directories, (4, 3)):
        lines = [json.loads(line) for line in open(os.path.join(directory, "metrics.jsonl"))]
        assert [line["iteration"] for line in lines] == list(range(last + 1))
        # 0.05 s per iteration fetched, shared by the 2 settings.
        assert all(line["seconds"] >= 0.02 for line in lines), lines


@pytest.mark.parametrize("method", ["ncfm", "iid", "m3d"])
def test_methods_with_other_extractor_schedules_condense_in_a_grid_as_alone(digits, tmp_path,
                                                                          method):
    """NCFM (its interpolated pool and calibration weight), IID (its auxiliary pool) and M3D (a
    fresh random extractor every 5 iterations, as DM's every 1) draw their networks from the
    schedule the grid shares: each setting ends with its own run's images to the last bit."""
    from idm_jax import engine as engine_lib, methods, pretrain
    from idm_jax.runs import run as run_lib

    _, split = data.split_validation(digits, 3, 0)
    net = engine_lib.make_engine(presets.smoke(presets.get_preset("digits-ipc1")), 10,
                                 (16, 16, 1))
    trained = jax.vmap(net.init_params)(jax.random.split(jax.random.PRNGKey(3), 2))
    pretrain.save_pool(tmp_path / "pool", {"init": trained, "trained": trained,
                                           "train_accuracy": [0.0, 0.0]},
                       {"model": "ConvNetW32", "dataset": "digits",
                        "validation": split.record()})
    pool = dict(pool_dir=str(tmp_path / "pool"), syn_ce=True)    # digits: CE off by default
    extra = {"ncfm": dict(pool, cf_frequencies=64, iterations=2),
             "iid": dict(pool, auxiliary_model="ConvNetW32", iterations=2),
             "m3d": dict(iterations=6)}[method]     # a second fresh extractor at iteration 5
    base = dataclasses.replace(
        presets.smoke(methods.with_method(presets.get_preset("digits-ipc1"), method)),
        batch_real=8, num_eval=1, epoch_eval_train=1, validation_per_class=3, exports="npz",
        **extra)
    points = tuning.grid(base)[4:6]        # two learning rates (and NCFM's two weights)
    configs = [dataclasses.replace(base, **point) for point in points]
    directories = [str(tmp_path / str(i)) for i in range(2)]
    grid_run.condense_grid(configs, digits, directories, str(tmp_path / "grid"), quiet=True)
    together = run_lib.condense_and_evaluate(configs[1], digits, directories[1], quiet=True)
    sessions = [json.loads(line)["from_iteration"]
                for line in open(tmp_path / "1" / "sessions.jsonl")]
    assert sessions == [0, base.iterations]   # condensed by the grid, evaluated by the run
    alone = run_lib.condense_and_evaluate(configs[1], digits, str(tmp_path / "alone"),
                                          quiet=True)
    assert together["accuracies"] == alone["accuracies"]
    with np.load(tmp_path / "1" / "synthetic.npz") as a, \
            np.load(tmp_path / "alone" / "synthetic.npz") as b:
        np.testing.assert_array_equal(a["images"], b["images"])
