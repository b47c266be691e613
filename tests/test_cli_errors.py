"""Every bad input is one ``error:`` line naming the flag or file, exit 2, before any work.

Each case runs the real command line in its own process (all at once, to share the start-up
cost) and must exit 2 with the culprit named, print no traceback and leave no workdir behind.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_cifar(path, per_class=4, drop_class=None, empty=False):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), per_class)
    if drop_class is not None:
        labels = labels[labels != drop_class]
    if empty:
        labels = labels[:0]
    images = rng.integers(0, 256, size=(len(labels), 32, 32, 3), dtype=np.uint8)
    os.makedirs(path)
    np.save(os.path.join(path, "train_x.npy"), images)
    np.save(os.path.join(path, "train_y.npy"), labels)
    test = rng.integers(0, 256, size=(10, 32, 32, 3), dtype=np.uint8)
    np.save(os.path.join(path, "test_x.npy"), test)
    np.save(os.path.join(path, "test_y.npy"), np.arange(10))


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    paths = {}
    for name, kwargs in {"good": {}, "no_class_9": {"drop_class": 9},
                         "empty": {"empty": True}}.items():
        paths[name] = str(root / name)
        write_cifar(paths[name], **kwargs)
    for name, damage in {"truncated": "cut", "garbage": "junk"}.items():
        paths[name] = str(root / name)
        write_cifar(paths[name])
        target = os.path.join(paths[name], "train_x.npy")
        raw = open(target, "rb").read()
        with open(target, "wb") as f:
            f.write(raw[: len(raw) // 2] if damage == "cut" else b"\x00garbage" * 100)
    paths["a_file"] = str(root / "a_file")
    open(paths["a_file"], "w").close()
    return paths


# (name, command module, arguments, data set, words the message must hold)
CASES = [
    ("eval_model", "cifar10", ["--eval_model", "Foo"], "good", ["--eval_model", "Foo"]),
    ("model", "cifar10", ["--model", "Foo"], "good", ["--model", "Foo"]),
    ("batchnorm", "cifar10", ["--model", "ConvNetBN"], "good", ["--model", "BatchNorm"]),
    ("factor", "digits", ["--partition_factor", "17"], None, ["--partition_factor 17", "16x16"]),
    ("ratio", "digits", ["--partition", "nonuniform", "--partition_ratio", "0.01"], None,
     ["--partition_ratio"]),
    ("empty_class", "cifar10", ["--init", "noise"], "no_class_9", ["classes [9]"]),
    ("empty_train", "cifar10", [], "empty", ["no training images"]),
    ("too_few", "cifar10", ["--ipc", "5"], "good", ["--ipc 5", "only 4"]),
    ("truncated", "cifar10", [], "truncated", ["train_x.npy", "not a readable"]),
    ("garbage", "cifar10", [], "garbage", ["train_x.npy", "no .npy header"]),
    ("other_dataset", "cifar10", ["--dataset", "cifar100"], "good", ["experiments.cifar100"]),
    ("devices", "cifar10", ["--devices", "-1"], "good", ["--devices"]),
    ("lr_inf", "cifar10", ["--lr_img", "inf"], "good", ["lr_img", "finite"]),
    ("workdir_file", "cifar10", [], "good", ["--workdir", "is a file"]),
    ("method", "cifar10", ["--method", "m4d"], "good", ["--method 'm4d'", "idm, dm"]),
    ("method_file", "cifar10", ["--method", "nowhere.py:MINE"], "good", ["no file nowhere.py"]),
    ("image_update", "cifar10", ["--image_update", "lbfgs"], "good", ["--image_update", "adam"]),
    ("preset_ipc", "cifar10", ["--preset", "cifar10-ipc1", "--ipc", "10"], "good",
     ["--preset cifar10-ipc1", "--ipc 10"]),
    ("no_exports", "cifar10", ["--exports", ""], "good", ["exports must name"]),
    ("workdir_empty", "cifar10", [], "good", ["--workdir is empty"]),
    ("workdir_through_file", "cifar10", [], "good", ["is a file, so no folder can be made"]),
    ("workdir_long_name", "cifar10", [], "good", ["is longer than the 255 bytes"]),
    ("distributed_alone", "cifar10", ["--distributed"], "good",
     ["--distributed needs --coordinator_address"]),
    ("process_id", "cifar10", ["--distributed", "--coordinator_address", "localhost:1",
                               "--num_processes", "2", "--process_id", "5"], "good",
     ["--process_id 5", "0..1"]),
    # experiments.digits checks every IPC before the first one runs
    ("digits_late_ipc", "digits", ["--ipcs", "1,500"], None, ["--ipc 500", "only"]),
    ("digits_fraction", "digits", ["--ipcs", "1.5"], None, ["--ipcs", "'1.5'"]),
    ("digits_workdir_file", "digits", [], None, ["--workdir", "is a file"]),
]


def test_bad_inputs_fail_before_any_work_with_one_error_line(datasets, tmp_path):
    procs = {}
    for name, module, args, dataset, _ in CASES:
        workdir = {"workdir_empty": "", "workdir_long_name": str(tmp_path / ("n" * 300)),
                   "workdir_through_file": os.path.join(datasets["a_file"], "sub")}.get(
            name, datasets["a_file"] if name.endswith("workdir_file") else str(tmp_path / name))
        command = [sys.executable, "-m", f"experiments.{module}", "--quiet", "--workdir",
                   workdir] + args
        if module == "digits":
            command += [] if "--ipcs" in args else ["--ipcs", "1"]
        else:
            command += ["--smoke", "--ipc", "1", "--source", "npy", "--data_dir",
                        datasets[dataset]] if "--ipc" not in args else [
                "--smoke", "--source", "npy", "--data_dir", datasets[dataset]]
        procs[name] = (subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True), workdir)
    failures = []
    for name, _, _, _, words in CASES:
        proc, workdir = procs[name]
        out, err = proc.communicate(timeout=300)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        ok = (proc.returncode == 2 and len(errors) == 1 and "Traceback" not in err
              and all(w in errors[0] for w in words)
              and (name.endswith("workdir_file") or not workdir or not os.path.exists(workdir)))
        if not ok:
            failures.append(f"{name}: exit {proc.returncode}, stderr: {err[-600:]!r}")
    assert not failures, "\n".join(failures)


def write_set(path, images=None, labels=None, **extra):
    """A .npz set as another tool might write it: pixels in [0, 1] and labels."""
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 1, (10, 32, 32, 3)).astype(np.float32) if images is None else images
    labels = np.arange(10) if labels is None else labels
    np.savez(path, images=images, labels=labels, **extra)
    return path


# (name, how the set is broken, words the message must hold)
SET_CASES = [
    ("nan", dict(images=np.full((10, 32, 32, 3), np.nan, np.float32)), ["NaN or infinite"]),
    ("uint8_range", dict(images=np.full((10, 32, 32, 3), 200.0, np.float32)),
     ["[0, 1]", "divide them by 255"]),
    ("fractional_labels", dict(labels=np.linspace(0, 9, 10) + 0.5), ["whole class numbers"]),
    ("label_range", dict(labels=np.arange(10) + 1), ["outside the 10 classes"]),
    ("empty", dict(images=np.zeros((0, 32, 32, 3), np.float32), labels=np.zeros(0, int)),
     ["holds no images"]),
    ("partition", dict(partition_expand=True, partition_factor=40), ["recorded partition",
                                                                     "--no-expand"]),
    ("out_folder", {}, ["--out", "does not exist"]),
]


def test_bad_sets_and_outputs_fail_before_training_with_one_error_line(datasets, tmp_path):
    procs = {}
    for name, broken, _ in SET_CASES:
        path = write_set(str(tmp_path / f"{name}.npz"), **broken)
        out = str(tmp_path / "nowhere" / "eval.json") if name == "out_folder" else str(
            tmp_path / f"{name}_eval.json")
        command = [sys.executable, "-m", "experiments.evaluate", "--set", path, "--source", "npy",
                   "--data_dir", datasets["good"], "--num_eval", "1", "--epochs", "0",
                   "--out", out]
        procs[name] = (subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True), out)
    failures = []
    for name, _, words in SET_CASES:
        proc, out = procs[name]
        _, err = proc.communicate(timeout=300)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        ok = (proc.returncode == 2 and len(errors) == 1 and "Traceback" not in err
              and all(w in errors[0] for w in words) and not os.path.exists(out))
        if not ok:
            failures.append(f"{name}: exit {proc.returncode}, stderr: {err[-600:]!r}")
    assert not failures, "\n".join(failures)


def test_a_read_only_workdir_is_refused_before_any_work(tmp_path, monkeypatch):
    # Tests run as root, whom permissions do not stop: the file system's answer is simulated.
    from idm_jax import validate
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: (
        not str(path).endswith("checkpoints") and real_access(path, mode)))
    with pytest.raises(validate.InvalidRun, match="checkpoints cannot be written"):
        validate.check_workdir(str(tmp_path / "run"))


def test_an_actionable_os_error_is_one_line_and_a_bug_keeps_its_traceback(capsys):
    import errno
    from idm_jax.runs import failures

    @failures.user_facing
    def full_disk():
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/metrics.jsonl")
        except OSError as err:        # wrapped, as orbax and tensorstore wrap it
            raise RuntimeError("save failed") from err

    with pytest.raises(SystemExit) as stop:
        full_disk()
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: /runs/x/metrics.jsonl: No space left on device; free some space or "
                   "choose another folder"]

    @failures.user_facing
    def bug():
        raise KeyError("a genuine bug")

    with pytest.raises(KeyError):
        bug()
