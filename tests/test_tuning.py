"""Tuning: the same number of trials for every method, the choice made on validation accuracy
only, failed settings ranked last, and the test seeds disjoint from the trial seed."""

import dataclasses
import json
import math
import os
import shutil

import numpy as np
import pytest

from idm_jax import data, iterating, methods
from idm_jax.config import Config
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


def test_the_terms_a_method_weighs_zero_are_named_from_its_config():
    from idm_jax.runs import tuning_report

    base = presets.get_preset("cifar10-ipc1")
    off = {name: tuning_report.terms_off(methods.with_method(base, name).to_dict())
           for name in ("idm", "iid", "dm", "m3d", "ncfm")}
    assert off == {"idm": [], "iid": [], "dm": ["ce"], "m3d": ["ce"], "ncfm": ["ce"]}
    ce_only = dataclasses.replace(base, match_weight=0.0).to_dict()
    assert tuning_report.terms_off(ce_only) == ["mmd"]
    assert tuning_report.terms_off(dataclasses.replace(base, ce_weight=0.0).to_dict()) == ["ce"]
    text = tuning_report.norms_text({"loss": 3.0, "mmd": 3.0, "ce": 0.25, "ce_scale": 0.0},
                                    ["ce"])
    assert text == "ce 0.25 (not in the loss) / loss 3 / mmd 3"


def fake_runs(calls, peak=1.0):
    """condense_and_evaluate's stand-in: writes a finished run's record whose validation
    accuracy peaks at lr ``peak`` and whose test accuracy peaks elsewhere; blows up above lr
    1000 (unless the peak is beyond)."""
    def condense_and_evaluate(config, dataset, workdir, quiet=False):
        calls.append((config.lr_img, config.seed))
        if config.lr_img > max(1e3, peak):
            raise iterating.NonFiniteError("the loss became nan at iteration 0")
        validation = 40.0 - abs(math.log10(config.lr_img / peak))
        results = {"accuracies": [30.0 + config.seed, 32.0], "mean": 31.0 + config.seed / 2,
                   "config": config.to_dict(),
                   "validation": {"mean": validation, "std": 0.0, "accuracies": [validation]},
                   "grad_norms_it0": {"loss": 2.0, "mmd": 2.0, "ce": 0.5}}
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
    assert "ce 0.5 (not in the loss) / loss 2 / mmd 2" in table      # DM has no CE term
    assert all(row["terms_off"] == ["ce"] for row in summary["grid"] if not row["failed"])
    assert (tmp_path / "dm" / "tuning.png").stat().st_size > 0        # the grid's picture
    # Re-running reads every record, the failure too, and runs nothing.
    calls.clear()
    again = tuning.run_tuning(dataset, "dm", str(tmp_path), validation_per_class=5,
                              trial_seed=5, test_seeds=(0, 1), quiet=True,
                                together=False)
    assert calls == [] and again["chosen"] == summary["chosen"]
    assert again["test"] == summary["test"]


def test_a_choice_on_the_grids_edge_goes_on_past_it_while_it_stays_there(tmp_path, monkeypatch):
    from idm_jax.runs import run as run_lib

    dataset = data.load_dataset("digits")
    m3d = methods.with_method(presets.get_preset("digits-ipc1"), "m3d").lr_img
    for peak, expected_past in ((m3d * 10 ** 3.2, [3.0, 3.5]),      # turns down at the 2nd
                                (m3d * 1e9, [3.0, 3.5, 4.0]),       # never: stops at 3
                                (m3d * 10 ** -2.2, [-2.5])):        # the lower edge
        calls = []
        monkeypatch.setattr(run_lib, "condense_and_evaluate", fake_runs(calls, peak))
        workdir = tmp_path / f"peak{peak:.3g}"
        summary = tuning.run_tuning(dataset, "m3d", str(workdir), validation_per_class=5,
                                    trial_seed=5, test_seeds=(0,), quiet=True, together=False)
        grid = [math.log10(row["setting"]["lr_img"] / m3d) for row in summary["grid"]]
        assert grid[:tuning.TRIALS] == pytest.approx([k / 2 for k in range(-4, 6)])
        assert grid[tuning.TRIALS:] == pytest.approx(expected_past), peak
        assert [row["past_edge"] for row in summary["grid"]] == (
            [False] * tuning.TRIALS + [True] * len(expected_past))
        best = max(summary["grid"], key=lambda row: row["validation"])["setting"]
        assert summary["chosen"] == best and calls[-1] == (best["lr_img"], 0)
        assert summary["still_at_edge"] == (len(expected_past) == tuning.EDGE_STEPS)
        table = (workdir / "m3d" / "tuning.md").read_text()
        assert f"10 settings and {len(expected_past)} past the grid's edge" in table
        assert ("the best setting may lie further" in table) == summary["still_at_edge"]
        calls.clear()                      # a re-run reads the points past the edge too
        again = tuning.run_tuning(dataset, "m3d", str(workdir), validation_per_class=5,
                                  trial_seed=5, test_seeds=(0,), quiet=True, together=False)
        assert calls == [] and again["grid"] == summary["grid"]
    # Inside the grid nothing is added (the other tests' grids peak inside).
    trials = [({"lr_img": lr}, {"validation": {"mean": v}}) for lr, v in ((1, 3), (2, 5), (3, 4))]
    assert tuning.beyond_edge(trials, 1) is None
    assert tuning.beyond_edge(trials, 2) == {"lr_img": pytest.approx(4.5)}
    with_ce = [({"lr_img": lr, "ce_weight": w}, {}) for lr in (1, 10, 100) for w in (0.1, 0.5)]
    assert tuning.beyond_edge(with_ce, 5) == {"lr_img": pytest.approx(1000), "ce_weight": 0.5}


def test_when_the_choice_changes_the_old_choices_test_runs_are_set_aside(tmp_path, monkeypatch):
    from idm_jax.runs import run as run_lib

    dataset = data.load_dataset("digits")
    calls = []
    monkeypatch.setattr(run_lib, "condense_and_evaluate", fake_runs(calls))

    def tune():
        return tuning.run_tuning(dataset, "dm", str(tmp_path), validation_per_class=5,
                                 trial_seed=5, test_seeds=(0,), quiet=True, together=False)
    first = tune()["chosen"]
    os.makedirs(tmp_path / "dm" / "chosen" / "seed0" / "checkpoints")   # a refused resume
    top = tmp_path / "dm" / tuning.trial_name(tuning.grid(methods.with_method(
        presets.get_preset("digits-ipc1"), "dm"))[-1]) / "seed5" / "results.json"
    record = json.loads(top.read_text())
    record["validation"]["mean"] = 99.0                 # the grid's top edge is best now
    top.write_text(json.dumps(record))
    calls.clear()
    second = tune()
    assert second["chosen"]["lr_img"] == record["config"]["lr_img"] != first["lr_img"]
    aside = tmp_path / "dm" / f"chosen-{tuning.trial_name(first)}" / "seed0"
    assert json.loads((aside / "results.json").read_text())["config"]["lr_img"] == first["lr_img"]
    assert (aside / "checkpoints").is_dir()
    assert calls[-1] == (second["chosen"]["lr_img"], 0)          # the new choice ran afresh
    assert second["test"]["models"] == 2
    # The choice comes back: its own run moves back (nothing re-runs) and the other's goes
    # aside beside the first; a seed whose run has checkpoints only is read from config.json.
    record["validation"]["mean"] = 0.0
    top.write_text(json.dumps(record))
    shutil.rmtree(aside / "checkpoints")
    calls.clear()
    assert tune()["chosen"] == first and calls == []
    assert (tmp_path / "dm" / "chosen" / "seed0" / "results.json").is_file()
    assert not (tmp_path / "dm" / f"chosen-{tuning.trial_name(first)}" / "seed0").exists()
    other = tmp_path / "dm" / f"chosen-{tuning.trial_name(second['chosen'])}" / "seed0"
    assert json.loads((other / "results.json").read_text())["config"]["lr_img"] == (
        second["chosen"]["lr_img"])
    seed1 = tmp_path / "dm" / "chosen" / "seed1"
    seed1.mkdir()
    (seed1 / "config.json").write_text(json.dumps(dict(record["config"], seed=1)))
    tuning.run_tuning(dataset, "dm", str(tmp_path), validation_per_class=5, trial_seed=5,
                      test_seeds=(0, 1), quiet=True, together=False)
    assert json.loads((other.parent / "seed1" / "config.json").read_text())["seed"] == 1
    assert calls == [(first["lr_img"], 1)]
    # A record lacking the setting's field reads as Config's default, as study.finished reads
    # it (IDM's rate, not DM's): another setting, set aside under that name, and re-run.
    older_default = Config().lr_img
    assert older_default != first["lr_img"]
    kept = tmp_path / "dm" / "chosen" / "seed0" / "results.json"
    older = json.loads(kept.read_text())
    del older["config"]["lr_img"]
    kept.write_text(json.dumps(older))
    calls.clear()
    tune()
    assert calls == [(first["lr_img"], 0)]
    assert (tmp_path / "dm" / f"chosen-lr_img={older_default:.4g}" / "seed0").is_dir()
    assert tuning.trial_name({"lr_img": None}) == "lr_img=unknown"


def test_a_set_aside_run_moves_back_only_when_it_is_this_very_test(tmp_path):
    base = methods.with_method(presets.get_preset("digits-ipc1"), "dm")
    chosen, other = {"lr_img": base.lr_img}, {"lr_img": base.lr_img * 10}

    def record(folder, **changes):
        folder.mkdir(parents=True)
        config = dataclasses.replace(base, seed=int(folder.name[4:]), **changes)
        checkpoint.dump_json(str(folder / "results.json"),
                             {"accuracies": [1.0], "config": config.to_dict()})
    name = tuning.trial_name(chosen)
    record(tmp_path / f"chosen-{name}" / "seed0", **chosen, iterations=base.iterations + 1)
    record(tmp_path / "chosen" / "seed1", **other)
    record(tmp_path / f"chosen-{name}" / "seed1", **chosen)
    tuning._set_aside_other_choices(str(tmp_path), base, chosen, (0, 1))
    assert not (tmp_path / "chosen" / "seed0").exists()        # another protocol: stays aside
    assert tuning.ran_setting(str(tmp_path / "chosen" / "seed1"), chosen) == chosen
    assert tuning.ran_setting(str(tmp_path / f"chosen-{tuning.trial_name(other)}" / "seed1"),
                              chosen) == other


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
    assert "-0.25 / 1.00 = -0.2 (a 1-seed row)" in text
    assert (tmp_path / "comparison.png").stat().st_size > 0
    assert "| 1 | `dm` |" in capsys.readouterr().out
    # Tunings of another IPC are not tabled beside these.
    edit("m3d", 0, lambda c: c.update(ipc=10))
    with pytest.raises(SystemExit):
        tune.main(["--compare", "m3d,dm", "--workdir", str(tmp_path)])
    assert "the rows differ in ipc" in capsys.readouterr().err
    # Nothing finished among the methods named: one error line.
    with pytest.raises(SystemExit) as stopped:
        tune.main(["--compare", "idm", "--workdir", str(tmp_path)])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "idm" in err[0]


def _study_run(root, variant, seed, accuracies, **changes):
    """A finished study run's record as ``experiments.study`` writes it (digits, CPU budget,
    5 images per class held out unless ``changes`` say otherwise)."""
    from idm_jax.runs import study
    base = study.budget_config("digits", "cpu", 10, dict(validation_per_class=5))
    config = study.variant_config(base, variant, seed)
    config = dataclasses.replace(config, **changes)
    directory = root / variant / f"seed{seed}"
    directory.mkdir(parents=True)
    checkpoint.dump_json(str(directory / "results.json"), {
        "accuracies": accuracies, "mean": float(np.mean(accuracies)), "config": config.to_dict(),
        "condense_seconds": 60.0, "eval_seconds": 30.0})


def _tuned_at_ipc1(tmp_path, monkeypatch):
    """DM tuned at IPC 1 on digits with fake runs (two grid points, one test seed); returns the
    dataset, the list of (lr, seed) runs made from now on, the IPC 1 and IPC 10 workdirs and
    the IPC 1 choice."""
    from idm_jax.runs import run as run_lib

    dataset = data.load_dataset("digits")
    calls = []
    monkeypatch.setattr(run_lib, "condense_and_evaluate", fake_runs(calls))
    monkeypatch.setattr(tuning, "grid", lambda c: [{"lr_img": c.lr_img * f} for f in (0.1, 10.0)])
    ipc1, ipc10 = tmp_path / "ipc1", tmp_path / "ipc10"
    tuning.run_tuning(dataset, "dm", str(ipc1), validation_per_class=5, trial_seed=5,
                      test_seeds=(0,), quiet=True, together=False)
    chosen = json.loads((ipc1 / "dm" / "tuning.json").read_text())["chosen"]
    calls.clear()
    return dataset, calls, ipc1, ipc10, chosen


@pytest.mark.parametrize("field", ["validation_per_class", "seed", "lr_img", "ce_weight",
                                   "calibration_weight"])
def test_a_field_the_tuning_sets_itself_is_refused_in_set_before_any_run(
        field, tmp_path, monkeypatch, capsys):
    from experiments import tune
    from idm_jax.runs import run as run_lib
    calls = []
    monkeypatch.setattr(run_lib, "condense_and_evaluate", fake_runs(calls))
    with pytest.raises(SystemExit):
        tune.main(["--method", "ncfm", "--dataset", "digits", "--set", f"{field}=1",
                   "--workdir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --set {field}=...") and calls == []


def test_a_choice_carried_to_another_ipc_runs_the_choice_alone_on_the_test_seeds(
        tmp_path, monkeypatch):
    dataset, calls, ipc1, ipc10, chosen = _tuned_at_ipc1(tmp_path, monkeypatch)
    summary = tuning.run_carried(dataset, "dm", str(ipc10), str(ipc1), ipc=10,
                                 validation_per_class=5, test_seeds=(0, 1), quiet=True)
    assert calls == [(chosen["lr_img"], 0), (chosen["lr_img"], 1)]
    ran = json.loads((ipc10 / "dm" / "chosen" / "seed1" / "results.json").read_text())
    assert ran["config"]["ipc"] == 10 and ran["config"]["validation_per_class"] == 5
    assert summary["grid"] == [] and summary["carried_from"]["ipc"] == 1
    assert summary["carried_from"]["validation"] == pytest.approx(
        40.0 - abs(math.log10(chosen["lr_img"])))
    assert "no grid at IPC 10" in (ipc10 / "dm" / "tuning.md").read_text()


def test_carrying_with_a_mismatched_or_grid_flag_is_one_error_line_before_any_run(
        tmp_path, monkeypatch, capsys):
    from experiments import tune
    _, calls, ipc1, ipc10, _ = _tuned_at_ipc1(tmp_path, monkeypatch)
    # Within one IPC, from another split, budget or --set, a missing tuning, into the tuning's
    # own folder, or with a grid's flags.
    for flags, words in ((["--ipc", "1"], "at IPC 1"),
                         (["--validation_per_class", "7"], "validation_per_class"),
                         (["--budget", "paper"], "budget"),
                         (["--set", "iterations=50"], "overrides"),
                         (["--method", "m3d"], "no tuning of m3d"),
                         (["--workdir", str(ipc1)], "that is --workdir itself"),
                         (["--separate"], "--separate: not used with --carry_from"),
                         (["--trial_seed", "7"], "--trial_seed: not used with --carry_from"),
                         (["--compare", "dm"], "--carry_from: not used with --compare")):
        with pytest.raises(SystemExit):
            tune.main(["--method", "dm", "--dataset", "digits", "--carry_from", str(ipc1),
                       "--validation_per_class", "5", "--ipc", "10", "--workdir", str(ipc10)]
                      + flags)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and words in err[0], (flags, err)
    assert calls == []


def test_a_choice_that_failed_is_not_carried(tmp_path, monkeypatch):
    # Every grid point failed: the choice is the best of the failures, and nothing runs.
    dataset, calls, ipc1, _, _ = _tuned_at_ipc1(tmp_path, monkeypatch)
    broken = json.loads((ipc1 / "dm" / "tuning.json").read_text())
    for row in broken["grid"]:
        row.update(failed="the loss became nan", validation=None)
    (tmp_path / "failed" / "dm").mkdir(parents=True)
    (tmp_path / "failed" / "dm" / "tuning.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="is a failed run; nothing to carry"):
        tuning.run_carried(dataset, "dm", str(tmp_path / "x"), str(tmp_path / "failed"),
                           ipc=10, validation_per_class=5, quiet=True)
    assert calls == []


def test_a_carried_row_tables_beside_untuned_study_rows_each_from_its_own_records(
        tmp_path, monkeypatch):
    from experiments import tune
    dataset, _, ipc1, ipc10, chosen = _tuned_at_ipc1(tmp_path, monkeypatch)
    tuning.run_carried(dataset, "dm", str(ipc10), str(ipc1), ipc=10,
                       validation_per_class=5, test_seeds=(0, 1), quiet=True)
    studies = tmp_path / "study"
    _study_run(studies, "random-real", 0, [20.0, 22.0])
    _study_run(studies, "random-real", 1, [24.0, 26.0])
    _study_run(studies, "idm", 0, [50.0, 52.0])
    table = tune.main(["--compare", "dm", "--workdir", str(ipc10),
                       "--baselines", f"{studies}:idm,random-real"])
    assert [row["variant"] for row in table] == ["idm (study)", "dm", "random-real (study)"]
    assert table[2]["mean"] == pytest.approx(23.0) and table[2]["seeds"] == 2
    assert table[2]["std"] == pytest.approx(np.std([20.0, 22.0, 24.0, 26.0]))
    assert table[1]["trial_validation"] == pytest.approx(40.0 - abs(math.log10(chosen["lr_img"])))
    text = (ipc10 / "comparison.md").read_text()
    assert "(chosen at IPC 1)" in text and "untuned: the initial mosaic" in text
    assert ("different numbers of seeds (1: `idm (study)`; 2: `dm`, `random-real (study)`)"
            in text)
    # A test seed's folder holding another seed's record does not count it twice.
    from idm_jax.runs import comparison
    chosen_dir = ipc10 / "dm" / "chosen"
    for wrong, right in ((0, 1), (1, 0)):
        (chosen_dir / f"seed{wrong}" / "results.json").rename(tmp_path / "kept.json")
        shutil.copy(chosen_dir / f"seed{right}" / "results.json",
                    chosen_dir / f"seed{wrong}" / "results.json")
        assert comparison.method_row(str(ipc10), "dm") is None, wrong
        (tmp_path / "kept.json").replace(chosen_dir / f"seed{wrong}" / "results.json")
    assert comparison.method_row(str(ipc10), "dm")["seeds"] == 2
    # Folders that are not seed runs do not count.
    (studies / "random-real" / "seed0-old").mkdir()
    (studies / "random-real" / "seed0-old" / "results.json").write_text(
        (studies / "random-real" / "seed0" / "results.json").read_text())
    again = tune.main(["--compare", "dm", "--workdir", str(ipc10),
                       "--baselines", f"{studies}:random-real"])
    assert [r["seed_means"] for r in again if r["variant"] == "random-real (study)"] == [
        [21.0, 25.0]]


def test_baselines_in_the_wrong_seed_folder_or_under_another_protocol_are_refused(
        tmp_path, monkeypatch, capsys):
    from experiments import tune
    dataset, _, ipc1, ipc10, _ = _tuned_at_ipc1(tmp_path, monkeypatch)
    tuning.run_carried(dataset, "dm", str(ipc10), str(ipc1), ipc=10,
                       validation_per_class=5, test_seeds=(0,), quiet=True)
    studies = tmp_path / "study"
    _study_run(studies, "idm", 0, [50.0, 52.0])
    _study_run(studies, "random-real", 2, [20.0, 22.0])
    record = studies / "random-real" / "seed2" / "results.json"
    moved = json.loads(record.read_text())
    moved["config"]["seed"] = 0
    record.write_text(json.dumps(moved))
    _study_run(studies, "dm", 0, [30.0, 31.0], epoch_eval_train=7)
    _study_run(studies, "pf4", 0, [30.0, 31.0], validation_seed=1)
    _study_run(studies, "random-real-plain", 0, [30.0, 31.0], validation_per_class=0)
    tune.main(["--compare", "dm", "--workdir", str(ipc10),       # no split: allowed, marked
               "--baselines", f"{studies}:random-real-plain"])
    assert "no split: all training images" in (ipc10 / "comparison.md").read_text()
    for argv, words in ((["--compare", "dm", "--baselines", f"{studies}:idm,dm"],
                         "differ in epoch_eval_train"),
                        (["--compare", "dm", "--baselines", f"{studies}:pf4"],
                         "differ in validation_seed"),
                        (["--compare", "dm", "--baselines", f"{studies}:random-real"],
                         "the run in seed2 is not seed 2"),
                        (["--compare", "dm", "--baselines", f"{studies}:nope"], "variants of"),
                        (["--baselines", f"{studies}:idm"], "--baselines: not used with")):
        with pytest.raises(SystemExit):
            tune.main(argv + ["--workdir", str(ipc10)])
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and words in err[0], err


def test_the_comparison_counts_each_grid_and_flags_a_choice_on_its_edge_or_out_of_date(
        tmp_path, monkeypatch):
    from idm_jax.runs import comparison
    from idm_jax.runs import run as run_lib

    dataset = data.load_dataset("digits")
    top = methods.with_method(presets.get_preset("digits-ipc1"), "m3d").lr_img * 10 ** 2.5
    calls = []
    monkeypatch.setattr(run_lib, "condense_and_evaluate", fake_runs(calls, peak=top))
    ipc1, ipc10 = tmp_path / "ipc1", tmp_path / "ipc10"
    tuning.run_tuning(dataset, "m3d", str(ipc1), validation_per_class=5, trial_seed=5,
                      test_seeds=(0,), quiet=True, together=False)
    # The grid's top point is best; one point past it turns down, so the choice is inside.
    comparison.compare(str(ipc1), ["m3d"])
    text = (ipc1 / "comparison.md").read_text()
    assert "(10 + 1 past the edge, 0 failed) |" in text and "still on the edge" not in text
    carried = tuning.run_carried(dataset, "m3d", str(ipc10), str(ipc1), ipc=10,
                                 validation_per_class=5, test_seeds=(0,), quiet=True)
    assert carried["carried_from"]["trials"] == 10
    assert carried["carried_from"]["past_edge"] == 1
    assert "and 1 past the grid's edge" in (ipc10 / "m3d" / "tuning.md").read_text()
    # Records copied together are checked against the tuning beside them: a choice that moved
    # since the carry is out of date, and not tabled.
    shutil.copytree(ipc1, tmp_path / "copy" / "ipc1")
    shutil.copytree(ipc10, tmp_path / "copy" / "ipc10")
    moved = tmp_path / "copy" / "ipc1" / "m3d" / "tuning.json"
    summary = json.loads(moved.read_text())
    moved.write_text(json.dumps(dict(summary, chosen=summary["grid"][0]["setting"])))
    assert "carry it again" in comparison.method_row(str(tmp_path / "copy" / "ipc10"),
                                                     "m3d")["stale"]
    row = comparison.method_row(str(ipc10), "m3d")
    assert row["past_edge"] == 1 and row["still_at_edge"] is False
    # A tuning made before the grid went past its edges, its choice on the edge: flagged.
    record = ipc1 / "m3d" / "tuning.json"
    summary = json.loads(record.read_text())
    summary["grid"] = [r for r in summary["grid"] if not r["past_edge"]]
    del summary["still_at_edge"]
    record.write_text(json.dumps(summary))
    assert tuning.edge_state(summary) == {"trials": 10, "past_edge": 0, "still_at_edge": True,
                                          "before_edge_rule": True}
    comparison.compare(str(ipc1), ["m3d"])
    text = (ipc1 / "comparison.md").read_text()
    assert "(10, 0 failed; still on the edge) |" in text
    assert "may not be that method's best" in text


def test_a_grid_whose_every_setting_failed_runs_no_test_seed_and_tables_as_failed(
        tmp_path, monkeypatch):
    from idm_jax.runs import comparison
    from idm_jax.runs import run as run_lib

    dataset = data.load_dataset("digits")
    calls = []
    monkeypatch.setattr(run_lib, "condense_and_evaluate", fake_runs(calls))
    monkeypatch.setattr(tuning, "grid", lambda c: [{"lr_img": c.lr_img * f}
                                                   for f in (1e5, 1e6)])
    summary = tuning.run_tuning(dataset, "dm", str(tmp_path), validation_per_class=5,
                                trial_seed=5, test_seeds=(0, 1), quiet=True, together=False)
    # The grid alone: no best point, so no edge to go past, and no test seed.
    assert calls == [(1e5, 5), (1e6, 5)]
    assert summary["test"]["models"] == 0 and not (tmp_path / "dm" / "chosen").exists()
    assert summary["still_at_edge"] is False
    text = (tmp_path / "dm" / "tuning.md").read_text()
    assert "Every setting failed" in text and "(chosen)" not in text and "edge" not in text
    assert comparison.method_row(str(tmp_path), "dm") == {
        "variant": "dm", "failed": "every setting of its grid failed"}


def test_a_carry_whose_tuning_was_rerun_with_other_overrides_is_out_of_date(
        tmp_path, monkeypatch):
    from idm_jax.runs import comparison

    dataset, _, ipc1, ipc10, chosen = _tuned_at_ipc1(tmp_path, monkeypatch)
    tuning.run_carried(dataset, "dm", str(ipc10), str(ipc1), ipc=10,
                       validation_per_class=5, test_seeds=(0,), quiet=True)
    assert "stale" not in comparison.method_row(str(ipc10), "dm")
    # The same choice, but the IPC 1 tuning was re-run under another --set: out of date.
    record = ipc1 / "dm" / "tuning.json"
    summary = json.loads(record.read_text())
    assert summary["chosen"] == chosen
    overrides = dict(summary["overrides"], batch_real=64)
    record.write_text(json.dumps(dict(summary, overrides=overrides)))
    assert comparison.method_row(str(ipc10), "dm")["stale"] == (
        f"the tuning in {tmp_path / 'ipc1'} was re-run since (its --set overrides differ); "
        f"carry it again")
    # A record from before overrides were kept is asked about its choice only.
    del summary["overrides"]
    record.write_text(json.dumps(summary))
    assert "stale" not in comparison.method_row(str(ipc10), "dm")
    # Re-run alike, but now failing at every setting: nothing left to carry.
    failed = [dict(row, failed="the loss became nan") for row in summary["grid"]]
    record.write_text(json.dumps(dict(summary, grid=failed)))
    assert comparison.method_row(str(ipc10), "dm")["stale"] == (
        f"the tuning in {tmp_path / 'ipc1'} now fails at every setting; nothing to carry")
