import json
import os

from PIL import Image

from ddetr.data import synthetic
from ddetr.data.coco import CocoDetection

SMALL = synthetic.SyntheticConfig(seed=3, num_train=12, num_val=4, image_size=96)


def test_deterministic_by_seed(tmp_path):
    synthetic.generate(str(tmp_path / "a"), SMALL, progress=False)
    synthetic.generate(str(tmp_path / "b"), SMALL, progress=False)
    for split in ("train", "val"):
        a = (tmp_path / "a" / "annotations" / f"instances_{split}.json").read_text()
        b = (tmp_path / "b" / "annotations" / f"instances_{split}.json").read_text()
        assert a == b
    assert (tmp_path / "a" / "train" / "000005.png").read_bytes() == \
        (tmp_path / "b" / "train" / "000005.png").read_bytes()


def test_coco_layout_and_content(tmp_path):
    root = synthetic.ensure_dataset(str(tmp_path), SMALL, progress=False)
    with open(os.path.join(root, "annotations", "instances_train.json")) as f:
        coco = json.load(f)
    assert [c["name"] for c in coco["categories"]] == ["circle", "square", "triangle", "star"]
    assert len(coco["images"]) == 12
    per_image = {}
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 96.01 and y + h <= 96.01 and w > 0 and h > 0
        per_image[ann["image_id"]] = per_image.get(ann["image_id"], 0) + 1
    assert all(1 <= n <= SMALL.max_objects for n in per_image.values())
    small = sum(a["area"] < 32 * 32 for a in coco["annotations"])
    assert small > len(coco["annotations"]) / 3
    assert Image.open(os.path.join(root, "train", "000000.png")).size == (96, 96)
    ds = CocoDetection(os.path.join(root, "val"), os.path.join(root, "annotations",
                                                                "instances_val.json"), num_classes=5)
    assert len(ds) == 4


def test_cache_is_reused_and_refreshed(tmp_path):
    synthetic.ensure_dataset(str(tmp_path), SMALL, progress=False)
    marker = tmp_path / "train" / "000000.png"
    stamp = marker.stat().st_mtime_ns
    synthetic.ensure_dataset(str(tmp_path), SMALL, progress=False)
    assert marker.stat().st_mtime_ns == stamp
    other = synthetic.SyntheticConfig(seed=4, num_train=12, num_val=4, image_size=96)
    synthetic.ensure_dataset(str(tmp_path), other, progress=False)
    assert json.loads((tmp_path / "meta.json").read_text())["seed"] == 4


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DDETR_CACHE", str(tmp_path))
    assert synthetic.default_cache_dir(7) == os.path.join(str(tmp_path),
                                                          f"synthetic-{synthetic.VERSION}-7")
