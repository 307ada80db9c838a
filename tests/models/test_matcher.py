import itertools
import math

import pytest
import torch

from ddetr.models.matcher import HungarianMatcher


def brute_force_cost(cost: torch.Tensor) -> float:
    """Minimum total cost over every injective map of targets (columns) to queries."""
    q, t = cost.shape
    return min(sum(cost[rows[j], j].item() for j in range(t))
               for rows in itertools.permutations(range(q), t))


def random_case(seed, n=2, q=5, c=3, sizes=(3, 2)):
    g = torch.Generator().manual_seed(seed)
    outputs = {"pred_logits": torch.randn(n, q, c, generator=g),
               "pred_boxes": torch.rand(n, q, 4, generator=g) * 0.5 + 0.25}
    targets = [{"labels": torch.randint(0, c, (k,), generator=g),
                "boxes": torch.rand(k, 4, generator=g) * 0.5 + 0.25} for k in sizes]
    return outputs, targets


@pytest.mark.parametrize("seed", range(6))
def test_matching_is_optimal(seed):
    matcher = HungarianMatcher()
    outputs, targets = random_case(seed, sizes=(4, 2))
    indices = matcher(outputs, targets)
    for i, (rows, cols) in enumerate(indices):
        cost = matcher.cost_matrix(outputs["pred_logits"][i], outputs["pred_boxes"][i],
                                   targets[i]["labels"], targets[i]["boxes"])
        assert len(rows) == len(targets[i]["labels"])
        assert len(set(rows.tolist())) == len(rows)  # one query per target
        assert sorted(cols.tolist()) == list(range(len(cols)))
        total = cost[rows, cols].sum().item()
        assert total == pytest.approx(brute_force_cost(cost), abs=1e-5)


def test_cost_matrix_hand_computed():
    matcher = HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2)
    logits = torch.tensor([[0.0, 2.0]])          # p = 0.5, sigmoid(2)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    tgt = torch.tensor([[0.5, 0.5, 0.2, 0.2]])   # identical box: L1 0, GIoU 1
    cost = matcher.cost_matrix(logits, boxes, torch.tensor([0]), tgt)
    p = 0.5
    focal = 0.25 * (1 - p) ** 2 * -torch.log(torch.tensor(p)) - 0.75 * p ** 2 * -torch.log(torch.tensor(1 - p))
    assert cost.item() == pytest.approx(2 * focal.item() + 0 - 2 * 1.0, abs=1e-5)


def test_obvious_assignment():
    # query 0 sits on target 1, query 2 on target 0
    outputs = {"pred_logits": torch.zeros(1, 3, 2),
               "pred_boxes": torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.3, 0.3],
                                            [0.8, 0.8, 0.1, 0.1]]])}
    targets = [{"labels": torch.tensor([0, 1]),
                "boxes": torch.tensor([[0.8, 0.8, 0.1, 0.1], [0.2, 0.2, 0.1, 0.1]])}]
    rows, cols = HungarianMatcher()(outputs, targets)[0]
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 2: 0}


def test_images_without_targets():
    outputs, targets = random_case(0, sizes=(0, 2))
    indices = HungarianMatcher()(outputs, targets)
    assert len(indices[0][0]) == 0 and indices[0][0].dtype == torch.int64
    assert len(indices[1][0]) == 2
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    assert all(len(r) == 0 for r, _ in HungarianMatcher()(outputs, empty))


def test_more_targets_than_queries():
    outputs, targets = random_case(3, q=2, sizes=(4, 1))
    rows, cols = HungarianMatcher()(outputs, targets)[0]
    assert len(rows) == 2 and len(set(cols.tolist())) == 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="cost_class"):
        HungarianMatcher(0, 0, 0)
    outputs, targets = random_case(0)
    with pytest.raises(ValueError, match="targets"):
        HungarianMatcher()(outputs, targets[:1])


def test_softmax_cost_matrix_hand_computed():
    # DETR's costs: class 1 (minus the softmax probability of the target class), L1 5,
    # GIoU 2; the softmax runs over the two real classes and "no object"
    matcher = HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2, classification="softmax")
    logits = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.5, 0.6, 0.2, 0.2]])
    tgt = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]])
    cost = matcher.cost_matrix(logits, boxes, torch.tensor([0, 1]), tgt)
    e = math.e
    p0 = [e / (e + 1 + e ** 2), 1 / (e + 1 + e ** 2)]  # query 0: classes 0 and 1
    # query 1 is 0.1 below both targets (L1 0.1, IoU 1/3, GIoU 1/3), query 0 on them
    # query 1's logits are all 0: p = 1/3 for every class
    expected = torch.tensor([[-p0[0] - 2, -p0[1] - 2],
                             [-1 / 3 + 5 * 0.1 - 2 / 3, -1 / 3 + 5 * 0.1 - 2 / 3]])
    torch.testing.assert_close(cost, expected, atol=1e-5, rtol=0)


def test_softmax_matching_prefers_the_probable_class():
    # same boxes: only the class cost decides; query 1 is sure of class 1, query 0 of 0
    outputs = {"pred_logits": torch.tensor([[[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]]]),
               "pred_boxes": torch.full((1, 2, 4), 0.3)}
    targets = [{"labels": torch.tensor([1, 0]), "boxes": torch.full((2, 4), 0.3)}]
    rows, cols = HungarianMatcher(1, 5, 2, classification="softmax")(outputs, targets)[0]
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 1: 0}


def test_bad_classification():
    with pytest.raises(ValueError, match="classification"):
        HungarianMatcher(classification="focal")
