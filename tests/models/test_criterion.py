import math

import pytest
import torch

from ddetr.models.criterion import SetCriterion, sigmoid_focal_loss
from ddetr.models.matcher import HungarianMatcher

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


def softmax_case():
    """Two queries, two real classes plus "no object"; query 0 (0.1 below the target)
    is the only one near the target of class 1."""
    outputs = {"pred_logits": torch.tensor([[[0.0, 1.0, 0.0], [2.0, 0.0, 1.0]]]),
               "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.05, 0.05]]])}
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.6, 0.2, 0.2]])}]
    return outputs, targets


def test_softmax_losses_hand_computed():
    outputs, targets = softmax_case()
    crit = SetCriterion(num_classes=2, classification="softmax", eos_coef=0.1)
    losses = crit(outputs, targets)
    e = math.e
    # query 0 targets class 1 (weight 1): -log(e / (1 + e + 1)); query 1 "no object"
    # (weight 0.1): -log(e / (e^2 + 1 + e)); the mean weighted by 1 and 0.1
    ce0 = -math.log(e / (2 + e))
    ce1 = -math.log(e / (e ** 2 + 1 + e))
    assert losses["loss_ce"].item() == pytest.approx((ce0 + 0.1 * ce1) / 1.1, rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(0.1, rel=1e-5)
    assert losses["loss_giou"].item() == pytest.approx(2 / 3, rel=1e-5)
    assert losses["class_error"].item() == pytest.approx(0.0)  # query 0's best is class 1
    # query 0 predicts class 1, query 1 class 0: two objects for one target
    assert losses["cardinality_error"].item() == pytest.approx(1.0)
    assert crit.weight("loss_ce") == 1 and crit.weight("loss_bbox_0") == 5


def test_softmax_matches_cross_entropy_with_no_object_weight():
    g = torch.Generator().manual_seed(0)
    outputs = {"pred_logits": torch.randn(2, 6, 4, generator=g),
               "pred_boxes": torch.rand(2, 6, 4, generator=g) * 0.4 + 0.3}
    targets = [{"labels": torch.tensor([2, 0]), "boxes": torch.rand(2, 4, generator=g) * 0.4 + 0.3},
               {"labels": torch.tensor([1]), "boxes": torch.rand(1, 4, generator=g) * 0.4 + 0.3}]
    crit = SetCriterion(num_classes=3, classification="softmax", eos_coef=0.25)
    indices = crit.matcher(outputs, targets)
    target = torch.full((2, 6), 3)
    for i, (rows, cols) in enumerate(indices):
        target[i, rows] = targets[i]["labels"][cols]
    log_p = outputs["pred_logits"].log_softmax(-1)
    nll = -log_p.gather(-1, target[..., None])[..., 0]
    w = torch.where(target == 3, 0.25, 1.0)
    expected = (w * nll).sum() / w.sum()
    assert crit(outputs, targets)["loss_ce"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_softmax_aux_losses_and_gradients():
    outputs, targets = softmax_case()
    outputs = {k: v.clone().requires_grad_(True) for k, v in outputs.items()}
    outputs["aux_outputs"] = [{"pred_logits": outputs["pred_logits"] * 2,
                               "pred_boxes": outputs["pred_boxes"]}]
    crit = SetCriterion(num_classes=2, classification="softmax")
    losses = crit(outputs, targets)
    assert {"loss_ce_0", "loss_bbox_0", "loss_giou_0"} <= set(losses)
    crit.total(losses).backward()
    assert outputs["pred_logits"].grad[0, 1].abs().sum() > 0  # "no object" query learns too


def test_softmax_bad_arguments():
    outputs, targets = softmax_case()
    with pytest.raises(ValueError, match="pred_logits has 3 classes"):
        SetCriterion(num_classes=3, classification="softmax")(outputs, targets)
    with pytest.raises(ValueError, match="pred_logits has 3 classes"):
        SetCriterion(num_classes=2)(outputs, targets)  # sigmoid: no "no object" class
    with pytest.raises(ValueError, match="eos_coef"):
        SetCriterion(num_classes=2, classification="softmax", eos_coef=-0.1)
    with pytest.raises(ValueError, match="matcher"):
        SetCriterion(num_classes=2, matcher=HungarianMatcher(), classification="softmax")
    with pytest.raises(ValueError, match="classification"):
        SetCriterion(num_classes=2, classification="softmax_focal")
