"""Golden outputs: fixed weights and a fixed input, outputs stored once and compared forever.

OpenCV parity checks meaning; this catches any later change in what the parser, the builder or the
decode compute, even one OpenCV would share. To regenerate after an intended change:
``WRITE_EXPECT=1 .venv/bin/python -m pytest tests/test_expect.py`` and commit tests/data/expect/.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from models.darknet import Darknet
from models.io import load_darknet_weights, save_darknet_weights
from tests.conftest import TEST_DATA, tame_model

EXPECT = TEST_DATA / "expect"
CASES = ["exotic-layers"]


def _input() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(2024).random((1, 3, 64, 64), dtype=np.float32))


@pytest.mark.parametrize("name", CASES)
def test_outputs_match_stored(name):
    weights, outputs = EXPECT / f"{name}.weights", EXPECT / f"{name}.npz"
    cfg = TEST_DATA / f"{name}.cfg"
    if os.environ.get("WRITE_EXPECT"):
        EXPECT.mkdir(exist_ok=True)
        save_darknet_weights(tame_model(cfg), weights)
    model = Darknet(cfg)
    load_darknet_weights(model, weights)
    with torch.no_grad():
        dets, raw = model.eval()(_input())
    if os.environ.get("WRITE_EXPECT"):  # writing is not checking: this run compares nothing
        np.savez(outputs, dets=dets.numpy(), **{f"raw{i}": r.numpy() for i, r in enumerate(raw)})
        pytest.skip(f"wrote {outputs}; run again without WRITE_EXPECT to compare")
    stored = np.load(outputs)
    np.testing.assert_allclose(dets.numpy(), stored["dets"], rtol=1e-5, atol=1e-5)
    for i, r in enumerate(raw):
        np.testing.assert_allclose(r.numpy(), stored[f"raw{i}"], rtol=1e-5, atol=1e-5)
