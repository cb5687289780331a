"""Layer arithmetic checked against darknet's own formulas (for what OpenCV cannot read)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.layers import activation
from models.options import ACTIVATIONS

TEST_NET = "[net]\nwidth=32\nheight=32\nchannels=3\n"


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _softplus(x):  # darknet's softplus with threshold 20
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))


# darknet's activations.h, written out independently of the torch modules
DARKNET = {
    "linear": lambda x: x,
    "leaky": lambda x: np.where(x > 0, x, 0.1 * x),
    "relu": lambda x: x * (x > 0),
    "relu6": lambda x: np.clip(x, 0, 6),
    "mish": lambda x: x * np.tanh(_softplus(x)),
    "swish": lambda x: x * _sigmoid(x),
    "logistic": _sigmoid,
    "tanh": lambda x: (np.exp(2 * x) - 1) / (np.exp(2 * x) + 1),
    "elu": lambda x: (x >= 0) * x + (x < 0) * (np.exp(x) - 1),
    "selu": lambda x: (x >= 0) * 1.0507 * x + (x < 0) * 1.0507 * 1.6732 * (np.exp(x) - 1),
    "gelu": lambda x: 0.5 * x * (1 + np.tanh(0.797885 * x + 0.035677 * x ** 3)),
    "hard_mish": lambda x: np.where(x > 0, x, np.where(x > -2, x * x / 2 + x, 0)),
}


def test_every_activation_has_a_darknet_formula_here():
    assert set(DARKNET) == set(ACTIVATIONS)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_matches_darknet(name):
    x = np.linspace(-8, 8, 4001)
    ours = activation(name)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, DARKNET[name](x), rtol=2e-6, atol=2e-6)


def test_upsample_scale_multiplies():
    from models.cfg import parse_cfg
    from models.darknet import Darknet

    text = (TEST_NET + "[upsample]\nstride=2\nscale=0.5\n[convolutional]\nfilters=7\nsize=1\n"
            "activation=linear\n[yolo]\nmask=0\nanchors=8,8\nclasses=2\nnum=1\n")
    up = Darknet(parse_cfg(text)).layers[0]
    x = torch.rand(1, 3, 2, 2)
    assert torch.equal(up(x), x.repeat_interleave(2, 2).repeat_interleave(2, 3) * 0.5)

