import json
import logging

import pytest
import torch
from PIL import Image

from ddetr.data.coco import CocoDetection


def write_dataset(tmp_path, annotations=None, categories=None, n_images=2):
    folder = tmp_path / "images"
    folder.mkdir()
    images = []
    for i in range(n_images):
        Image.new("RGB", (40, 30), (i * 40, 0, 0)).save(folder / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 40, "height": 30})
    if annotations is None:
        annotations = [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [5, 5, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [30, 20, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 30], "area": 1200, "iscrowd": 1},
        ]
    categories = categories or [{"id": k, "name": f"c{k}"} for k in (1, 2, 3)]
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                    "categories": categories}))
    return str(folder), str(ann_file)


def test_targets_crowd_dropped_boxes_clipped_empty_kept(tmp_path):
    ds = CocoDetection(*write_dataset(tmp_path))
    assert len(ds) == 2
    image, target = ds[0]
    assert image.size == (40, 30)
    assert target["labels"].tolist() == [3, 2]
    # second box [30, 20, 20, 20] is clipped to the 40x30 image
    assert target["boxes"].tolist() == [[5.0, 5.0, 15.0, 15.0], [30.0, 20.0, 40.0, 30.0]]
    assert target["orig_size"].tolist() == [30, 40] and int(target["image_id"]) == 1
    _, empty = ds[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        CocoDetection(str(tmp_path), str(tmp_path / "nope.json"))


def test_malformed_annotation_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json is not valid JSON"):
        CocoDetection(str(tmp_path), str(bad))
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="needs lists"):
        CocoDetection(str(tmp_path), str(bad))


def test_negative_box_size_names_the_record(tmp_path):
    anns = [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [5, 5, -3, 4]}]
    with pytest.raises(ValueError, match=r"ann\.json: annotations\[0\] \(id 7\).*negative"):
        CocoDetection(*write_dataset(tmp_path, anns))


def test_category_outside_num_classes(tmp_path):
    paths = write_dataset(tmp_path)
    with pytest.raises(ValueError, match=r"annotations\[0\] \(id 1\): category_id 3 is outside"):
        CocoDetection(*paths, num_classes=3)
    assert len(CocoDetection(*paths, num_classes=4)) == 2


def test_undeclared_category(tmp_path):
    anns = [{"id": 1, "image_id": 1, "category_id": 9, "bbox": [0, 0, 1, 1]}]
    with pytest.raises(ValueError, match="category_id 9 is not in 'categories'"):
        CocoDetection(*write_dataset(tmp_path, anns))


def test_undecodable_image_is_skipped_and_counted(tmp_path, caplog):
    folder, ann_file = write_dataset(tmp_path)
    (tmp_path / "images" / "0.png").write_bytes(b"not a png")
    ds = CocoDetection(folder, ann_file)
    with caplog.at_level(logging.WARNING):
        _, target = ds[0]
    assert int(target["image_id"]) == 2  # the next image instead
    assert target["skipped_image_ids"].tolist() == [1]
    assert ds.bad_images == {1}
    assert "0.png" in caplog.text
    strict = CocoDetection(folder, ann_file, on_bad_image="raise")
    with pytest.raises(ValueError, match=r"0\.png \(image id 1"):
        strict[0]
