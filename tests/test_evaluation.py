"""The evaluation protocol: schedule, batching, vmapped models, and real learning on digits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

import idm_jax
from idm_jax import evaluation
from idm_jax.accel import backend, ops
from idm_jax import presets


def official_lr_per_epoch(epochs, lr=0.01):
    """The official loop, written out: lr used in each of the epochs 0..epochs."""
    schedule, out = [epochs // 2 + 1], []
    for ep in range(epochs + 1):
        out.append(lr)
        if ep in schedule:
            lr *= 0.1
    return out


@pytest.mark.parametrize("epochs", [0, 1, 2, 4, 7, 300, 1000])
def test_lr_phases_follow_the_official_loop(epochs):
    lrs = official_lr_per_epoch(epochs)
    first, second = evaluation.lr_phases(epochs)
    assert first == sum(1 for v in lrs if v == 0.01)
    assert second == len(lrs) - first
    if epochs == 1000:
        assert (first, second) == (502, 499)


def test_last_partial_batch_is_kept():
    assert evaluation._batch_plan(400, 256) == (2, 512)   # 256 + 144, as the official loader
    assert evaluation._batch_plan(40, 256) == (1, 256)
    assert evaluation._batch_plan(512, 256) == (2, 512)


def digits_split(per_class_train=10, seed=0):
    digits = load_digits()
    x = np.repeat(np.repeat(digits.images / 16.0, 2, axis=1), 2, axis=2)[..., None]  # 16x16x1
    x = ((x - 0.3) / 0.4).astype(np.float32)
    y = digits.target.astype(np.int32)
    rng = np.random.default_rng(seed)
    train = np.concatenate([rng.permutation(np.flatnonzero(y == k))[:per_class_train]
                            for k in range(10)])
    test = np.setdiff1d(np.arange(len(y)), train)
    return x[train], y[train], x[test], y[test]


def test_real_subset_beats_chance_by_a_wide_margin_on_digits():
    train_x, train_y, test_x, test_y = digits_split()
    result = idm_jax.evaluate(jax.random.PRNGKey(0), train_x, train_y, test_x, test_y,
                              model="ConvNetW32", num_models=2, epochs=40, expand=False,
                              num_classes=10)
    assert len(result["accuracies"]) == 2
    assert result["mean"] > 60.0, result          # chance is 10%
    np.testing.assert_allclose(result["std"], np.std(result["accuracies"]))


def test_vmapped_models_equal_one_at_a_time():
    train_x, train_y, test_x, test_y = digits_split(per_class_train=3)
    key = jax.random.PRNGKey(1)
    # Vmapped (accelerator default) and looped (CPU default) models, in chunks (CPU default)
    # or whole batches, against one plain whole-batch program per model.
    # The first two report their progress (model-epochs done, of all), which changes no value.
    seen = {True: [], False: []}
    runs = [idm_jax.evaluate(key, train_x, train_y, test_x[:200], test_y[:200],
                             model="ConvNetW32", num_models=2, epochs=2, expand=True,
                             num_classes=10, test_batch=100, parallel=parallel,
                             microbatch_size=size, progress=None if size == 16 else (
                                 lambda done, of, p=parallel: seen[p].append((done, of))))
            for parallel, size in ((True, 0), (False, -1), (True, 16))]
    # The second model on its own, as a resumed evaluation trains it: what it scored among all.
    second = idm_jax.evaluate(key, train_x, train_y, test_x[:200], test_y[:200],
                              model="ConvNetW32", num_models=2, epochs=2, expand=True,
                              num_classes=10, test_batch=100, parallel=False,
                              microbatch_size=-1, model_indices=[1])
    assert second["accuracies"] == runs[1]["accuracies"][1:]
    # Vmapped, all models advance together; looped, one model's epochs after another's.
    assert seen == {True: [(2, 6), (4, 6), (6, 6)],
                    False: [(d, 6) for d in range(1, 7)]}
    net = idm_jax.get_model("ConvNetW32", 10, in_channels=1)
    ex = idm_jax.partition_expand(jnp.asarray(train_x))
    ey = idm_jax.partition_expand_labels(jnp.asarray(train_y))
    alone = [100.0 * float(jax.jit(lambda k: evaluation.train_and_test(
        k, net, ex, ey, jnp.asarray(test_x[:200]), jnp.asarray(test_y[:200]), epochs=2,
        test_batch=100))(k)) for k in jax.random.split(key, 2)]
    for together in runs:
        np.testing.assert_allclose(together["accuracies"], alone, atol=1e-3)


def test_progress_counts_every_model_epoch_once_and_changes_no_value(monkeypatch, capsys):
    import flax.linen as nn

    class Linear(nn.Module):      # a small model compiles in seconds; the callback is the point
        @nn.compact
        def __call__(self, x, train=False):
            features = x.reshape(x.shape[0], -1)
            return features, nn.Dense(10)(features)

    train_x, train_y, test_x, test_y = digits_split(per_class_train=3)
    keys = jax.random.split(jax.random.PRNGKey(2), 2)
    x, y = jnp.asarray(train_x), jnp.asarray(train_y)
    tx, ty = jnp.asarray(test_x[:100]), jnp.asarray(test_y[:100])
    monkeypatch.setattr(evaluation, "REPORTS", 2)      # 7 epochs: a report every 3, and the last

    def trained(on_epoch, vmapped):
        def one(k):
            return evaluation.train_and_test(k, Linear(), x, y, tx, ty, epochs=6, test_batch=100,
                                             return_variables=True, on_epoch=on_epoch)[1]
        return jax.jit(jax.vmap(one) if vmapped else one)(keys if vmapped else keys[0])

    # One model's own program trains it as its turn among all, one after another, does (how a
    # run's evaluation resumes model by model: runs.evaluating).
    def one(k):
        return evaluation.train_and_test(k, Linear(), x, y, tx, ty, epochs=6, test_batch=100,
                                         return_variables=True)[1]
    among_all = jax.jit(backend.sequential(one))(keys)
    alone = jax.jit(one)(keys[1])
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a[1], b), among_all, alone)
    for vmapped in (False, True):
        ticks = []
        plain, reported = trained(None, vmapped), trained(ticks.append, vmapped)
        # The trained weights, bit for bit: the callback reads the epoch count and nothing else.
        jax.tree_util.tree_map(np.testing.assert_array_equal, plain, reported)
        assert [int(t) for t in ticks] == [3, 6, 7], vmapped     # once for both vmapped models
    # The host side: models one after another add up; vmapped ones count together.
    seen = []
    one_by_one = evaluation._ModelEpochs(lambda d, of: seen.append((d, of)), 2, 7, False)
    together = evaluation._ModelEpochs(lambda d, of: seen.append((d, of)), 2, 7, True)
    for done in (3, 6, 7, 3, 6, 7):
        one_by_one(done)
    together(3), together(7)
    assert seen == [(3, 14), (6, 14), (7, 14), (10, 14), (13, 14), (14, 14), (6, 14), (14, 14)]
    # A display that fails (a closed pipe) turns itself off; the evaluation goes on.
    def closed_pipe(done, of):
        raise BrokenPipeError("stdout closed")
    failing = evaluation._ModelEpochs(closed_pipe, 2, 7, True)
    failing(3), failing(6)
    assert failing.progress is None and "progress display off" in capsys.readouterr().out


def test_batchnorm_model_trains_and_tests_with_running_stats():
    # The running statistics must move away from their initial (0, 1) during training and be
    # what the test pass uses: the trained network beats chance (10 %) by a wide margin, and
    # the same network scored with the initial statistics instead does far worse.
    train_x, train_y, test_x, test_y = digits_split(per_class_train=10)
    # The CPU policy's convolution: XLA's own kernel gradient takes about a second per step here.
    net = idm_jax.get_model("ConvNetBN", 10, in_channels=1, conv_op=ops.conv2d)
    test_x, test_y = jnp.asarray(test_x[:500]), jnp.asarray(test_y[:500])
    accuracy, variables = jax.jit(lambda k: evaluation.train_and_test(
        k, net, jnp.asarray(train_x), jnp.asarray(train_y), test_x, test_y, epochs=8,
        batch_size=32, test_batch=100, return_variables=True))(jax.random.PRNGKey(2))
    stats = variables["batch_stats"]
    means = np.concatenate([np.ravel(v["mean"]) for v in stats.values()])
    variances = np.concatenate([np.ravel(v["var"]) for v in stats.values()])
    assert np.abs(means).max() > 0.05 and np.abs(variances - 1.0).max() > 0.05
    assert float(accuracy) > 0.5, float(accuracy)
    fresh = jax.tree.map(lambda v: v, stats)
    fresh = {layer: {"mean": jnp.zeros_like(v["mean"]), "var": jnp.ones_like(v["var"])}
             for layer, v in fresh.items()}
    _, logits = net.apply({"params": variables["params"], "batch_stats": fresh}, test_x)
    untracked = float(np.mean(np.argmax(np.asarray(logits), -1) == np.asarray(test_y)))
    assert untracked < float(accuracy) - 0.1, (untracked, float(accuracy))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="expected images"):
        idm_jax.evaluate(jax.random.PRNGKey(0), np.zeros((4, 8, 8)), np.zeros(4), None, None)


def test_evaluate_refuses_inputs_that_would_train_or_score_silently_wrong():
    from idm_jax import evaluation as ev
    x, y = np.zeros((4, 8, 8, 1), np.float32), np.array([0, 1, 2, 3])
    tx, ty = np.zeros((6, 8, 8, 1), np.float32), np.arange(6) % 4
    cases = [((x, np.array([0, 1, 2, 4]), tx, ty), "train labels lie in \\[0, 4\\], outside"),
             ((x, y, tx, np.arange(6)), "test labels lie in \\[0, 5\\], outside the 4"),
             ((x, y, tx, ty[:5]), "test images \\(6, 8, 8, 1\\) and labels \\(5,\\)"),
             ((np.full_like(x, np.nan), y, tx, ty), "NaN or infinite"),
             ((x, y + 0.5, tx, ty), "whole class numbers")]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            ev.evaluate_synset(jax.random.PRNGKey(0), *args, num_classes=4, expand=False)


def test_condense_refuses_a_zero_or_non_finite_std_before_any_work():
    from idm_jax import data, iterating
    ds = data.load_dataset("digits")
    config = presets.smoke(presets.get_preset("digits-ipc1"))
    for std in ((0.0,), (float("nan"),)):
        with pytest.raises(ValueError, match="std finite and > 0"):
            iterating.condense(config, ds.train_images, ds.train_labels, mean=ds.mean, std=std)


def test_condense_with_zero_iterations_returns_the_finite_initial_set():
    from idm_jax import config as config_lib, data, iterating
    ds = data.load_dataset("digits")
    config = config_lib.override(presets.smoke(presets.get_preset("digits-ipc1")),
                                 {"iterations": 0})
    synset, state = iterating.condense(config, ds.train_images, ds.train_labels, mean=ds.mean,
                                       std=ds.std)
    assert int(state.iteration) == 0 and np.all(np.isfinite(synset.images))
    assert synset.images.shape == (10, 16, 16, 1)
