"""The validation split: held out of everything the condensation sees, stable under its seed,
recorded with the run, and scored by the evaluation on the same trained models."""

import numpy as np
import pytest

import jax

from idm_jax import config as config_lib, data, evaluation
from idm_jax.runs import run
from idm_jax import presets


def numbered_dataset(num_classes=3, per_class=7):
    """Every training image is unique: its row number is written in its first pixels."""
    n = num_classes * per_class
    labels = np.tile(np.arange(num_classes), per_class).astype(np.int32)
    images = np.zeros((n, 8, 8, 1), np.uint8)
    images[:, 0, 0, 0], images[:, 0, 1, 0] = np.arange(n) % 256, np.arange(n) // 256
    return data.Dataset("numbered", images, labels, images[:4], labels[:4], num_classes,
                        [str(k) for k in range(num_classes)], (0.5,), (0.25,))


def test_split_holds_out_per_class_images_disjointly_and_stably():
    dataset = numbered_dataset()
    train, split = data.split_validation(dataset, 2, seed=5)
    number = lambda x: (x[:, 0, 0, 0].astype(int) + 256 * x[:, 0, 1, 0].astype(int)).tolist()
    held, kept = set(number(split.images)), set(number(train.train_images))
    assert held == set(split.indices.tolist()) and not held & kept
    assert held | kept == set(number(dataset.train_images))
    np.testing.assert_array_equal(np.bincount(split.labels), [2, 2, 2])
    np.testing.assert_array_equal(train.class_counts, [5, 5, 5])
    np.testing.assert_array_equal(split.labels, dataset.train_labels[split.indices])
    # The same seed, the same split; another seed, another; per_class 0, no split.
    again = data.split_validation(dataset, 2, seed=5)[1]
    np.testing.assert_array_equal(again.indices, split.indices)
    assert again.record() == split.record() and split.record()["images"] == 6
    other = data.split_validation(dataset, 2, seed=6)[1]
    assert not np.array_equal(other.indices, split.indices)
    assert data.split_validation(dataset, 0) == (dataset, None)
    with pytest.raises(ValueError, match="--validation_per_class 7: class 0 .* would keep none"):
        data.split_validation(dataset, 7)


def test_a_run_condenses_without_the_held_out_images_and_scores_the_same_models_on_them(
        tmp_path, monkeypatch):
    dataset = data.load_dataset("digits")
    config = config_lib.override(presets.smoke(presets.get_preset("digits-ipc1")), {
        "iterations": 1, "num_eval": 2, "epoch_eval_train": 1, "validation_per_class": 10,
        "model_train_steps": 0,
        "validation_seed": 3, "exports": "npz"})
    seen = []
    original = run.place_real
    monkeypatch.setattr(run, "place_real", lambda d, mesh: seen.append(d) or original(d, mesh))
    results = run.condense_and_evaluate(config, dataset, str(tmp_path / "run"), quiet=True)
    _, split = data.split_validation(dataset, 10, 3)
    # The condensation's real data is the training set without the held-out rows.
    np.testing.assert_array_equal(seen[0].class_counts, dataset.class_counts - 10)
    flat = lambda x: {img.tobytes() for img in x}
    assert not flat(seen[0].train_images) & flat(split.images)
    record = results["validation"]
    assert {k: record[k] for k in ("per_class", "seed", "images", "indices_sha256")} == \
        split.record()
    assert len(record["accuracies"]) == 2 and np.isclose(record["mean"],
                                                         np.mean(record["accuracies"]))


def test_evaluation_scores_the_very_models_of_the_test_set_on_the_validation_images():
    # With the test set itself as the validation set, the two columns are the same numbers:
    # the same trained models are scored on both.
    rng = np.random.default_rng(0)
    images = rng.normal(size=(8, 8, 8, 1)).astype(np.float32)
    labels = np.repeat(np.arange(4), 2)
    test_x, test_y = rng.normal(size=(12, 8, 8, 1)).astype(np.float32), rng.integers(0, 4, 12)
    both = evaluation.evaluate_synset(jax.random.PRNGKey(1), images, labels, test_x, test_y,
                                      validation=(test_x[::-1], test_y[::-1]), model="ConvNetW32",
                                      num_classes=4, num_models=3, epochs=3, batch_size=4,
                                      expand=False)
    np.testing.assert_allclose(both["validation"]["accuracies"], both["accuracies"])
