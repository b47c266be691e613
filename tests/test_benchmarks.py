"""The iteration benchmark that a lent accelerator runs first (``benchmarks/device_run.sh``):
a device session is too short to find out there that it no longer runs."""
import json
import math

from benchmarks import iteration


def test_convnet3_forward_flops_are_the_reference_count():
    # ConvNet-3 on 32x32x3, 10 classes, 2 FLOPs per multiply-add: three 3x3 convolutions of
    # width 128 at 32, 16 and 8 pixels (each followed by a 2x2 pool), then the classifier on
    # 4x4x128 features; the reference's 0.1015 GFLOP.
    by_hand = 2 * (32 * 32 * 9 * 3 * 128 + 16 * 16 * 9 * 128 * 128 + 8 * 8 * 9 * 128 * 128
                   + 4 * 4 * 128 * 10)
    assert iteration.forward_flops("ConvNet", 10, (32, 32, 3)) == by_hand
    assert round(by_hand / 1e9, 4) == 0.1015


def test_the_iteration_benchmark_writes_the_fields_the_device_session_reads(tmp_path):
    out = tmp_path / "results.jsonl"
    returned = iteration.main(["--preset", "digits-ipc1", "--smoke", "--iters", "1",
                               "--no_parts", "--json", str(out)])
    record = json.loads(out.read_text().splitlines()[-1])
    assert record["preset"] == returned["preset"] == "digits-ipc1" and record["smoke"]
    # device_run.sh sizes the paper run from the last record's iteration_s (seconds).
    assert math.isfinite(record["iteration_s"]) and record["iteration_s"] > 0
    assert abs(record["iteration_s"] - min(record["full"]["seconds"]["all"])) < 1e-4  # 4 places
    assert record["full"]["last_metrics"]["images_finite"] == 1.0
    flops = record["flops"]
    assert flops["total"] == flops["real"] + flops["syn"] + flops["queue"] > 0
    assert record["machine"]["cpu"] and record["date"]
