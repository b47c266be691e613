"""The scripts under docs/study that rewrite the project's own documents."""

import importlib.util
import json
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    path = os.path.join(REPO, "docs", "study", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


APPENDIX_DOC = """# Results

## Tuning (issue #28)

#### idm

old idm text, outside the appendix: kept

## Appendix: the tuning grids, CIFAR-10 IPC 1

Opening paragraph, kept.

#### idm

old grid

#### iid

Not tuned yet.

## Later section

kept too
"""


def test_splice_replaces_only_the_appendix_method_sections():
    module = _load("tuning_appendix")
    spliced = module.splice(APPENDIX_DOC, "#### idm\n\nnew grid\n\n#### iid\n\nnew iid grid\n")
    assert spliced == APPENDIX_DOC.replace(
        "#### idm\n\nold grid\n\n#### iid\n\nNot tuned yet.\n",
        "#### idm\n\nnew grid\n\n#### iid\n\nnew iid grid\n")
    assert "old idm text, outside the appendix: kept" in spliced


def test_splice_at_the_end_of_the_document_and_idempotent():
    module = _load("tuning_appendix")
    document = APPENDIX_DOC.split("## Later section")[0].rstrip("\n") + "\n"
    once = module.splice(document, "#### idm\n\nnew grid\n")
    assert once.endswith("Opening paragraph, kept.\n\n#### idm\n\nnew grid\n")
    assert module.splice(once, "#### idm\n\nnew grid\n") == once


def test_splice_refuses_a_document_without_one_appendix():
    module = _load("tuning_appendix")
    with pytest.raises(ValueError, match="found 0"):
        module.splice("# Results\n\n## Other\n", "#### idm\n")
    twice = APPENDIX_DOC + "\n## Appendix: the tuning grids, again\n"
    with pytest.raises(ValueError, match="found 2"):
        module.splice(twice, "#### idm\n")


RECORD = {"accuracies": [50.0, 52.0, 54.0], "code_version": "abcdef123456",
          "validation": {"accuracies": [40.0, 40.0]},
          "processor": {"cpu": "Some CPU"}, "condense_seconds": 90.0, "eval_seconds": 600.0,
          "sessions": [{"started": "2026-12-05 23:57:31"}, {"started": "2026-12-06 02:03:05"}],
          "date": "2026-12-06 02:36:29"}


def test_a_run_row_has_the_records_figures_by_hand():
    module = _load("run_rows")
    # std of 50, 52, 54 (population): sqrt(8/3) = 1.633; start rounds up, end rounds down.
    assert module.row(RECORD, "pf4, seed 1") == (
        "| pf4, seed 1 | `abcdef1`, 2026-12-05 23:58 to 2026-12-06 02:36 (2 sessions), Some CPU "
        "| 50.00, 52.00, 54.00 | 52.00 +- 1.63 | 40.00 +- 0.00 | 1.5 / 10.0 min |")


def test_a_one_session_run_without_validation_or_condensing():
    module = _load("run_rows")
    record = {k: v for k, v in RECORD.items() if k not in ("validation", "condense_seconds")}
    record["sessions"] = RECORD["sessions"][1:]
    assert module.row(record, "mosaic, seed 0") == (
        "| mosaic, seed 0 | `abcdef1`, 2026-12-06 02:03 to 02:36, Some CPU "
        "| 50.00, 52.00, 54.00 | 52.00 +- 1.63 | - | 0.0 / 10.0 min |")


def test_run_rows_names_a_folder_without_a_record(tmp_path, capsys):
    module = _load("run_rows")
    assert module.main([str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith(f"error: {tmp_path}")


def test_a_failed_splice_writes_neither_file(tmp_path, monkeypatch, capsys):
    module = _load("tuning_appendix")
    monkeypatch.setattr(module, "ROOT", str(tmp_path / "tune-ipc1"))   # no tunings: "not tuned"
    os.makedirs(module.ROOT)
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\n## No appendix here\n")
    monkeypatch.setattr("sys.argv", ["tuning_appendix.py", "--results", str(results)])
    with pytest.raises(SystemExit):
        module.main()
    assert "found 0" in capsys.readouterr().err
    assert results.read_text() == "# Results\n\n## No appendix here\n"
    assert not os.path.exists(os.path.join(module.ROOT, "grids.md"))


def test_the_appendix_reads_the_terms_off_from_each_run_where_an_old_record_lacks_them(tmp_path):
    module = _load("tuning_appendix")
    rows = [{"setting": {"lr_img": lr}, "failed": None, "validation": 30.0 + lr,
             "validation_std": 0.5, "grad_norms_it0": {"loss": 1.0, "mmd": 1.0, "ce": 0.5}}
            for lr in (1.0, 2.0)]
    summary = {"method": "m3d", "dataset": "cifar10", "ipc": 1, "validation_per_class": 500,
               "trial_seed": 100, "test_seeds": [0, 1], "grid": rows, "chosen": {"lr_img": 2.0},
               "test": {"mean": 40.0, "std": 1.0, "models": 6, "seed_means": [39.0, 41.0]}}
    os.makedirs(tmp_path / "m3d")
    (tmp_path / "m3d" / "tuning.json").write_text(json.dumps(summary))
    for lr, syn_ce in ((1.0, False), (2.0, True)):      # one record each way
        run = tmp_path / "m3d" / f"lr_img={lr:.4g}" / "seed100"
        os.makedirs(run)
        (run / "results.json").write_text(json.dumps({"config": {"syn_ce": syn_ce}}))
    text = module.appendix(str(tmp_path))
    assert "| lr_img 1 | 31.00 +- 0.50 | ce 0.5 (not in the loss) / loss 1 / mmd 1 |" in text
    assert "| lr_img 2 (chosen) | 32.00 +- 0.50 | ce 0.5 / loss 1 / mmd 1 |" in text
    assert "#### idm\n\nNot tuned yet." in text


def test_the_results_appendix_is_what_the_kept_records_give():
    # The published grids may not drift from docs/study's records: a copied record without a
    # redraw fails here, and the message says what to run.
    module = _load("tuning_appendix")
    with open(os.path.join(REPO, "RESULTS.md")) as f:
        document = f.read()
    assert module.splice(document, module.appendix()) == document, (
        "RESULTS.md's appendix differs from docs/study/tune-ipc1: run "
        "bash docs/study/make_tables.sh")


def _table_after(document: str, header: str) -> str:
    """The markdown table whose header line starts with ``header`` (up to the first blank)."""
    start = document.index(header)
    end = document.find("\n\n", start)
    return document[start:end if end >= 0 else None]


@pytest.mark.parametrize("document, header, drawn", [
    ("README.md", "| CIFAR-10, IPC 1 |", "docs/study/tune-ipc1/comparison.md"),
    ("README.md", "| CIFAR-10, IPC 10 |", "docs/study/tune-ipc10/comparison.md"),
    ("RESULTS.md", "| rank | row | setting | test (%) |", "docs/study/tune-ipc1/comparison.md")])
def test_every_figure_of_a_verdict_table_is_in_the_drawn_comparison(document, header, drawn):
    # The verdict tables are copied by hand from the comparison make_tables.sh draws from the
    # records: a figure the comparison no longer has (a new seed, a redrawn row) is stale.
    with open(os.path.join(REPO, document)) as f:
        table = _table_after(f.read(), header)
    with open(os.path.join(REPO, drawn)) as f:
        comparison = f.read()
    figures = re.findall(r"\d+\.\d\d \+- \d+\.\d\d", table)
    assert len(figures) >= 10, table
    stale = [figure for figure in figures if figure not in comparison]
    assert not stale, f"{document}'s {header} figures not in {drawn}: {stale}"


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def test_an_import_takes_finished_runs_and_tunings_only_and_nothing_twice(tmp_path, capsys):
    module = _load("import_records")
    work, study = tmp_path / "work", tmp_path / "study"
    for path in ["cpu-ipc10/pf4/seed0/results.json", "cpu-ipc10/pf4/seed0/synthetic.png",
                 "cpu-ipc10/pf4/seed0/checkpoints/7/state.npz",      # never a checkpoint
                 "cpu-ipc10/pf4/seed1/synthetic.png",                # still running
                 "cpu-ipc10/pf4/seed1/checkpoints/3/state.npz",
                 "cpu-ipc10/study.md", "cpu-ipc10/study.json",       # a step's partial table
                 "tune-ipc1/iid/lr_img=2/seed100/failed.json",
                 "tune-ipc1/iid/lr_img=2/seed100/synthetic.png",
                 "tune-ipc1/iid/grid-seed100/members.json",          # a grid still going
                 "tune-ipc1/iid/chosen/previous/seed0/results.json",  # set aside
                 "tune-ipc1/iid/tuning.json", "tune-ipc1/comparison.md",
                 "tune-ipc10/third-seeds.json", "elsewhere/results.json"]:
        _write(str(work / path), '{"date": "2026-12-06 09:00", "mean": 50.0}')
    copied = module.import_records(str(work), str(study))
    assert sorted(copied) == ["cpu-ipc10/pf4/seed0/results.json",
                              "cpu-ipc10/pf4/seed0/synthetic.png",
                              "tune-ipc1/iid/lr_img=2/seed100/failed.json",
                              "tune-ipc1/iid/lr_img=2/seed100/synthetic.png",
                              "tune-ipc1/iid/tuning.json", "tune-ipc10/third-seeds.json"]
    assert sorted(str(p.relative_to(study)) for p in study.rglob("*") if p.is_file()) == sorted(
        copied)
    assert module.import_records(str(work), str(study)) == []        # nothing new
    _write(str(work / "tune-ipc1/iid/tuning.json"), '{"date": "2026-12-06 10:00", "mean": 50.0}')
    assert module.import_records(str(work), str(study)) == []        # a new date only
    _write(str(work / "tune-ipc1/iid/tuning.json"), '{"date": "2026-12-06 11:00", "mean": 51.0}')
    assert module.import_records(str(work), str(study)) == ["tune-ipc1/iid/tuning.json"]
    assert '"mean": 51.0' in (study / "tune-ipc1/iid/tuning.json").read_text()
    assert module.main([str(work)], str(study)) == 0
    assert capsys.readouterr().out == (
        "no new records in cpu-ipc10, tune-ipc1, tune-ipc10: nothing copied\n")
    assert module.main([str(tmp_path / "empty")], str(study)) == 1
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'empty'} has none of")
