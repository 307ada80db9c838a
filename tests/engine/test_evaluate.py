import pytest
import torch

from ddetr.data.coco import CocoDetection
from ddetr.engine.evaluate import coco_stats, to_coco_results
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
