import json
import logging
import struct
import zlib

import pytest
import torch
from PIL import Image

from ddetr.data.coco import MAX_CATEGORY_ID, CocoDetection


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


def bomb_png(path) -> None:
    """A PNG whose header claims 30000 x 30000 pixels (Pillow refuses to open it as a
    decompression bomb) and that holds no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


def test_decompression_bomb_is_skipped_as_undecodable(tmp_path, caplog):
    folder, ann_file = write_dataset(tmp_path)
    bomb_png(tmp_path / "images" / "0.png")
    ds = CocoDetection(folder, ann_file)
    with caplog.at_level(logging.WARNING):
        _, target = ds[0]
    assert int(target["image_id"]) == 2 and ds.bad_images == {1}
    assert "0.png" in caplog.text
    with pytest.raises(ValueError, match=r"0\.png \(image id 1"):
        CocoDetection(folder, ann_file, on_bad_image="raise")[0]


def _edited(tmp_path, edit):
    """The paths of ``write_dataset`` after ``edit(data)`` changed its annotation file."""
    folder, ann_file = write_dataset(tmp_path)
    data = json.loads(open(ann_file).read())
    edit(data)
    with open(ann_file, "w") as f:
        json.dump(data, f)
    return folder, ann_file


def _set(key, index, field, value):
    def edit(data):
        data[key][index][field] = value
    return edit


def _category_3_as(value):
    def edit(data):
        data["categories"][2]["id"] = data["annotations"][0]["category_id"] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (_set("images", 1, "id", "b"), r"images\[1\] has id 'b'; ids must be integers"),
    (_set("images", 1, "id", 1), r"images\[1\] repeats id 1"),
    (_category_3_as(2**40), r"categories\[2\] has id 1099511627776, outside \[0, 100000\]"),
    (_category_3_as(-1), r"categories\[2\] has id -1, outside"),
    (_set("categories", 0, "id", True), r"categories\[0\] has id True; ids must be integers"),
    (_set("annotations", 0, "area", "big"), r"annotations\[0\] \(id 1\): area must be a "
                                            r"finite number >= 0, got 'big'"),
    (_set("annotations", 1, "bbox", [1, 2, float("nan"), 4]), r"annotations\[1\] \(id 2\): "
                                                               r"bbox must be"),
    (_set("annotations", 0, "bbox", [1, 2, True, 4]), r"annotations\[0\] \(id 1\): bbox must be"),
    (_set("annotations", 0, "iscrowd", "no"), r"annotations\[0\] \(id 1\): iscrowd must be"),
    (_set("annotations", 0, "image_id", [1]), r"annotations\[0\] \(id 1\): image_id \[1\] is "
                                              r"not in 'images'"),
    (_set("annotations", 0, "category_id", "3"), r"annotations\[0\] \(id 1\): category_id '3' "
                                                 r"is not in 'categories'"),
])
def test_annotation_errors_name_the_file_and_the_record(tmp_path, edit, message):
    with pytest.raises(ValueError, match=r"ann\.json: " + message):
        CocoDetection(*_edited(tmp_path, edit))


def test_category_ids_up_to_the_bound_are_accepted(tmp_path):
    ds = CocoDetection(*_edited(tmp_path, _category_3_as(MAX_CATEGORY_ID)))
    assert ds[0][1]["labels"].tolist() == [MAX_CATEGORY_ID, 2]
