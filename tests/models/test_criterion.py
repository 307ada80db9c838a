import math

import pytest
import torch

from ddetr.models.criterion import SetCriterion, sigmoid_focal_loss

LN2 = math.log(2)


def one_target_case():
    """Two queries, two classes, all logits 0 (p = 0.5); query 0 is 0.1 below target."""
    outputs = {"pred_logits": torch.zeros(1, 2, 2),
               "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.05, 0.05]]])}
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.6, 0.2, 0.2]])}]
    return outputs, targets


def test_focal_loss_formula():
    logits = torch.tensor([-2.0, 0.0, 1.5, 3.0])
    targets = torch.tensor([0.0, 1.0, 1.0, 0.0])
    p = logits.sigmoid()
    expected = torch.where(targets > 0, -0.25 * (1 - p) ** 2 * p.log(),
                           -0.75 * p ** 2 * (1 - p).log())
    assert torch.allclose(sigmoid_focal_loss(logits, targets), expected, atol=1e-6)


def test_losses_hand_computed():
    outputs, targets = one_target_case()
    losses = SetCriterion(num_classes=2)(outputs, targets)
    # one positive: 0.25 * 0.5^2 * ln 2; three negatives: 0.75 * 0.5^2 * ln 2 each
    assert losses["loss_ce"].item() == pytest.approx((0.0625 + 3 * 0.1875) * LN2, rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(0.1, rel=1e-5)
    # IoU: overlap 0.2 x 0.1 over union 0.06 = 1/3; the enclosing box equals the union
    assert losses["loss_giou"].item() == pytest.approx(2 / 3, rel=1e-5)
    assert losses["class_error"].item() == pytest.approx(100.0)  # argmax picks class 0
    assert losses["cardinality_error"].item() == pytest.approx(1.0)  # nothing above 0.5


def test_total_uses_official_weights_on_every_head():
    outputs, targets = one_target_case()
    outputs["aux_outputs"] = [dict(outputs)]
    crit = SetCriterion(num_classes=2)
    losses = crit(outputs, targets)
    assert {"loss_ce_0", "loss_bbox_0", "loss_giou_0"} <= set(losses)
    one_head = 2 * 0.625 * LN2 + 5 * 0.1 + 2 * (2 / 3)
    assert crit.total(losses).item() == pytest.approx(2 * one_head, rel=1e-5)
    assert crit.weight("class_error") == 0 and crit.weight("loss_giou_enc") == 2


def test_encoder_losses_are_class_agnostic():
    outputs, targets = one_target_case()
    outputs["enc_outputs"] = {"pred_logits": torch.zeros(1, 2, 1),
                              "pred_boxes": outputs["pred_boxes"].clone()}
    losses = SetCriterion(num_classes=2)(outputs, targets)
    # one class: one positive and one negative
    assert losses["loss_ce_enc"].item() == pytest.approx((0.0625 + 0.1875) * LN2, rel=1e-5)
    assert losses["loss_bbox_enc"].item() == pytest.approx(0.1, rel=1e-5)


def test_normalised_by_the_number_of_boxes():
    outputs, targets = one_target_case()
    batch = {k: torch.cat([v, v]) for k, v in outputs.items()}
    losses = SetCriterion(num_classes=2)(batch, targets * 2)
    assert losses["loss_bbox"].item() == pytest.approx(0.1, rel=1e-5)


def test_images_without_targets():
    outputs, _ = one_target_case()
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    losses = SetCriterion(num_classes=2)(outputs, empty)
    # no boxes: normalised by 1; every (query, class) is a negative
    assert losses["loss_ce"].item() == pytest.approx(4 * 0.1875 * LN2, rel=1e-5)
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0


def test_gradients_flow():
    outputs, targets = one_target_case()
    outputs = {k: v.clone().requires_grad_(True) for k, v in outputs.items()}
    crit = SetCriterion(num_classes=2)
    crit.total(crit(outputs, targets)).backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0
    assert outputs["pred_boxes"].grad[0, 0].abs().sum() > 0
    assert outputs["pred_boxes"].grad[0, 1].abs().sum() == 0  # unmatched query


@pytest.mark.parametrize("label", [-1, 2])
def test_label_outside_num_classes(label):
    outputs, targets = one_target_case()
    targets[0]["labels"] = torch.tensor([label])
    with pytest.raises(ValueError, match="targets: image 0 has a label outside"):
        SetCriterion(num_classes=2)(outputs, targets)
