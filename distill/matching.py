"""Which teacher outputs and feature maps a student's are compared with: matched by stride.

Layer indices mean nothing across two networks (a layer-pruned student has fewer layers, a
channel-pruned one narrower ones), so partners are found by what both networks share: the stride.

- **Heads**: every student ``[yolo]`` head is paired with the teacher head of the same stride; both
  must have the same number of anchors, since outputs are compared anchor cell by anchor cell.
- **Features**: at each head's stride, the feature map that feeds the head's output conv (found
  through the layer graph: ``[yolo]`` ← its conv ← that conv's input). This is the neck output the
  detector reads (the features Wang et al., 2019 imitate). Channel counts may differ: the feature
  terms compare attention maps, which sum over channels.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.darknet import Darknet
from models.shapes import IMAGE, infer_shapes
from utils.errors import UserError


@dataclass(frozen=True)
class FeatureTap:
    stride: float
    layer: int  # the layer whose output is the feature map


def feature_taps(model: Darknet) -> list[FeatureTap]:
    """One feature map per distinct head stride, in the order the heads come."""
    shapes = infer_shapes(model.cfg)
    size = model.cfg.net["height"]
    taps: dict[float, FeatureTap] = {}
    for h in model.heads:
        (conv,) = model.inputs[h]
        src = model.inputs[conv][0]
        if src == IMAGE:
            raise UserError(f"{model.cfg.layers[h].where()}: the head's conv reads the image; "
                            f"there is no feature map to imitate")
        stride = size / shapes[src].h
        taps.setdefault(stride, FeatureTap(stride, src))
    return list(taps.values())


def match_heads(student: Darknet, teacher: Darknet, teacher_name: str) -> list[int]:
    """For each student head (in order), the position of the teacher head it is compared with."""
    if teacher.cfg.classes != student.cfg.classes:
        raise UserError(f"--t_weights {teacher_name}: the teacher predicts {teacher.cfg.classes} classes, "
                        f"the student {student.cfg.classes}; distillation compares class scores one to "
                        f"one, so the teacher must be trained on the same classes (--data)")
    t_strides = teacher.strides()
    pairs = []
    for s_head, stride in zip(student.yolo_heads, student.strides()):
        found = [k for k, t in enumerate(t_strides) if abs(t - stride) < 1e-6]
        if not found:
            raise UserError(f"--t_weights {teacher_name}: the student has a head at stride {stride:g}, "
                            f"the teacher only at {', '.join(f'{t:g}' for t in t_strides)}")
        k = found[0]
        if teacher.yolo_heads[k].na != s_head.na:
            raise UserError(f"--t_weights {teacher_name}: at stride {stride:g} the student head has "
                            f"{s_head.na} anchors, the teacher's {teacher.yolo_heads[k].na}; outputs are "
                            f"compared anchor by anchor")
        pairs.append(k)
    return pairs


def match_features(student: Darknet, teacher: Darknet) -> list[tuple[FeatureTap, FeatureTap]]:
    """(student tap, teacher tap) for every stride where both have a feature map."""
    t_taps = {round(t.stride, 6): t for t in feature_taps(teacher)}
    return [(s, t_taps[round(s.stride, 6)]) for s in feature_taps(student) if round(s.stride, 6) in t_taps]
