"""Compare two trees of run folders bit for bit: every ``synthetic.npz`` and every iteration's
metrics (all but the wall time), folder by folder.

    python -m benchmarks.compare_runs BEFORE AFTER

Used to show that a refactor leaves the faithful runs unchanged: make the same runs from the
old and the new commit into two trees (see BENCHMARKS.md, "Bit-for-bit checks"), then compare.
Exits 0 when everything is identical, 1 otherwise.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np


def iteration_records(path: str) -> dict:
    records = {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if "event" not in record:
                records[record["iteration"]] = {k: v for k, v in record.items()
                                                if k != "seconds"}
    return records


def compare(before: str, after: str) -> bool:
    same = True
    for folder, _, files in sorted(os.walk(before)):
        twin = os.path.join(after, os.path.relpath(folder, before))
        name = os.path.relpath(folder, before)
        if "synthetic.npz" in files:
            a, b = (np.load(os.path.join(d, "synthetic.npz")) for d in (folder, twin))
            for key in ("images_normalized", "labels"):
                equal = np.array_equal(a[key], b[key])
                same &= equal
                print(f"{name} synthetic.npz {key}: {'identical' if equal else 'DIFFERENT'}")
        if "metrics.jsonl" in files:
            a, b = (iteration_records(os.path.join(d, "metrics.jsonl")) for d in (folder, twin))
            differ = sorted(i for i in a if a[i] != b.get(i)) + sorted(set(b) - set(a))
            same &= not differ
            print(f"{name} metrics.jsonl: {len(a)} iterations, "
                  f"{'every metric identical' if not differ else f'differ at {differ[:5]}'}")
    print("ALL IDENTICAL" if same else "SOME DIFFER")
    return same


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: python -m benchmarks.compare_runs BEFORE AFTER", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(0 if compare(sys.argv[1], sys.argv[2]) else 1)
