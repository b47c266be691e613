"""A run's final evaluation resumes model by model: a stopped evaluation keeps the models it
scored, a later call trains only the others, and the result is the uninterrupted one."""

import dataclasses
import json

import pytest

from idm_jax import data, evaluation, presets
from idm_jax.accel import backend
from idm_jax.runs import evaluating, run as run_lib


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits")


def test_a_stopped_evaluation_resumes_with_the_models_left(digits, tmp_path, monkeypatch):
    config = dataclasses.replace(presets.smoke(presets.get_preset("digits-ipc1")), num_eval=3,
                                 epoch_eval_train=2, exports="npz", validation_per_class=3)
    uninterrupted = run_lib.condense_and_evaluate(config, digits, str(tmp_path / "whole"),
                                                  quiet=True)
    trained = []
    original = evaluation.evaluate_synset

    def spy(*args, model_indices=None, **kwargs):        # Ctrl-C while model 2 trains
        trained.append(list(model_indices))
        if model_indices == [2] and len(trained) == 3:
            raise KeyboardInterrupt
        return original(*args, model_indices=model_indices, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_synset", spy)
    workdir = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        run_lib.condense_and_evaluate(config, digits, str(workdir), quiet=True)
    kept = json.loads((workdir / evaluating.PARTIAL_FILE).read_text())
    assert sorted(kept["models"]) == ["0", "1"] and trained == [[0], [1], [2]]
    assert not (workdir / "results.json").exists()
    resumed = run_lib.condense_and_evaluate(config, digits, str(workdir), quiet=True)
    assert trained == [[0], [1], [2], [2]]               # only the model left
    for field in ("accuracies", "mean", "std", "validation"):
        assert resumed[field] == uninterrupted[field], field
    assert not (workdir / evaluating.PARTIAL_FILE).exists()


def test_kept_scores_of_other_images_or_settings_are_not_reused(digits, tmp_path):
    images = digits.train_images[:10].astype("float32")
    config = presets.get_preset("digits-ipc1")
    mark = evaluating.fingerprint(images, config, 10)
    path = tmp_path / evaluating.PARTIAL_FILE
    path.write_text(json.dumps(dict(mark, models={"0": {"test": 50.0, "seconds": 1.0,
                                                        "validation": None}})))
    assert evaluating._kept(str(path), mark) == {0: {"test": 50.0, "seconds": 1.0,
                                                     "validation": None}}
    for other in (evaluating.fingerprint(images + 1e-3, config, 10),
                  evaluating.fingerprint(images, config, 11),
                  evaluating.fingerprint(images, dataclasses.replace(config, lr_net=0.02), 10),
                  evaluating.fingerprint(images, config, 10, test=(images[:2],)),
                  evaluating.fingerprint(images, config, 10, policy=backend.resolve(0))):
        assert other != mark and evaluating._kept(str(path), other) == {}
    # Mechanics change no result, so they keep the scores; a damaged record is ignored.
    same = evaluating.fingerprint(images, dataclasses.replace(config, log_every=7), 10)
    assert same == mark
    path.write_text("{not json")
    assert evaluating._kept(str(path), mark) == {}
