"""The command-line experiments end to end: outputs, overrides, evaluate CLI, Ctrl-C and resume."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from experiments import evaluate as evaluate_cli
from idm_jax import data
from idm_jax.runs import checkpoint, cli, export
from idm_jax import presets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A few iterations of a small network: what matters here is the plumbing, not accuracy.
TINY = ["--smoke", "--iterations", "4", "--checkpoint_every", "2", "--num_eval", "1",
        "--epoch_eval_train", "1", "--batch_real", "8", "--trained_bs", "8",
        "--model_train_steps", "1", "--quiet"]


def test_cifar10_end_to_end_under_tfds_mock_data(tmp_path):
    workdir = str(tmp_path / "run")
    with tfds.testing.mock_data(num_examples=200, policy=tfds.testing.MockPolicy.USE_CODE):
        results = cli.main("cifar10", argv=["--ipc", "1", "--workdir", workdir] + TINY)
        # The saved set evaluates with another architecture through its own CLI.
        out = str(tmp_path / "eval.json")
        evaluated = evaluate_cli.main(["--set", os.path.join(workdir, "synthetic.npz"),
                                       "--arch", "ConvNetW32", "--epochs", "1", "--num_eval",
                                       "2", "--out", out])
    for name in ("config.json", "metrics.jsonl", "results.json", "synthetic.npz",
                 "synthetic.png"):
        assert os.path.exists(os.path.join(workdir, name)), name
    with open(os.path.join(workdir, "results.json")) as f:
        saved = json.load(f)
    assert saved["iterations"] == 4 and len(saved["accuracies"]) == 1
    assert saved["mean"] == results["mean"] and 0 <= saved["mean"] <= 100
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["ipc"] == 1
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    iterations = [r["iteration"] for r in lines if "event" not in r]
    assert iterations == [0, 1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in lines if "event" not in r)
    assert lines[-1]["event"] == "eval"
    exported = export.load_npz(os.path.join(workdir, "synthetic.npz"))
    assert exported["images"].shape == (10, 32, 32, 3)
    assert exported["images"].min() >= 0 and exported["images"].max() <= 1
    np.testing.assert_array_equal(exported["labels"], np.arange(10))
    grid = np.asarray(Image.open(os.path.join(workdir, "synthetic.png")))
    assert grid.shape[0] > grid.shape[1]        # one row per class, ipc = 1 column
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ckpt.latest_step() == 4
    assert len(evaluated["accuracies"]) == 2 and os.path.exists(out)


@pytest.mark.parametrize("argv, message", [
    (["--ipcc", "3"], "unknown config field 'ipcc'; valid fields: dataset"),
    (["--ce_weight", "high"], "'ce_weight' expects float"),
    (["--ipc", "0"], "ipc must be >= 1"),
    (["--preset", "cifar10-ipc7"], "unknown preset"),
    (["--iterations"], "--iterations needs a value"),
])
def test_bad_overrides_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main("cifar10", argv=argv + ["--workdir", "/nonexistent/never-written"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_data_dir_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main("cifar10", argv=["--source", "npy", "--data_dir", str(tmp_path / "none"),
                                     "--workdir", str(tmp_path / "run")])
    assert "error:" in capsys.readouterr().err


def write_npy_cifar(path, per_class=6):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), per_class)
    images = rng.integers(0, 256, size=(len(labels), 32, 32, 3), dtype=np.uint8)
    os.makedirs(path)
    np.save(os.path.join(path, "train_x_0.npy"), images)
    np.save(os.path.join(path, "train_y.npy"), labels)
    np.save(os.path.join(path, "test_x.npy"), images[:20])
    np.save(os.path.join(path, "test_y.npy"), labels[:20])


def cli_command(workdir, data_dir, extra=()):
    return [sys.executable, "-m", "experiments.cifar10", "--ipc", "1", "--source", "npy",
            "--data_dir", data_dir, "--workdir", workdir] + TINY + [
            "--iterations", "150", "--checkpoint_every", "1000"] + list(extra)


def flip_one_bit_of_the_largest_file(folder):
    """Flip the lowest bit of the middle byte of the largest file under ``folder``; its path."""
    files = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names]
    target = max(files, key=os.path.getsize)
    with open(target, "r+b") as f:
        f.seek(os.path.getsize(target) // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 1]))
    return target


def wait_for_lines(path, count, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and sum(1 for _ in open(path)) >= count:
            return
        time.sleep(0.2)


def _stop_with_ctrl_c(interrupted: str, data_dir: str, env: dict) -> int:
    """Start a run, check a second process on its workdir is refused, stop it with SIGINT
    after 3 iterations; the iteration its checkpoint holds."""
    proc = subprocess.Popen(cli_command(interrupted, data_dir), cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_lines(os.path.join(interrupted, "metrics.jsonl"), 3, proc)
    assert proc.poll() is None, proc.communicate()[0]
    rival = subprocess.run(cli_command(interrupted, data_dir), cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert rival.returncode == 2 and f"in use by PID {proc.pid}" in rival.stderr, rival.stderr
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, output
    assert "checkpoint saved" in output
    stopped_at = checkpoint.Checkpointer(os.path.join(interrupted, "checkpoints")).latest_step()
    assert 3 <= stopped_at < 150
    assert not os.path.exists(os.path.join(interrupted, "results.json"))
    return stopped_at


def _rot_and_restart(interrupted: str, data_dir: str, env: dict, stopped_at: int) -> None:
    """Flip one bit of the only checkpoint's largest file: the next start sets it aside with
    one warning line, no traceback, and starts over to the end."""
    damaged = flip_one_bit_of_the_largest_file(
        os.path.join(interrupted, "checkpoints", str(stopped_at)))
    resumed = subprocess.run(cli_command(interrupted, data_dir), cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    printed = (resumed.stdout + resumed.stderr).splitlines()
    assert len([line for line in printed if line.startswith("warning:")]) == 1, printed
    assert not any("Traceback" in line for line in printed), printed
    assert os.path.exists(os.path.join(interrupted, "checkpoints-damaged", str(stopped_at),
                                       os.path.relpath(damaged, os.path.join(
                                           interrupted, "checkpoints", str(stopped_at)))))


def test_ctrl_c_kill_9_and_a_rotten_checkpoint_end_in_the_same_result_logged_once(tmp_path):
    data_dir = str(tmp_path / "npy")
    write_npy_cifar(data_dir)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # The uninterrupted reference runs beside the interrupted sequence (it only has to finish).
    straight = str(tmp_path / "straight")
    reference = subprocess.Popen(cli_command(straight, data_dir), cwd=REPO, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    interrupted = str(tmp_path / "interrupted")
    metrics = os.path.join(interrupted, "metrics.jsonl")
    stopped_at = _stop_with_ctrl_c(interrupted, data_dir, env)

    # A result-changing setting is refused on resume, with the difference named.
    changed = subprocess.run(cli_command(interrupted, data_dir, ["--lr_img", "0.5"]), cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=300)
    assert changed.returncode == 2 and "lr_img: 0.2 -> 0.5" in changed.stderr, changed.stderr

    # Resume, then kill -9 a few iterations later: those iterations run again on the next
    # resume, and the log must not hold them twice.
    killed = subprocess.Popen(cli_command(interrupted, data_dir), cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_lines(metrics, stopped_at + 3, killed)
    killed.send_signal(signal.SIGKILL)
    killed_output, _ = killed.communicate(timeout=60)
    assert f"resuming from iteration {stopped_at}" in killed_output, killed_output

    _rot_and_restart(interrupted, data_dir, env, stopped_at)
    steps = [json.loads(line)["iteration"] for line in open(metrics)
             if "event" not in json.loads(line)]
    assert steps == list(range(150))

    reference_output, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, reference_output
    a = export.load_npz(os.path.join(interrupted, "synthetic.npz"))
    b = export.load_npz(os.path.join(straight, "synthetic.npz"))
    np.testing.assert_array_equal(a["images_normalized"], b["images_normalized"])
    with open(os.path.join(interrupted, "results.json")) as f:
        results = json.load(f)
    # Three sessions: the first, the resume killed with -9, the start-over past the damage.
    assert results["resumed_from_iteration"] == 0
    assert [s["from_iteration"] for s in results["sessions"]] == [0, stopped_at, 0]


def test_nan_loss_stops_with_the_iteration_and_the_last_good_checkpoint(tmp_path, capsys):
    data_dir = str(tmp_path / "npy")
    write_npy_cifar(data_dir)
    workdir = str(tmp_path / "run")
    # An absurd image learning rate drives the images to Inf within a few updates (the loss,
    # instance-normalised, can stay finite a while: the images are checked too).
    argv = ["--ipc", "1", "--source", "npy", "--data_dir", data_dir, "--workdir", workdir] + \
        TINY + ["--checkpoint_every", "1", "--lr_img", "1e38"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main("cifar10", argv=argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    bad = [r["iteration"] for r in lines
           if "loss" in r and (not np.isfinite(r["loss"]) or r["images_finite"] != 1.0)]
    assert bad, "the override should have produced a non-finite loss"
    first_bad = bad[0]
    assert bad == [lines[-1]["iteration"]]             # the run stopped at the first one
    assert f"at iteration {first_bad}" in err, err
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    last_good = ckpt.latest_step()
    assert last_good is not None and last_good <= first_bad
    assert f"newest intact checkpoint is iteration {last_good}" in err, err
    assert not os.path.exists(os.path.join(workdir, "results.json"))


def test_a_cpu_run_short_of_memory_says_it_recomputes(tmp_path, capsys):
    data_dir = str(tmp_path / "npy")
    write_npy_cifar(data_dir)
    shown = [a for a in TINY if a != "--quiet"]         # with its progress bars
    argv = ["--ipc", "1", "--source", "npy", "--data_dir", data_dir, "--workdir",
            str(tmp_path / "run")] + shown + ["--iterations", "1", "--memory_budget_gb", "0.001"]
    cli.main("cifar10", argv=argv)
    out, err = capsys.readouterr()
    assert "backward pass recomputes them" in out
    # The evaluation's bar: 1 model x epochs 0..1 (tqdm draws at most every 0.1 s).
    assert "evaluating 1 x ConvNet" in err and "/2 [" in err, err[-500:]


def test_dataset_npy_directory_loads_for_the_cli(tmp_path):
    data_dir = str(tmp_path / "npy")
    write_npy_cifar(data_dir)
    loaded = data.load_dataset("cifar10", source="npy", data_dir=data_dir)
    assert loaded.train_images.shape == (60, 32, 32, 3)


def test_digits_experiment_at_reduced_budget_beats_random_selection(tmp_path, monkeypatch):
    from experiments import digits

    comparison = digits.main(["--ipcs", "1", "--workdir", str(tmp_path), "--iterations", "20",
                              "--epoch_eval_train", "30", "--num_eval", "2", "--quiet"])
    row = comparison[1]
    # Condensed IPC 1 (4 expanded views per class) against 1 random real image per class.
    assert row["idm"] > row["random_real"] + 3.0, row
    assert os.path.exists(os.path.join(str(tmp_path), "comparison.json"))
    # Its random-real baseline is kept beside the run: a re-run does not evaluate it again,
    # a change of what it depends on does.
    calls = []
    monkeypatch.setattr(digits, "random_real_baseline",
                        lambda dataset, config, key: calls.append(config.seed) or {"mean": 1.0})
    from idm_jax import config as config_lib
    config = config_lib.override(presets.get_preset("digits-ipc1"), {"epoch_eval_train": 30,
                                                                         "num_eval": 2})
    folder = str(tmp_path / "ipc1")
    assert digits._random_real_once(None, config, folder)["mean"] == row["random_real"]
    assert calls == []
    digits._random_real_once(None, config_lib.override(config, {"seed": 3}), folder)
    assert calls == [3]


def test_a_set_condensed_with_another_partition_is_evaluated_with_it(tmp_path, monkeypatch):
    # The export records the scheme; experiments.evaluate expands the set the same way.
    from idm_jax import config as config_lib
    from idm_jax import evaluation
    from idm_jax.runs import outputs
    from idm_jax import real as real_lib
    ds = data.load_dataset("digits")
    real = real_lib.prepare_real(ds.train_images, ds.train_labels, ds.mean, ds.std)
    config = config_lib.Config(dataset="digits", ipc=1, partition="multiscale")
    images = np.zeros((10, 16, 16, 1), np.float32)
    outputs.export_set(str(tmp_path), images, real, config, lambda x: np.clip(x, 0, 1),
                       ds.class_names, 0)
    exported = export.load_npz(os.path.join(tmp_path, "synthetic.npz"))
    assert str(exported["partition_scheme"]) == "multiscale"
    seen = {}
    original = evaluation.evaluate_synset

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_synset", spy)
    evaluate_cli.main(["--set", os.path.join(tmp_path, "synthetic.npz"), "--dataset", "digits",
                       "--source", "digits", "--arch", "ConvNetW32", "--epochs", "0",
                       "--num_eval", "1", "--out", str(tmp_path / "eval.json")])
    assert seen["partition_scheme"] == "multiscale" and seen["expand"] is True
