"""A run's final evaluation resumes model by model: a stopped evaluation keeps the models it
scored, a later call trains only the others, and the result is the uninterrupted one."""

import dataclasses
import json

import pytest

from idm_jax import data, evaluation, presets
from idm_jax.runs import evaluating, run as run_lib
from idm_jax.runs.stop import Interrupted


class StopBeforeModel:
    """``StopRequest``'s stand-in: a signal arrives while model ``n - 1`` trains."""

    def __init__(self, n: int, **_):
        self.asked, self.n, self.signum = 0, n, 15

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    @property
    def requested(self) -> bool:
        self.asked += 1
        return self.asked > self.n


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

    def spy(*args, model_indices=None, **kwargs):
        trained.append(list(model_indices))
        return original(*args, model_indices=model_indices, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_synset", spy)
    workdir = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        patch.setattr(evaluating, "StopRequest", lambda **_: StopBeforeModel(2))
        with pytest.raises(Interrupted, match="stopped at evaluation model 2"):
            run_lib.condense_and_evaluate(config, digits, str(workdir), quiet=True)
    kept = json.loads((workdir / evaluating.PARTIAL_FILE).read_text())
    assert sorted(kept["models"]) == ["0", "1"] and trained == [[0], [1]]
    assert not (workdir / "results.json").exists()
    resumed = run_lib.condense_and_evaluate(config, digits, str(workdir), quiet=True)
    assert trained == [[0], [1], [2]]                    # only the model left
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
                  evaluating.fingerprint(images, dataclasses.replace(config, lr_net=0.02), 10)):
        assert other != mark and evaluating._kept(str(path), other) == {}
    # Mechanics change no result, so they keep the scores; a damaged record is ignored.
    same = evaluating.fingerprint(images, dataclasses.replace(config, log_every=7), 10)
    assert same == mark
    path.write_text("{not json")
    assert evaluating._kept(str(path), mark) == {}
