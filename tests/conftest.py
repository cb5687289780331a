"""Shared test fixtures: every cfg the project ships or the reference set holds, and tame models."""

from __future__ import annotations

import copy
import functools
import hashlib
import os
from pathlib import Path

import pytest

from models.darknet import Darknet
from utils.torch_utils import tame_random_weights

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference" / "darknet-cfg"
TEST_DATA = Path(__file__).resolve().parent / "data"


def all_cfgs() -> list[Path]:
    """cfg/*.cfg, then every reference cfg whose content is not already among them."""
    seen: set[str] = set()
    out = []
    for path in [*sorted((REPO / "cfg").glob("*.cfg")), *sorted(REFERENCE.glob("*.cfg")),
                 *sorted(TEST_DATA.glob("*.cfg"))]:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            out.append(path)
    return out


def cfg_id(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


CFGS = all_cfgs()


@functools.cache
def _tame(path: Path) -> Darknet:
    return tame_random_weights(Darknet(path), seed=0, img_size=64)


def tame_model(path: Path) -> Darknet:
    """A fresh copy of the cfg's model with tame random weights (built once per session)."""
    return copy.deepcopy(_tame(path))


def rel_err(a, b) -> float:
    """max |a - b| / max |b|: one number for how far a tensor is from its reference."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.fixture(params=CFGS, ids=cfg_id)
def cfg_path(request) -> Path:
    return request.param


def pytest_collection_modifyitems(items):
    """Every test that runs on the tiny benchmark (the ``shapes_data`` fixture) is an end-to-end run:
    marked ``slow`` (the others that are slow carry the mark themselves)."""
    for item in items:
        if "shapes_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def _share_the_cores():
    """Under ``pytest -n N`` the workers split the cores instead of each running as many threads as
    there are cores (which would make every worker slower than running alone)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(scope="session", autouse=True)
def _label_cache(tmp_path_factory):
    """Label caches of the test datasets go to a session folder, not the user's ~/.cache."""
    os.environ["YOLO_COMPRESS_CACHE"] = str(tmp_path_factory.mktemp("label-cache"))


TINY_SHAPES = dict(n_train=8, n_val=4, img_min=64, img_max=96, max_objects=3, size_min=0.15)


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> Path:
    """A tiny copy of the built-in benchmark (8 train, 4 val images): the .data file."""
    import dataclasses

    from utils.synthetic import DEFAULT_PARAMS, generate_shapes

    root = tmp_path_factory.mktemp("shapes") / "shapes"
    return generate_shapes(root, dataclasses.replace(DEFAULT_PARAMS, **TINY_SHAPES))
