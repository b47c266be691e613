"""Tuning: the same number of trials for every method, the choice made on validation accuracy
only, failed settings ranked last, and the test seeds disjoint from the trial seed."""

import json
import math
import os

import numpy as np
import pytest

from idm_jax import data, iterating, methods
from idm_jax.runs import checkpoint, tuning
from idm_jax import presets


def test_every_method_gets_the_same_number_of_trials_spanning_four_decades_of_lr():
    for name in ("idm", "dm", "m3d", "ncfm"):
        config = methods.with_method(presets.get_preset("cifar10-ipc1"), name)
        points = tuning.grid(config)
        assert len(points) == tuning.TRIALS, name
        ratios = sorted({p["lr_img"] / config.lr_img for p in points})
        assert ratios[0] <= 0.01 * 1.0001 and ratios[-1] >= 100 * 0.9999, name
        assert any(math.isclose(r, 1.0) for r in ratios), name      # the default itself
        weight = {"idm": "ce_weight", "ncfm": "calibration_weight"}.get(name)
        if weight:
            assert {p[weight] / getattr(config, weight) for p in points} == {0.2, 1.0}
        else:
            assert all(set(p) == {"lr_img"} for p in points)


def test_choice_reads_validation_only_and_ranks_failures_last():
    trials = [({"lr_img": 1}, {"validation": {"mean": 30.0}, "mean": 99.0}),
              ({"lr_img": 2}, {"failed": "the loss became nan"}),
              ({"lr_img": 3}, {"validation": {"mean": 31.0}, "mean": 10.0}),
              ({"lr_img": 4}, {"validation": {"mean": 31.0}, "mean": 50.0})]
    assert tuning.choose(trials) == 2        # best validation; the first of equals; test unused
    assert tuning.choose(trials, {"lr_img": 4}) == 3     # among equals, the nearest default
    assert tuning.validation_score(trials[1][1]) == -math.inf


def fake_runs(calls):
    """condense_and_evaluate's stand-in: writes a finished run's record whose validation
    accuracy peaks at lr 1 and whose test accuracy peaks elsewhere; blows up above lr 1000."""
    def condense_and_evaluate(config, dataset, workdir, quiet=False):
        calls.append((config.lr_img, config.seed))
        if config.lr_img > 1e3:
            raise iterating.NonFiniteError("the loss became nan at iteration 0")
        validation = 40.0 - abs(math.log10(config.lr_img))
        results = {"accuracies": [30.0 + config.seed, 32.0], "mean": 31.0 + config.seed / 2,
                   "config": config.to_dict(),
                   "validation": {"mean": validation, "std": 0.0, "accuracies": [validation]},
                   "grad_norms_it0": {"loss": 2.0, "mmd": 2.0}}
        os.makedirs(workdir, exist_ok=True)
        checkpoint.dump_json(os.path.join(workdir, "results.json"), results)
        return results
    return condense_and_evaluate


def test_a_tuning_runs_its_grid_records_a_blow_up_and_reports_fresh_seeds(tmp_path, monkeypatch):
    from idm_jax.runs import run as run_lib

    dataset = data.load_dataset("digits")
    calls = []
    monkeypatch.setattr(run_lib, "condense_and_evaluate", fake_runs(calls))
    monkeypatch.setattr(tuning, "grid", lambda c: [{"lr_img": c.lr_img * f}
                                                   for f in (0.1, 1.0, 1e6)])
    with pytest.raises(ValueError, match="include the trial seed 5"):
        tuning.run_tuning(dataset, "dm", str(tmp_path), trial_seed=5, test_seeds=(5,),
                          together=False)
    summary = tuning.run_tuning(dataset, "dm", str(tmp_path), validation_per_class=5,
                                trial_seed=5, test_seeds=(0, 1), quiet=True,
                                together=False)
    assert calls == [(0.1, 5), (1.0, 5), (1e6, 5), (1.0, 0), (1.0, 1)]
    assert [bool(row["failed"]) for row in summary["grid"]] == [False, False, True]
    assert summary["chosen"] == {"lr_img": 1.0}          # DM's default: the best validation
    assert summary["test"]["models"] == 4 and summary["test"]["seed_means"] == [31.0, 31.5]
    table = open(tmp_path / "dm" / "tuning.md").read()
    assert "lr_img 1 (chosen)" in table and "failed (not finite)" in table
    assert "loss 2 / mmd 2" in table
    assert (tmp_path / "dm" / "tuning.png").stat().st_size > 0        # the grid's picture
    # Re-running reads every record, the failure too, and runs nothing.
    calls.clear()
    again = tuning.run_tuning(dataset, "dm", str(tmp_path), validation_per_class=5,
                              trial_seed=5, test_seeds=(0, 1), quiet=True,
                                together=False)
    assert calls == [] and again["chosen"] == summary["chosen"]
    assert again["test"] == summary["test"]


def test_tuned_methods_are_tabled_side_by_side_from_their_records(tmp_path, monkeypatch,
                                                                 capsys):
    from experiments import tune
    from idm_jax.runs import run as run_lib

    dataset = data.load_dataset("digits")
    monkeypatch.setattr(run_lib, "condense_and_evaluate", fake_runs([]))
    monkeypatch.setattr(tuning, "grid", lambda c: [{"lr_img": c.lr_img * f} for f in (0.1, 1.0)])
    for method, seeds in (("dm", (0, 1)), ("m3d", (0,)), ("idm", (0, 1)), ("iid", (0, 1)),
                          ("ncfm", (0, 1))):
        tuning.run_tuning(dataset, method, str(tmp_path), validation_per_class=5, trial_seed=5,
                          test_seeds=seeds, quiet=True, together=False)

    def edit(method, seed, change):
        record = tmp_path / method / "chosen" / f"seed{seed}" / "results.json"
        results = json.loads(record.read_text())
        change(results["config"])
        record.write_text(json.dumps(results))

    # idm's seed-1 run is of another setting (its choice changed since), iid's of other
    # iterations than its seed 0: neither is finished. ncfm's seed 1 stopped being finite.
    edit("idm", 1, lambda c: c.update(lr_img=c["lr_img"] * 10))
    edit("iid", 1, lambda c: c.update(iterations=c["iterations"] + 1))
    failed_run = tmp_path / "ncfm" / "chosen" / "seed1"
    ran = json.loads((failed_run / "results.json").read_text())["config"]
    (failed_run / "results.json").unlink()
    (failed_run / "failed.json").write_text(
        json.dumps({"failed": "the loss became nan at iteration 3", "config": ran}))
    capsys.readouterr()
    table = tune.main(["--compare", "idm,m3d,dm,iid,ncfm", "--workdir", str(tmp_path)])
    # The fake runs score [30 + seed, 32] on test and their validation peaks at the default lr.
    dm_test, m3d_test = [30.0, 32.0, 31.0, 32.0], [30.0, 32.0]
    assert [row["variant"] for row in table] == ["dm", "m3d"]          # best test mean first
    assert table[0]["mean"] == pytest.approx(np.mean(dm_test))
    assert table[0]["std"] == pytest.approx(np.std(dm_test))
    assert table[1]["mean"] == pytest.approx(np.mean(m3d_test)) and table[1]["seeds"] == 1
    assert table[0]["chosen"] == {"lr_img": methods.with_method(
        presets.get_preset("digits-ipc1"), "dm").lr_img}
    assert table[0]["trial_validation"] == pytest.approx(40.0)
    text = (tmp_path / "comparison.md").read_text()
    assert "Not finished, so not in the table: idm, iid." in text
    assert "ncfm (seed 1: the loss became nan at iteration 3)" in text
    assert "-0.25 / 1.00 = -0.2" in text
    assert (tmp_path / "comparison.png").stat().st_size > 0
    assert "| 1 | `dm` |" in capsys.readouterr().out
    # Tunings of another IPC are not tabled beside these.
    edit("m3d", 0, lambda c: None)
    record = tmp_path / "m3d" / "chosen" / "seed0" / "results.json"
    results = json.loads(record.read_text())
    record.write_text(json.dumps(dict(results, dataset="cifar10", ipc=10)))
    with pytest.raises(SystemExit):
        tune.main(["--compare", "m3d,dm", "--workdir", str(tmp_path)])
    assert "different datasets or IPCs" in capsys.readouterr().err
    # Nothing finished among the methods named: one error line.
    with pytest.raises(SystemExit) as stopped:
        tune.main(["--compare", "idm", "--workdir", str(tmp_path)])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "idm" in err[0]
