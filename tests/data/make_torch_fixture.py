"""Writes torch_2_13.pt, the file made by PyTorch itself that tests/test_export.py reads.

Run once with PyTorch installed: python tests/data/make_torch_fixture.py (it was made with
PyTorch 2.13.0, CPU build). The values are formulas that test_export.fixture_expected repeats.
"""

import os

import torch

images = (torch.arange(2 * 3 * 4 * 4, dtype=torch.float32) / 7).reshape(2, 3, 4, 4)
value = {"data": [[images, torch.tensor([1, 0])]],
         "transposed": torch.arange(6, dtype=torch.float32).reshape(2, 3).t(),  # a strided view
         "counts": torch.tensor([3, -4, 5], dtype=torch.int32),
         "scalar": torch.tensor(3.5, dtype=torch.float64),
         "note": "idm-jax fixture"}
torch.save(value, os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_2_13.pt"))
