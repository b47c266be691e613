"""The dataset transfer in parts: split, receive over several calls, rebuild bit for bit."""

import os

import numpy as np
import pytest

from benchmarks import transfer


def make_folder(path, sizes):
    rng = np.random.default_rng(0)
    os.makedirs(path)
    for i, size in enumerate(sizes):
        with open(os.path.join(path, f"f{i}.npy"), "wb") as f:
            f.write(rng.integers(0, 256, size, dtype=np.uint8).tobytes())


def test_parts_received_over_several_calls_rebuild_every_file(tmp_path):
    source, parts, dest = tmp_path / "src", tmp_path / "parts", tmp_path / "dest"
    make_folder(source, [2500, 10, 0, 1000])             # files cross part boundaries
    manifest = transfer.split(str(source), str(parts), 1000)
    assert [p["size"] for p in manifest["parts"]] == [1000, 1000, 1000, 510]
    first, second = tmp_path / "call1", tmp_path / "call2"
    for folder, names in ((first, ["manifest.json", "part-000", "part-001"]),
                          (second, ["part-002", "part-003"])):
        os.makedirs(folder)
        for name in names:
            os.link(parts / name, folder / name)
    assert transfer.receive(str(first), str(dest)) is False
    assert transfer.receive(str(second), str(dest)) is True
    for name in os.listdir(source):
        assert (dest / name).read_bytes() == (source / name).read_bytes()


def test_a_damaged_part_is_named(tmp_path):
    source, parts = tmp_path / "src", tmp_path / "parts"
    make_folder(source, [3000])
    transfer.split(str(source), str(parts), 1000)
    with open(parts / "part-001", "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))
    with pytest.raises(SystemExit, match="part-001 is damaged"):
        transfer.receive(str(parts), str(tmp_path / "dest"))
