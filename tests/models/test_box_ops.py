import pytest
import torch

from ddetr.models.box_ops import (box_area, box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh,
                                  generalized_box_iou)


def test_format_round_trip():
    g = torch.Generator().manual_seed(0)
    boxes_cxcywh = torch.rand(10, 4, generator=g)
    back = box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(boxes_cxcywh))
    assert torch.allclose(back, boxes_cxcywh, atol=1e-6)


def test_iou_and_giou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [4.0, 0.0, 5.0, 1.0]])
    iou, union = box_iou(a, b)
    # overlap 1, union 4 + 4 - 1 = 7; identical; disjoint
    assert torch.allclose(iou, torch.tensor([[1 / 7, 1.0, 0.0]]))
    assert torch.allclose(union, torch.tensor([[7.0, 4.0, 5.0]]))
    giou = generalized_box_iou(a, b)
    # enclosing boxes: 3x3 = 9, 2x2 = 4, 5x2 = 10
    expected = torch.tensor([[1 / 7 - (9 - 7) / 9, 1.0, 0.0 - (10 - 5) / 10]])
    assert torch.allclose(giou, expected)
    assert torch.allclose(box_area(b), torch.tensor([4.0, 4.0, 1.0]))


def test_giou_range_and_symmetry():
    g = torch.Generator().manual_seed(1)
    a = box_cxcywh_to_xyxy(torch.rand(7, 4, generator=g))
    b = box_cxcywh_to_xyxy(torch.rand(5, 4, generator=g))
    giou = generalized_box_iou(a, b)
    assert giou.shape == (7, 5)
    assert (giou <= 1).all() and (giou >= -1).all()
    assert torch.allclose(giou, generalized_box_iou(b, a).T)


@pytest.mark.parametrize("bad", [[2.0, 0.0, 1.0, 1.0], [0.0, 3.0, 1.0, 1.0],
                                 [0.0, 0.0, float("nan"), 1.0]])
def test_degenerate_boxes_are_caught(bad):
    good = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match=r"boxes2_xyxy: box \(1,\)"):
        generalized_box_iou(good, torch.tensor([[0.0, 0.0, 1.0, 1.0], bad]))
