import logging

import pytest
import torch
from torch import nn

from ddetr.data.coco import CocoDetection
from ddetr.data.transforms import val_transforms
from ddetr.engine.evaluate import coco_stats, evaluate, to_coco_results
from tests.data.test_coco import write_dataset


def test_to_coco_results_converts_boxes():
    det = {"scores": torch.tensor([0.9]), "labels": torch.tensor([3]),
           "boxes": torch.tensor([[5.0, 6.0, 15.0, 26.0]])}
    (record,) = to_coco_results([det], [7])
    assert record == {"image_id": 7, "category_id": 3, "bbox": [5.0, 6.0, 10.0, 20.0],
                      "score": pytest.approx(0.9)}


def test_perfect_detections_score_one(tmp_path):
    ds = CocoDetection(*write_dataset(tmp_path))
    records = [{"image_id": 1, "category_id": 3, "bbox": [5, 5, 10, 10], "score": 0.9},
               {"image_id": 1, "category_id": 2, "bbox": [30, 20, 10, 10], "score": 0.8}]
    # the second ground-truth box is [30, 20, 20, 20] in the file (evaluation uses the file)
    records[1]["bbox"] = [30, 20, 20, 20]
    stats, summary = coco_stats(ds.coco, records, ds.ids)
    assert len(stats) == 12 and stats[0] == pytest.approx(1.0) and stats[1] == pytest.approx(1.0)
    assert "Average Precision" in summary


def test_no_detections(tmp_path):
    ds = CocoDetection(*write_dataset(tmp_path))
    stats, _ = coco_stats(ds.coco, [], ds.ids)
    assert stats == [0.0] * 12


def test_nan_boxes_do_not_score(tmp_path, caplog):
    ds = CocoDetection(*write_dataset(tmp_path))
    nan = float("nan")
    records = [{"image_id": 1, "category_id": c, "bbox": [nan] * 4, "score": 0.9} for c in (2, 3)]
    records.append({"image_id": 1, "category_id": 3, "bbox": [5, 5, 10, 10], "score": nan})
    with caplog.at_level(logging.WARNING):
        stats, summary = coco_stats(ds.coco, records, ds.ids)
    assert stats == [0.0] * 12 and summary == "no detections"
    assert "dropped 3 of 3 detections with a non-finite score or box" in caplog.text


class NanModel(nn.Module):
    """A detector whose every output is NaN."""

    def forward(self, images, mask):
        n = images.shape[0]
        return {"pred_logits": torch.full((n, 5, 4), float("nan")),
                "pred_boxes": torch.full((n, 5, 4), float("nan"))}


def test_evaluate_drops_non_finite_detections(tmp_path, caplog):
    ds = CocoDetection(*write_dataset(tmp_path), val_transforms(32, 48))
    with caplog.at_level(logging.WARNING):
        result = evaluate(NanModel(), ds, torch.device("cpu"), batch_size=2, progress=False)
    assert result["stats"] == [0.0] * 12
    assert result["non_finite_detections"] == 2 * 5 * 4  # 2 images, every (query, class)
    assert "dropped 40 of 40 detections" in caplog.text
