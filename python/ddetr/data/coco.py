"""``CocoDetection``: a COCO-format detection dataset (pycocotools for the annotations,
Pillow for the images).

Each item is ``(image, target)`` after the transforms; before them the target holds
``boxes`` (T, 4) boxes_xyxy in pixels clipped to the image, ``labels`` (T,) int64 (the
COCO ``category_id``, as the official code: ``num_classes`` must exceed the largest id),
``area``, ``iscrowd``, ``image_id``, ``orig_size`` and ``size`` ((height, width)).
Crowd boxes are dropped (COCO evaluation reads them from the annotation file itself);
boxes with no area after clipping are dropped; images without objects are kept.

Bad input raises ``ValueError`` naming the file and the record: a missing or malformed
annotation file; an image or category id that is not an integer or is repeated; a
category id outside [0, ``MAX_CATEGORY_ID``] (category ids are the labels, so the
classifier has largest id + 1 outputs: a huge id would allocate a huge layer); a bbox
that is not four finite numbers or has a negative width or height; an ``area`` that is
not a finite number >= 0; an ``iscrowd`` other than 0 or 1; a category id that is not
declared or not below ``num_classes``. An image that will not decode (including one
Pillow refuses as a decompression bomb) is skipped with a warning (the next image is
returned instead, its target listing the skipped ids in ``skipped_image_ids``) and
counted in ``bad_images``, or raises with ``on_bad_image="raise"``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os

import torch
from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO

logger = logging.getLogger(__name__)

# Largest accepted category id: ids are the labels (num_classes = largest id + 1), and
# COCO (90), LVIS (1203) or Objects365 (365) stay far below it; remap larger ids.
MAX_CATEGORY_ID = 100_000

# What Pillow raises for a file that cannot be decoded (DecompressionBombError is none
# of the others: it derives from Exception directly).
UNREADABLE_IMAGE_ERRORS = (OSError, UnidentifiedImageError, ValueError,
                           Image.DecompressionBombError)


def load_coco(ann_file: str, num_classes: int | None = None) -> COCO:
    """Reads and validates a COCO annotation file; see the module docstring."""
    if not os.path.isfile(ann_file):
        raise ValueError(f"ann_file: annotation file {ann_file!r} does not exist")
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"ann_file: {ann_file} is not valid JSON ({e})") from None
    _validate(data, ann_file, num_classes)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def _validate(data, ann_file: str, num_classes: int | None) -> None:
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                             for k in ("images", "annotations", "categories")):
        raise ValueError(f"ann_file: {ann_file} needs lists 'images', 'annotations' and "
                         f"'categories' (a COCO detection file)")
    category_ids = _unique_ids(data["categories"], "categories", ann_file, ())
    for i, cat in enumerate(data["categories"]):
        if not 0 <= cat["id"] <= MAX_CATEGORY_ID:
            raise ValueError(f"ann_file: {ann_file}: categories[{i}] has id {cat['id']}, "
                             f"outside [0, {MAX_CATEGORY_ID}] (the ids are the labels: "
                             f"remap them to small numbers)")
    image_ids = _unique_ids(data["images"], "images", ann_file, ("file_name",))
    for i, ann in enumerate(data["annotations"]):
        _validate_annotation(ann, i, ann_file, category_ids, image_ids, num_classes)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def _unique_ids(records: list, key: str, ann_file: str, needs: tuple) -> set:
    """The integer ``id`` of every record of ``data[key]``, each once."""
    ids = set()
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not {"id", *needs} <= set(record):
            raise ValueError(f"ann_file: {ann_file}: {key}[{i}] needs "
                             f"{' and '.join(repr(k) for k in ('id', *needs))}")
        if not _is_int(record["id"]):
            raise ValueError(f"ann_file: {ann_file}: {key}[{i}] has id {record['id']!r}; "
                             f"ids must be integers")
        if record["id"] in ids:
            raise ValueError(f"ann_file: {ann_file}: {key}[{i}] repeats id {record['id']}")
        ids.add(record["id"])
    return ids


def _validate_annotation(ann, i: int, ann_file: str, category_ids: set, image_ids: set,
                         num_classes: int | None) -> None:
    where = f"{ann_file}: annotations[{i}]"
    if isinstance(ann, dict) and "id" in ann:
        where += f" (id {ann['id']!r})"
    if not isinstance(ann, dict) or not {"image_id", "category_id", "bbox"} <= set(ann):
        raise ValueError(f"ann_file: {where} needs 'image_id', 'category_id' and 'bbox'")
    _validate_geometry(ann, where)
    if not _is_int(ann["image_id"]) or ann["image_id"] not in image_ids:
        raise ValueError(f"ann_file: {where}: image_id {ann['image_id']!r} is not in 'images'")
    cat = ann["category_id"]
    if not _is_int(cat) or cat not in category_ids:
        raise ValueError(f"ann_file: {where}: category_id {cat!r} is not in 'categories'")
    if num_classes is not None and not 0 <= cat < num_classes:
        raise ValueError(f"ann_file: {where}: category_id {cat} is outside [0, num_classes="
                         f"{num_classes}); raise num_classes or remap the categories")


def _validate_geometry(ann: dict, where: str) -> None:
    """``bbox``: four finite numbers, width and height >= 0; ``area`` (optional): a
    finite number >= 0; ``iscrowd`` (optional): 0 or 1."""
    bbox = ann["bbox"]
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        raise ValueError(f"ann_file: {where}: bbox must be [x, y, width, height] (finite "
                         f"numbers), got {bbox!r}")
    if bbox[2] < 0 or bbox[3] < 0:
        raise ValueError(f"ann_file: {where}: bbox {bbox} has a negative width or height")
    if "area" in ann and not (_is_number(ann["area"]) and ann["area"] >= 0):
        raise ValueError(f"ann_file: {where}: area must be a finite number >= 0, "
                         f"got {ann['area']!r}")
    if ann.get("iscrowd", 0) not in (0, 1):
        raise ValueError(f"ann_file: {where}: iscrowd must be 0 or 1, got {ann['iscrowd']!r}")


class CocoDetection(torch.utils.data.Dataset):
    """Images of a COCO annotation file, with their boxes and labels.

    Args:
        img_folder: directory the ``file_name`` entries are relative to.
        ann_file: the COCO JSON file.
        transforms: a callable ``(image, target) -> (image, target)`` or None.
        num_classes: if given, every category id must be below it.
        on_bad_image: ``"skip"`` (warn, count, return the next image) or ``"raise"``.
    """

    def __init__(self, img_folder: str, ann_file: str, transforms=None,
                 num_classes: int | None = None, on_bad_image: str = "skip"):
        if on_bad_image not in ("skip", "raise"):
            raise ValueError(f"on_bad_image: expected 'skip' or 'raise', got {on_bad_image!r}")
        self.img_folder, self.ann_file = img_folder, ann_file
        self.coco = load_coco(ann_file, num_classes)
        self.ids = sorted(self.coco.imgs)
        self.transforms = transforms
        self.on_bad_image = on_bad_image
        self.bad_images: set[int] = set()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        skipped = []
        for attempt in range(len(self.ids)):
            image_id = self.ids[(index + attempt) % len(self.ids)]
            image = self._read_image(image_id)
            if image is not None:
                break
            skipped.append(image_id)
        else:
            raise ValueError(f"img_folder: no image of {self.ann_file} could be decoded")
        target = self.target(image_id, image.width, image.height)
        if skipped:  # data loader workers hold their own copy of ``bad_images``
            target["skipped_image_ids"] = torch.tensor(skipped)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def _read_image(self, image_id: int) -> Image.Image | None:
        path = os.path.join(self.img_folder, self.coco.imgs[image_id]["file_name"])
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except UNREADABLE_IMAGE_ERRORS as e:
            if self.on_bad_image == "raise":
                raise ValueError(f"img_folder: image {path} (image id {image_id} in "
                                 f"{self.ann_file}) cannot be read: {e}") from None
            if image_id not in self.bad_images:
                self.bad_images.add(image_id)
                logger.warning("skipping image %s (image id %s): %s; %d bad image(s) so far",
                               path, image_id, e, len(self.bad_images))
            return None

    def target(self, image_id: int, width: int, height: int) -> dict:
        """The image's non-crowd boxes clipped to (width, height), as described above."""
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # (x, y, w, h) -> (x0, y0, x1, y1)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        size = torch.tensor([height, width])
        return {"boxes": boxes[keep],
                "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)[keep],
                "area": torch.tensor([float(a.get("area", a["bbox"][2] * a["bbox"][3]))
                                      for a in anns], dtype=torch.float32)[keep],
                "iscrowd": torch.zeros(len(anns), dtype=torch.int64)[keep],
                "image_id": torch.tensor(image_id), "orig_size": size, "size": size.clone()}
