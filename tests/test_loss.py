"""The detection loss: darknet anchor assignment per head, decoding like the head, components, gradients."""

from __future__ import annotations

import torch

from models.darknet import Darknet
from tests.conftest import REPO
from utils.loss import YoloLoss, decode_box


def small_model():
    torch.manual_seed(0)
    return Darknet(REPO / "cfg" / "yolo-small.cfg").train()


def test_a_target_goes_to_its_best_anchor_cell_and_head():
    model = small_model()
    loss = YoloLoss(model.yolo_heads, img_size=128)
    preds = model(torch.rand(2, 3, 128, 128))
    # anchors 6,9 14,17 23,36 (stride 16 head) and 50,50 83,104 212,196 (stride 32 head)
    targets = torch.tensor([[1, 2, 70 / 128, 40 / 128, 50 / 128, 50 / 128]])
    pos = loss.assign(preds, targets, (128, 128))
    big = next(p for p, h in zip(pos, model.yolo_heads) if h.anchors[0, 0] == 50)
    hit = (big.a == 0).nonzero().flatten()
    assert len(hit) == 1
    k = hit[0]
    assert (big.b[k], big.gj[k], big.gi[k], big.tcls[k]) == (1, 40 // 32, 70 // 32, 2)
    torch.testing.assert_close(big.tbox[k], torch.tensor([70 / 32 - 2, 40 / 32 - 1, 50 / 32, 50 / 32]))


def test_loss_box_decoding_matches_the_heads_decode():
    """The loss optimises what inference outputs: the same box for a positive, scale_x_y included."""
    model = small_model()
    raw = model(torch.rand(1, 3, 128, 128))
    head, p = model.yolo_heads[0], raw[0]
    assert head.scale_x_y != 1.0
    stride = 128 / p.shape[2]
    a, gj, gi = 1, 2, 3
    box = decode_box(head, p[0, a, gj, gi][None], head.anchors[a][None] / stride)[0]
    dec = head.decode(p, 128, 128).view(1, head.na, p.shape[2], p.shape[3], -1)[0, a, gj, gi]
    torch.testing.assert_close((box[:2] + torch.tensor([gi, gj])) * stride, dec[:2])
    torch.testing.assert_close(box[2:] * stride, dec[2:4])


def test_components_positives_and_gradients():
    model = small_model()
    loss = YoloLoss(model.yolo_heads, img_size=128)
    targets = torch.tensor([[0, 0, 0.5, 0.5, 0.3, 0.2], [1, 5, 0.2, 0.7, 0.1, 0.1]])
    out = loss(model(torch.rand(2, 3, 128, 128)), targets, (128, 128))
    assert out.components.shape == (3,) and (out.components > 0).all()
    assert out.total.requires_grad and not out.components.requires_grad
    assert sum(len(p.b) for p in out.positives) >= 2
    out.total.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    empty = loss(model(torch.rand(1, 3, 128, 128)), torch.zeros(0, 6), (128, 128))
    assert empty.components[0] == 0 and empty.components[2] == 0 and empty.components[1] > 0
