"""The study harness: a grid of variants x seeds that resumes, skips, and aggregates correctly."""

import json
import os

import numpy as np
import pytest

from experiments import study as study_cli
from idm_jax import config as config_lib
from idm_jax.runs import run as run_lib
from idm_jax.runs import study
from idm_jax import presets

TINY = ["--dataset", "digits", "--source", "digits", "--quiet",
        "--set", "iterations=2", "--set", "num_eval=1", "--set", "epoch_eval_train=1",
        "--set", "batch_real=16", "--set", "trained_bs=16", "--set", "model_train_steps=1",
        "--set", "model=ConvNetW32", "--set", "eval_model=ConvNetW32", "--set", "net_num=4",
        "--set", "record_grad_norms=false"]


def test_cpu_budget_is_the_written_protocol():
    config = study.budget_config("cifar10", "cpu")
    assert (config.dataset, config.ipc, config.batch_real, config.iterations) == (
        "cifar10", 1, 256, 100)
    assert (config.eval_interval, config.num_eval, config.epoch_eval_train,
            config.eval_every) == (100, 3, 300, 0)
    assert config.model == config.eval_model == "ConvNet"
    # Every variant builds a valid config, and the faithful one is the budget itself.
    for name in study.VARIANTS:
        study.variant_config(config, name, 0)
    assert study.variant_config(config, "idm", 4) == config_lib.override(config, {"seed": 4})


@pytest.mark.parametrize("ipc", [1, 10, 50])
def test_cpu_budget_takes_the_preset_of_the_ipc_studied(ipc):
    config = study.budget_config("cifar10", "cpu", ipc)
    preset = presets.get_preset(f"cifar10-ipc{ipc}")
    # Every field the CPU protocol does not set is the preset's own (queue interval, CE weight).
    for name in config_lib.field_names():
        if name not in study.CPU_PROTOCOL:
            assert getattr(config, name) == getattr(preset, name), name
    assert config.batch_real == 256 and config.iterations == 100
    # The first study's protocol kept the IPC 10 preset's queue interval at IPC 1.
    old = study.budget_config("cifar10", "cpu-v1", 1)
    assert (old.ipc, old.net_generate_interval) == (1, 30)
    assert study.budget_config("cifar10", "cpu", 1).net_generate_interval == 5


def test_a_study_of_another_method_takes_its_settings_under_the_protocol():
    dm = study.budget_config("cifar10", "cpu", 1, method="dm")
    assert (dm.method, dm.image_update, dm.lr_img, dm.net_generate_interval) == (
        "dm", "summed", 1.0, 1)
    assert (dm.batch_real, dm.iterations, dm.num_eval) == (256, 100, 3)   # the protocol wins
    with pytest.raises(ValueError, match="choose the method with --method"):
        study.budget_config("cifar10", "cpu", 1, overrides={"method": "dm"})


def _table_only_runs_nothing_and_names_the_rest(records, table, capsys, monkeypatch):
    """--table_only over a larger grid from the records alone; then a damaged record."""
    def no_work(*args, **kwargs):
        raise AssertionError("--table_only loaded data or ran")
    monkeypatch.setattr(study_cli.cli, "load_data", no_work)
    monkeypatch.setattr(run_lib, "condense_and_evaluate", no_work)
    only = study_cli.main(TINY + ["--variants", "idm,random-real", "--seeds", "0,1,2",
                                  "--workdir", str(records), "--table_only"])
    out = capsys.readouterr().out
    assert "study run" not in out and "idm seed 2, random-real seed 2" in out
    assert [(r["mean"], r["std"], r["seeds"]) for r in only] == [
        (r["mean"], r["std"], r["seeds"]) for r in table]
    assert not os.path.exists(records / "idm" / "seed2")
    with open(records / "study.json") as f:
        assert json.load(f)["header"]["missing"] == ["idm seed 2", "random-real seed 2"]
    # A run the grid names but nobody made is "no record", not "under way" (a third seed may be
    # planned for some variants only).
    assert ("No record (not run, or not finished), so not in the table: idm seed 2, "
            "random-real seed 2.") in (records / "study.md").read_text()
    assert (records / "study.png").read_bytes()[:4] == b"\x89PNG"
    # Redrawn later, elsewhere, from the same records: every file stays as it was.
    drawn = {n: ((records / n).read_bytes(), os.stat(records / n).st_mtime_ns)
             for n in ("study.md", "study.json", "study.png")}
    later = dict(study.machine(), commit="fffffff", date="2031-01-01 00:00", cpu="another")
    monkeypatch.setattr(study, "machine", lambda: dict(later))
    study_cli.main(TINY + ["--variants", "idm,random-real", "--seeds", "0,1,2",
                           "--workdir", str(records), "--table_only"])
    assert {n: ((records / n).read_bytes(), os.stat(records / n).st_mtime_ns)
            for n in drawn} == drawn
    assert "commits `" in out and study.provenance({"idm": []})["dates"] == []
    # A record made before the processor was kept is named as such, not guessed.
    old_record = {"code_version": "abc", "device": "cpu", "date": "2026-12-01 00:00"}
    assert study.provenance({"idm": [old_record]})["processors"] == ["not recorded"]
    # A damaged record is named before any work, in one error line.
    (records / "idm" / "seed1" / "results.json").write_text('{"config": {}, "accur')
    with pytest.raises(SystemExit) as exit_info:
        study_cli.main(TINY + ["--variants", "idm", "--seeds", "0,1", "--workdir", str(records),
                               "--table_only"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error:") and str(records / "idm" / "seed1" / "results.json") in err


def test_a_table_is_rewritten_only_when_more_than_its_stamp_would_change(tmp_path):
    table = [{"variant": "idm", "mean": 40.0}]
    header = {"dataset": "cifar10", "commit": "aaaaaaa", "date": "2026-12-01 10:00",
              "cpu": "one", "cpu_flags": ["avx2"], "cores": 2}
    charts = []

    def draw(head, rows=table, render=lambda h: f"{h['date']} {h['commit']} {h['dataset']}\n"):
        return study.write_tables(str(tmp_path), "t", rows, head, render,
                                  lambda path: (charts.append(path), open(path, "wb").close()))

    assert set(study.machine()) == set(study.TABLING)     # the stamp is all machine() adds
    assert draw(header) and len(charts) == 1
    first = (tmp_path / "t.md").read_text()
    assert first == "2026-12-01 10:00 aaaaaaa cifar10\n"
    # Another machine, commit and date, the same rows: nothing is written, not even the chart.
    restamped = dict(header, commit="bbbbbbb", date="2026-12-09 11:00", cpu="two", cores=16)
    assert not draw(restamped) and len(charts) == 1 and (tmp_path / "t.md").read_text() == first
    assert json.loads((tmp_path / "t.json").read_text()) == {"header": header, "table": table}
    # Each real change rewrites all three under the new stamp: a row, a header field that is not
    # the stamp, the Markdown's wording, a lost chart.
    for change in (dict(rows=[{"variant": "idm", "mean": 41.0}]),
                   dict(head=dict(restamped, dataset="svhn")),
                   dict(render=lambda h: f"tabled {h['date']}\n")):
        assert draw(**{"head": restamped, **change})
        assert json.loads((tmp_path / "t.json").read_text())["header"]["commit"] == "bbbbbbb"
        draw(header)                                    # back to the first table, first stamp
    assert len(charts) == 7 and (tmp_path / "t.md").read_text() == first
    os.remove(tmp_path / "t.png")
    assert draw(restamped) and "bbbbbbb" in (tmp_path / "t.md").read_text()
    # A damaged table is drawn again, not trusted.
    (tmp_path / "t.json").write_text("[1, 2")
    assert draw(restamped)


def test_study_runs_skips_finished_runs_and_aggregates_every_model(tmp_path, capsys,
                                                                   monkeypatch):
    workdir = str(tmp_path / "study")
    argv = TINY + ["--variants", "idm,random-real", "--seeds", "0,1", "--workdir", workdir]
    table = study_cli.main(argv)
    # The aggregate against the per-run results.json files, computed here by hand.
    for row in table:
        accs = []
        for seed in (0, 1):
            with open(os.path.join(workdir, row["variant"], f"seed{seed}", "results.json")) as f:
                accs += json.load(f)["accuracies"]
        assert row["models"] == 2 and row["seeds"] == 2
        np.testing.assert_allclose(row["mean"], np.mean(accs))
        np.testing.assert_allclose(row["std"], np.std(accs))
    with open(os.path.join(workdir, "random-real", "seed0", "results.json")) as f:
        assert json.load(f)["iterations"] == 0
    for name in ("study.md", "study.json", "study.png"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0
    with open(os.path.join(workdir, "study.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    again = study_cli.main(argv)                      # everything finished: all skipped
    assert capsys.readouterr().out.count("skipped") == 4
    assert [r["mean"] for r in again] == [r["mean"] for r in table]
    # --table_only over a larger grid: runs nothing, tables the finished runs, names the rest;
    # the results.json records alone (copied elsewhere) are enough.
    records = tmp_path / "records"
    for variant in ("idm", "random-real"):
        for seed in (0, 1):
            os.makedirs(records / variant / f"seed{seed}")
            with open(os.path.join(workdir, variant, f"seed{seed}", "results.json")) as f:
                (records / variant / f"seed{seed}" / "results.json").write_text(f.read())
    # The records alone also let a study continue elsewhere: every recorded run is skipped.
    study_cli.main(TINY + ["--variants", "idm,random-real", "--seeds", "0,1",
                           "--workdir", str(records)])
    assert capsys.readouterr().out.count("skipped") == 4

    _table_only_runs_nothing_and_names_the_rest(records, table, capsys, monkeypatch)


def test_table_only_with_no_finished_run_is_one_error_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        study_cli.main(TINY + ["--workdir", str(tmp_path / "w"), "--table_only"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--table_only" in err and str(tmp_path / "w") in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err and not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("extra, message", [
    (["--variants", "idm,nope"], "--variants"),
    (["--seeds", "0,x"], "--seeds"),
    (["--set", "lr_img"], "FIELD=VALUE"),
    (["--set", "distance=cosine"], "unknown distance"),
    (["--variants", "nope", "--table_only"], "--variants"),
])
def test_bad_study_flags_are_one_error_line(extra, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        study_cli.main(TINY + ["--workdir", str(tmp_path / "w")] + extra)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "w")


def test_a_finished_run_counts_across_versions_and_run_mechanics(tmp_path):
    import dataclasses
    import json

    from idm_jax.runs import study
    from idm_jax.config import Config

    config = Config(ipc=1, iterations=100)
    saved = config.to_dict()
    del saved["exports"]                                # written by an older version
    saved["checkpoint_every"] = 7                       # run mechanics only
    (tmp_path / "results.json").write_text(json.dumps({"config": saved, "mean": 1.0,
                                                       "accuracies": [1.0]}))
    assert study.finished(str(tmp_path), config)["mean"] == 1.0
    assert study.finished(str(tmp_path), dataclasses.replace(config, lr_img=0.5)) is None
    assert study.finished(str(tmp_path), dataclasses.replace(config, num_eval=2)) is None


def test_a_finished_run_of_a_method_file_counts_only_while_the_file_is_unchanged(tmp_path):
    import hashlib

    from idm_jax.config import Config

    mine = tmp_path / "mine.py"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(repo, "examples", "dm_adam.py")) as f:
        mine.write_text(f.read())
    spec = f"{mine}:DM_ADAM"
    config = Config(ipc=1, iterations=100, method=spec)
    digest = hashlib.sha256(mine.read_bytes()).hexdigest()   # independent of the code
    record = {"config": config.to_dict(), "mean": 1.0, "accuracies": [1.0],
              "method": {"name": spec, "method_sha256": digest}}
    (tmp_path / "results.json").write_text(json.dumps(record))
    assert study.finished(str(tmp_path), config)["mean"] == 1.0
    mine.write_text(mine.read_text() + "\n# edited\n")
    assert study.finished(str(tmp_path), config) is None


@pytest.mark.parametrize("flags, message", [
    (["--seeds", "0,0"], "--seeds names 0 more than once"),
    (["--variants", "idm,random-real,idm"], "--variants names idm more than once"),
])
def test_a_run_named_twice_is_refused_not_counted_twice(flags, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        study_cli.main(TINY + ["--workdir", str(tmp_path / "w"), "--table_only"] + flags)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
