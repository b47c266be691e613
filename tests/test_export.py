"""Exported layouts round-trip; the .pt codec reads PyTorch's files and writes its format."""

import collections
import json
import os
import pickletools
import zipfile

import numpy as np
import pytest
from PIL import Image

from idm_jax import partition
from idm_jax.runs import export, torch_format

# Written by PyTorch 2.13.0 (CPU) with tests/data/make_torch_fixture.py.
FIXTURE = os.path.join(os.path.dirname(__file__), "data", "torch_2_13.pt")


def fixture_expected():
    """The values make_torch_fixture.py saved, from the same formulas."""
    images = (np.arange(2 * 3 * 4 * 4, dtype=np.float32) / 7).reshape(2, 3, 4, 4)
    return {"data": [[images, np.array([1, 0], np.int64)]],
            "transposed": np.arange(6, dtype=np.float32).reshape(2, 3).T,
            "counts": np.array([3, -4, 5], np.int32),
            "scalar": np.array(3.5, np.float64),
            "note": "idm-jax fixture"}


def assert_same(a, b):
    if isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


def test_a_file_written_by_pytorch_is_read():
    assert_same(fixture_expected(), torch_format.load(FIXTURE))


def pickle_globals(raw: bytes) -> set:
    return {arg for op, arg, _ in pickletools.genops(raw) if op.name == "GLOBAL"}


def test_written_files_have_pytorchs_records_and_read_back(tmp_path):
    path = str(tmp_path / "mine.pt")
    value = fixture_expected()
    torch_format.save(path, value)
    assert_same(value, torch_format.load(path))

    def layout(p):
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
            prefix = names[0].split("/")[0]
            records = {n[len(prefix) + 1:] for n in names}
            pkl = z.read(f"{prefix}/data.pkl")
            offsets = {}
            for info in z.infolist():
                if "/data/" in info.filename:
                    with open(p, "rb") as f:   # where the payload starts in the file
                        f.seek(info.header_offset + 26)
                        name_len = int.from_bytes(f.read(2), "little")
                        extra_len = int.from_bytes(f.read(2), "little")
                    offsets[info.filename] = info.header_offset + 30 + name_len + extra_len
        return records, pickle_globals(pkl), offsets

    ours, ours_globals, ours_offsets = layout(path)
    theirs, their_globals, their_offsets = layout(FIXTURE)
    assert {"data.pkl", "byteorder", "version"} <= ours
    assert {r for r in ours if r.startswith("data/")} == {r for r in theirs
                                                          if r.startswith("data/")}
    assert ours_globals == their_globals
    assert all(o % 64 == 0 for o in their_offsets.values())      # what PyTorch does
    assert all(o % 64 == 0 for o in ours_offsets.values())
    try:                               # with PyTorch installed, it reads our file itself
        import torch
    except ImportError:
        return
    loaded = torch.load(path, weights_only=True)
    np.testing.assert_array_equal(loaded["data"][0][0].numpy(), value["data"][0][0])


def test_expanded_set_is_class_major_and_matches_a_loop_over_pieces():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(6, 8, 8, 3)).astype(np.float32)
    labels = np.repeat(np.arange(3), 2)
    for scheme in ("uniform", "multiscale", "nonuniform"):
        pieces = partition.pieces_per_image(scheme, 2)
        expanded = np.asarray(partition.expand(images, scheme, 2, 0.4))   # piece-major
        x, y = export.expanded_set(images, labels, scheme, 2, 0.4)
        # Reference: class by class, piece by piece, image by image.
        want = [expanded[p * 6 + i] for c in range(3) for p in range(pieces)
                for i in np.flatnonzero(labels == c)]
        np.testing.assert_array_equal(x, np.stack(want))
        np.testing.assert_array_equal(y, np.repeat(np.arange(3), 2 * pieces))


def test_npz_round_trip_and_a_file_with_other_keys(tmp_path):
    rng = np.random.default_rng(0)
    mean, std = np.array([0.4, 0.5, 0.6]), np.array([0.2, 0.25, 0.3])
    pixels = rng.uniform(0, 1, size=(6, 8, 8, 3)).astype(np.float32)
    path = str(tmp_path / "set.npz")
    export.export_npz(path, (pixels - mean) / std, np.repeat(np.arange(3), 2), mean, std)
    loaded = export.load_npz(path)
    np.testing.assert_allclose(loaded["images"], pixels, atol=1e-6)
    np.testing.assert_array_equal(loaded["labels"], np.repeat(np.arange(3), 2))
    np.savez(str(tmp_path / "bad.npz"), pictures=pixels)
    with pytest.raises(ValueError, match="lacks"):
        export.load_npz(str(tmp_path / "bad.npz"))
    with open(path, "rb") as f:
        head = f.read(200)
    with open(tmp_path / "cut.npz", "wb") as f:
        f.write(head)
    with pytest.raises(ValueError, match="cut.npz is not a readable"):
        export.load_npz(str(tmp_path / "cut.npz"))


def test_every_layout_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    mean, std = np.array([0.5, 0.4, 0.3], np.float32), np.array([0.2, 0.25, 0.3], np.float32)
    stored = ((rng.uniform(0, 1, (4, 8, 8, 3)) - mean) / std).astype(np.float32)
    labels = np.repeat(np.arange(2), 2)
    tmp_path = tmp_path / "made" / "by" / "export_set"      # a folder that does not exist yet
    meta = export.export_set(
        str(tmp_path), stored, labels, mean, std, dataset="cifar10", class_names=("cat", "dog"),
        model="ConvNet", ipc=2, partition_expand=True, partition_scheme="uniform",
        partition_factor=2, partition_ratio=0.4, iteration=7, code_version="abc")
    train_x, train_y = export.expanded_set(stored, labels)

    npz = export.load_set(str(tmp_path / "synthetic.npz"))
    np.testing.assert_array_equal(npz["images_normalized"], stored)
    assert bool(npz["partition_expand"]) and str(npz["partition_scheme"]) == "uniform"
    expanded = export.load_set(str(tmp_path / "synthetic_expanded.npz"))
    np.testing.assert_array_equal(expanded["images_normalized"], train_x)
    np.testing.assert_array_equal(expanded["labels"], train_y)
    for path in (tmp_path / "res_IDM_CIFAR10_ConvNet_2ipc.pt", tmp_path / "dd_ranking",
                 tmp_path / "dd_ranking" / "images.pt"):
        got = export.load_set(str(path))
        np.testing.assert_array_equal(got["images_normalized"], train_x)
        np.testing.assert_array_equal(got["labels"], train_y)
        assert got["partition_expand"] is False
    raw = torch_format.load(str(tmp_path / "res_IDM_CIFAR10_ConvNet_2ipc.pt"))
    assert raw["data"][0][0].shape == (16, 3, 8, 8) and raw["data"][0][1].dtype == np.int64

    folders = sorted(os.listdir(tmp_path / "synthetic_png"))
    assert folders == ["000_cat", "001_dog"]
    first = np.asarray(Image.open(tmp_path / "synthetic_png" / "001_dog" / "00000.png"))
    want = np.round(np.clip(train_x[8] * std + mean, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(first, want)
    assert all(len(os.listdir(tmp_path / "synthetic_png" / d)) == 8 for d in folders)

    with open(tmp_path / "synthetic.json") as f:
        saved = json.load(f)
    assert saved == meta
    assert (saved["stored_ipc"], saved["effective_ipc"], saved["pieces_per_image"]) == (2, 8, 4)
    assert saved["code_version"] == "abc" and saved["iteration"] == 7
    np.testing.assert_allclose(saved["mean"], mean)


def test_sets_that_cannot_be_evaluated_are_refused_with_the_file(tmp_path):
    torch_format.save(str(tmp_path / "images.pt"), np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(FileNotFoundError, match="labels.pt"):
        export.load_set(str(tmp_path / "images.pt"))
    torch_format.save(str(tmp_path / "labels.pt"), np.zeros((2, 10), np.float32))
    with pytest.raises(ValueError, match="soft labels"):
        export.load_set(str(tmp_path))
    with open(tmp_path / "junk.pt", "wb") as f:
        f.write(b"not a zip")
    with pytest.raises(ValueError, match="junk.pt is not a torch.save file"):
        export.load_set(str(tmp_path / "junk.pt"))
    odd = collections.OrderedDict(data=[[np.zeros((2, 3, 4, 4), np.float32)]])
    torch_format.save(str(tmp_path / "odd.pt"), odd)
    with pytest.raises(ValueError, match="DC-BENCH"):
        export.load_set(str(tmp_path / "odd.pt"))


def test_the_evaluate_cli_reads_another_toolkits_set(tmp_path, monkeypatch):
    from experiments import evaluate as evaluate_cli
    from idm_jax import evaluation

    rng = np.random.default_rng(2)
    images = rng.normal(size=(20, 1, 16, 16)).astype(np.float32)       # NCHW, normalised
    labels = np.repeat(np.arange(10), 2).astype(np.int64)
    os.makedirs(tmp_path / "release")
    torch_format.save(str(tmp_path / "release" / "images.pt"), images)
    torch_format.save(str(tmp_path / "release" / "labels.pt"), labels)
    seen = {}

    def spy(key, x, y, *args, **kwargs):
        seen.update(x=np.asarray(x), y=np.asarray(y), **kwargs)
        return {"accuracies": [10.0], "mean": 10.0, "std": 0.0, "seconds": 0.0}

    monkeypatch.setattr(evaluation, "evaluate_synset", spy)
    evaluate_cli.main(["--set", str(tmp_path / "release"), "--dataset", "digits",
                       "--source", "digits", "--arch", "ConvNetW32", "--epochs", "0",
                       "--num_eval", "1", "--out", str(tmp_path / "eval.json")])
    np.testing.assert_array_equal(seen["x"], images.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(seen["y"], labels)
    assert seen["expand"] is False
    assert callable(seen["progress"])          # the CLI shows the evaluation's progress
