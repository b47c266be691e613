"""A pool's pretraining is a resumable job: stopped and continued, it ends where one
uninterrupted job ends; a folder of other settings is refused, a damaged progress is set aside."""

import dataclasses
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from idm_jax import data, pretrain
from idm_jax.runs import failures, pretraining, stop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Digits less 30 held out, batch 256: 5 SGD steps an epoch, one per block; DSA per image, so keys
# matter too.
RECIPE = dataclasses.replace(pretrain.RECIPES["ncfm"], model="ConvNetW32", epochs=2, batch=256)


class StopAfter:
    """A stand-in for ``stop.StopRequest``: the signal 'arrives' during block ``blocks``."""

    def __init__(self, blocks: int):
        self.left, self.signum = blocks, int(signal.SIGTERM)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    @property
    def requested(self) -> bool:      # read once after each block
        self.left -= 1
        return self.left < 0


def job(out, dataset, stop_request=None, seed=0, seen=None):
    return pretraining.pretrain_pool(
        str(out), dataset, "ncfm", RECIPE, 2, seed=seed, validation_per_class=3,
        validation_seed=1, save_every_s=1e9, stop_request=stop_request,
        progress=None if seen is None else lambda done, total: seen.append(done))


def listing(folder):
    return sorted(name for name in os.listdir(folder) if name != ".lock")


def arrays(folder):
    with np.load(os.path.join(folder, "pool.npz")) as stored:
        return {k: stored[k] for k in stored.files}


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits")


@pytest.fixture(scope="module")
def whole(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    meta = job(out, digits)
    return out, meta


def test_a_job_stopped_twice_ends_bit_identical_to_an_uninterrupted_one(digits, whole, tmp_path):
    out = tmp_path / "pool"
    with pytest.raises(stop.Interrupted, match="stopped at step 3"):
        job(out, digits, StopAfter(2))                       # mid first epoch
    assert listing(out) == ["progress.npz"]        # no pool until it is finished
    seen = []
    with pytest.raises(stop.Interrupted, match="stopped at step 9"):
        job(out, digits, StopAfter(5), seen=seen)       # into the second epoch (steps 6 to 10)
    assert seen == [4, 5, 6, 7, 8, 9]                         # went on from step 3, not from 0
    seen = []
    meta = job(out, digits, seen=seen)
    assert seen == [10]
    assert listing(out) == ["pool.json", "pool.npz"]
    want, got = arrays(whole[0]), arrays(out)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert meta["train_accuracy"] == whole[1]["train_accuracy"]


def test_other_settings_are_refused_and_a_finished_pool_is_kept(digits, whole, tmp_path):
    out = tmp_path / "pool"
    with pytest.raises(stop.Interrupted):
        job(out, digits, StopAfter(0))
    with pytest.raises(failures.UserError, match="progress of a pool .*differs in seed"):
        job(out, digits, seed=1)
    with pytest.raises(failures.UserError, match="holds a pool made .*differs in seed"):
        job(whole[0], digits, seed=1)
    seen, before = [], os.stat(os.path.join(whole[0], "pool.npz")).st_mtime_ns
    assert job(whole[0], digits, seen=seen)["train_accuracy"] == whole[1]["train_accuracy"]
    assert seen == [] and os.stat(os.path.join(whole[0], "pool.npz")).st_mtime_ns == before


def test_a_damaged_progress_is_set_aside_and_the_job_starts_over(digits, whole, tmp_path, capsys):
    out = tmp_path / "pool"
    os.makedirs(out)
    with open(out / "progress.npz", "wb") as f:
        f.write(b"PK\x03\x04 not a whole zip")
    seen = []
    job(out, digits, seen=seen)
    assert seen[0] == 1                                        # from the start
    assert "warning:" in capsys.readouterr().err
    assert listing(out) == ["pool.json", "pool.npz", "progress.npz.damaged"]
    for name, value in arrays(whole[0]).items():
        np.testing.assert_array_equal(arrays(out)[name], value, err_msg=name)


def test_the_command_refuses_a_folder_of_other_settings_with_one_error_line(tmp_path):
    with open(tmp_path / "pool.json", "w") as f:
        json.dump({"recipe": "ncfm", "model": "ConvNet", "dataset": "digits", "num_models": 9},
                  f)
    proc = subprocess.run([sys.executable, "-m", "experiments.pretrain", "--dataset", "digits",
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr
    assert "--out" in errors[0] and "num_models" in errors[0]
