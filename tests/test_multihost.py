"""Several hosts: the CLI run on 2 processes x 2 CPU devices, against one process on one device.

Two JAX processes on this machine join one distributed system over localhost
(``--distributed``, gloo collectives on CPU) and condense scikit-learn digits together: 10
classes on a 4-device mesh spanning both processes (padded to 12 classes), each process placing
only its own classes' real data. A third process runs the same command alone on one device.
Then both work folders are resumed for two more iterations by a single one-device process, which
restores the two-host checkpoint on another topology.

Checked: the two-host run computes the same synthetic images as the single device (float
rounding), writes each shared output once, and its checkpoint resumes on one device to the same
place as the single-device run's own checkpoint.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A few iterations of the digits CLI: what matters is the plumbing across processes.
TINY = ["--smoke", "--ipc", "2", "--source", "digits", "--checkpoint_every", "2",
        "--eval_every", "3", "--num_eval", "1", "--epoch_eval_train", "1", "--batch_real", "8",
        "--trained_bs", "8", "--model_train_steps", "1", "--quiet"]

WORKER = r'''
import sys
from idm_jax.runs import cli
cli.main("digits", argv=sys.argv[1:])
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(argv, devices, cache):
    env = dict(os.environ, JAX_PLATFORMS="cpu", IDM_JAX_COMPILATION_CACHE=str(cache),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                         f"--xla_backend_optimization_level=0")
    return subprocess.Popen([sys.executable, "-c", WORKER] + argv, cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(procs, timeout=300):
    logs = {}
    for name, proc in procs.items():
        try:
            logs[name], _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in procs.values():
                other.kill()
            raise
        assert proc.returncode == 0, f"{name} failed:\n{logs[name][-6000:]}"
    return logs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("multihost")
    hosts, single, cache = base / "hosts", base / "single", base / "xla_cache"
    port = _free_port()
    first = {f"host{rank}": _start(["--workdir", str(hosts), "--iterations", "4", *TINY,
                                    "--distributed", "--coordinator_address",
                                    f"localhost:{port}", "--num_processes", "2",
                                    "--process_id", str(rank)], 2, cache)
             for rank in (0, 1)}
    first["single"] = _start(["--workdir", str(single), "--iterations", "4", *TINY], 1, cache)
    logs = _finish(first)
    at4 = {}
    for name, folder in (("hosts", hosts), ("single", single)):
        shutil.copytree(folder, base / f"{name}_it4")
        at4[name] = base / f"{name}_it4"
    # Resume both folders on one device: the two-host checkpoint changes topology.
    second = {name: _start(["--workdir", str(folder), "--iterations", "6", *TINY], 1, cache)
              for name, folder in (("hosts", hosts), ("single", single))}
    logs.update({f"resume_{k}": v for k, v in _finish(second).items()})
    return {"it4": at4, "it6": {"hosts": hosts, "single": single}, "logs": logs}


def _images(folder):
    with np.load(os.path.join(folder, "synthetic.npz")) as f:
        return f["images_normalized"]


def _json(folder, name):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def test_two_hosts_compute_what_one_device_computes(runs):
    hosts, single = runs["it4"]["hosts"], runs["it4"]["single"]
    got, want = _images(hosts), _images(single)
    assert got.shape == want.shape == (20, 16, 16, 1)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    assert _json(hosts, "results.json")["device"].startswith("4 x cpu")
    assert _json(single, "results.json")["device"].startswith("1 x cpu")
    # Same images, same evaluation key: the same evaluation accuracy.
    assert _json(hosts, "results.json")["accuracies"] == pytest.approx(
        _json(single, "results.json")["accuracies"], abs=1e-6)


def test_two_hosts_write_each_output_once(runs):
    hosts = runs["it4"]["hosts"]
    lines = [json.loads(line) for line in open(os.path.join(hosts, "metrics.jsonl"))]
    assert [r["iteration"] for r in lines if "event" not in r] == [0, 1, 2, 3]
    assert [r["iteration"] for r in lines if "event" in r] == [3, 4]
    for name in ("config.json", "results.json", "synthetic.npz", "synthetic.png",
                 "synthetic_3.png"):
        assert os.path.exists(os.path.join(hosts, name)), name
    assert sorted(os.listdir(os.path.join(hosts, "checkpoints"))) == ["2", "4"]
    # Both processes ran the whole program and agree on the final accuracy.
    final = [line for line in runs["logs"]["host0"].splitlines() if "final" in line]
    assert final and final == [line for line in runs["logs"]["host1"].splitlines()
                               if "final" in line]


def test_two_host_checkpoint_resumes_on_one_device(runs):
    log = runs["logs"]["resume_hosts"]
    assert "resuming from iteration 4" in log
    hosts, single = runs["it6"]["hosts"], runs["it6"]["single"]
    assert _json(hosts, "results.json")["iterations"] == 6
    assert _json(hosts, "results.json")["resumed_from_iteration"] == 4
    np.testing.assert_allclose(_images(hosts), _images(single), atol=2e-5, rtol=1e-5)
    # Two more iterations changed the images.
    assert np.abs(_images(hosts) - _images(runs["it4"]["hosts"])).max() > 1e-4


def test_ctrl_c_on_one_host_stops_both_at_the_same_checkpoint(tmp_path):
    import re
    import signal
    import time

    workdir, port = tmp_path / "run", _free_port()
    argv = ["--workdir", str(workdir), *TINY, "--iterations", "150", "--checkpoint_every",
            "1000", "--eval_every", "0", "--distributed", "--coordinator_address",
            f"localhost:{port}", "--num_processes", "2", "--process_id"]
    procs = {rank: _start(argv + [str(rank)], 2, tmp_path / "xla_cache") for rank in (0, 1)}
    metrics, deadline = workdir / "metrics.jsonl", time.time() + 240
    while time.time() < deadline and all(p.poll() is None for p in procs.values()):
        if metrics.exists() and sum(1 for _ in open(metrics)) >= 3:
            break
        time.sleep(0.2)
    try:
        assert all(p.poll() is None for p in procs.values()), "a host ended before the signal"
        procs[1].send_signal(signal.SIGINT)          # only the host that writes no outputs
        logs = {rank: proc.communicate(timeout=120)[0] for rank, proc in procs.items()}
    finally:   # hosts that disagree wait for each other forever: never leave them behind
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    for rank, proc in procs.items():
        assert proc.returncode == 130, f"host {rank}:\n{logs[rank][-3000:]}"
    stopped = [re.search(r"stopped at iteration (\d+)", logs[r]) for r in (0, 1)]
    assert all(stopped), logs
    it = int(stopped[0].group(1))
    assert int(stopped[1].group(1)) == it and 3 <= it < 150
    assert sorted(os.listdir(workdir / "checkpoints")) == [str(it)]
    assert not (workdir / "results.json").exists()
