"""The run folder: an OS lock between real processes, restarts that keep the old run, a log
with each iteration once."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from idm_jax.runs import workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKDIR_PY = os.path.join(REPO, "idm_jax", "runs", "workdir.py")
# Load the module by path so the child process does not import JAX through the package.
HOLDER = f"""
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("w", {WORKDIR_PY!r})
w = importlib.util.module_from_spec(spec); spec.loader.exec_module(w)
with w.lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_process_is_refused_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    folder = str(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, folder], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(workdir.WorkdirBusy, match=f"in use by PID {holder.pid} on host"):
            with workdir.lock(folder):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)         # no cleanup code runs
        holder.wait()
    with workdir.lock(folder):                     # the kernel released it
        with open(os.path.join(folder, ".lock")) as f:
            assert json.load(f)["pid"] == os.getpid()


def test_restart_moves_the_previous_run_aside_and_deletes_nothing(tmp_path):
    folder = str(tmp_path)
    for name in ("metrics.jsonl", "results.json"):
        (tmp_path / name).write_text(name)
    (tmp_path / "checkpoints" / "5").mkdir(parents=True)
    first = workdir.set_aside(folder)
    assert sorted(os.listdir(first)) == ["checkpoints", "metrics.jsonl", "results.json"]
    assert sorted(os.listdir(folder)) == ["previous"]
    (tmp_path / "metrics.jsonl").write_text("second")
    time.sleep(0.01)
    second = workdir.set_aside(folder)
    assert second != first and open(os.path.join(second, "metrics.jsonl")).read() == "second"
    assert open(os.path.join(first, "metrics.jsonl")).read() == "metrics.jsonl"
    assert workdir.set_aside(folder) is None       # nothing left to move


def test_trim_metrics_keeps_each_iteration_once(tmp_path):
    lines = [{"iteration": i, "loss": 1.0} for i in range(6)]
    lines.insert(3, {"event": "eval", "iteration": 3, "mean": 1.0})
    lines.insert(6, {"event": "eval", "iteration": 5, "mean": 1.0})
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"iteration": 6, "lo'  # torn by a kill
    (tmp_path / "metrics.jsonl").write_text(text)
    assert workdir.trim_metrics(str(tmp_path), 3) == 5
    kept = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r.get("event"), r["iteration"]) for r in kept] == [
        (None, 0), (None, 1), (None, 2), ("eval", 3)]


def test_sessions_are_recorded_and_an_unused_folder_is_removed(tmp_path):
    folder = str(tmp_path / "run")
    os.makedirs(folder)
    workdir.record_session(folder, {"lr_img": 0.2}, 0)
    sessions = workdir.record_session(folder, {"lr_img": 0.2}, 40)
    assert [s["from_iteration"] for s in sessions] == [0, 40]
    (tmp_path / "run" / "metrics.jsonl").write_text('{"iteration": 0}\n')
    assert not workdir.remove_if_unused(folder) and os.path.isdir(folder)
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    assert workdir.remove_if_unused(folder) and not os.path.exists(folder)


def test_report_summarises_a_run_folder_from_its_files(tmp_path, capsys):
    from idm_jax.runs import tools

    run = tmp_path / "run"
    (run / "checkpoints" / "25").mkdir(parents=True)
    (run / "checkpoints-damaged" / "50").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"dataset": "cifar10", "ipc": 1,
                                                 "iterations": 100}))
    lines = [{"iteration": i, "loss": 10.0 - i, "mmd": 9.0 - i, "ce": 1.0, "extractor_acc": 5.0,
              "seconds": 30.0} for i in range(4)]
    lines.append({"event": "eval", "iteration": 4, "mean": 33.5, "std": 0.5})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    # A folder the report cannot write (a shared read-only copy; simulated, tests run as root)
    # is summarised without a picture, and nothing is written into it.
    real_access = os.access
    os.access = lambda path, mode: False if str(path) == str(run) else real_access(path, mode)
    try:
        tools.report_main([str(run)])
    finally:
        os.access = real_access
    assert not (run / "metrics.png").exists() and "; plot" not in capsys.readouterr().out
    [summary] = tools.report_main([str(run)])
    out = capsys.readouterr().out
    assert "iteration 4/100, stopped, 2.0 min condensing" in out
    assert "checkpoints [25], damaged set aside [50]" in out and "33.50 +- 0.50 %" in out
    assert summary["evaluations"] == [(4, 33.5, 0.5)]
    assert (run / "metrics.png").stat().st_size > 1000
    with pytest.raises(SystemExit) as stop:
        tools.report_main([str(tmp_path)])
    assert stop.value.code == 2 and "not a run folder" in capsys.readouterr().err
    # A config.json that is not a run's record is named, not summarised as "None ipc None".
    for name, text in (("garbage", "{not json"), ("other", '{"hello": 1}'), ("list", "[1, 2]")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(text)
        with pytest.raises(SystemExit) as stop:
            tools.report_main([str(tmp_path / name)])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and f"{name}/config.json" in err and "None" not in err


def test_evaluate_takes_the_dataset_the_set_records(tmp_path):
    # Without --dataset, experiments.evaluate reads synthetic.json beside the set (a digits set
    # is not evaluated on CIFAR-10); with no record it falls back to cifar10.
    import json
    from idm_jax.runs import tools
    (tmp_path / "run" / "dd_ranking").mkdir(parents=True)
    with open(tmp_path / "run" / "synthetic.json", "w") as f:
        json.dump({"dataset": "digits"}, f)
    assert tools._recorded_dataset(str(tmp_path / "run" / "synthetic.npz")) == "digits"
    assert tools._recorded_dataset(str(tmp_path / "run" / "dd_ranking")) == "digits"
    assert tools._recorded_dataset(str(tmp_path / "elsewhere.npz")) is None
