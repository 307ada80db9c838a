"""``CocoDetection``: a COCO-format detection dataset (pycocotools for the annotations,
Pillow for the images).

Each item is ``(image, target)`` after the transforms; before them the target holds
``boxes`` (T, 4) boxes_xyxy in pixels clipped to the image, ``labels`` (T,) int64 (the
COCO ``category_id``, as the official code: ``num_classes`` must exceed the largest id),
``area``, ``iscrowd``, ``image_id``, ``orig_size`` and ``size`` ((height, width)).
Crowd boxes are dropped (COCO evaluation reads them from the annotation file itself);
boxes with no area after clipping are dropped; images without objects are kept.

Bad input raises ``ValueError`` naming the file and the record: a missing or malformed
annotation file, a box with negative width or height, a category id that is not
declared or not below ``num_classes``. An image that will not decode is skipped with a
warning (the next image is returned instead, its target listing the skipped ids in
``skipped_image_ids``) and counted in ``bad_images``, or raises with
``on_bad_image="raise"``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os

import torch
from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO

logger = logging.getLogger(__name__)


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
    category_ids = set()
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int):
            raise ValueError(f"ann_file: {ann_file}: categories[{i}] has no integer 'id'")
        category_ids.add(cat["id"])
    image_ids = set()
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not {"id", "file_name"} <= set(img):
            raise ValueError(f"ann_file: {ann_file}: images[{i}] needs 'id' and 'file_name'")
        image_ids.add(img["id"])
    for i, ann in enumerate(data["annotations"]):
        _validate_annotation(ann, i, ann_file, category_ids, image_ids, num_classes)


def _validate_annotation(ann, i: int, ann_file: str, category_ids: set, image_ids: set,
                         num_classes: int | None) -> None:
    where = f"{ann_file}: annotations[{i}]"
    if isinstance(ann, dict) and "id" in ann:
        where += f" (id {ann['id']})"
    if not isinstance(ann, dict) or not {"image_id", "category_id", "bbox"} <= set(ann):
        raise ValueError(f"ann_file: {where} needs 'image_id', 'category_id' and 'bbox'")
    bbox = ann["bbox"]
    if not isinstance(bbox, list) or len(bbox) != 4 \
            or not all(isinstance(v, (int, float)) for v in bbox):
        raise ValueError(f"ann_file: {where}: bbox must be [x, y, width, height], got {bbox!r}")
    if bbox[2] < 0 or bbox[3] < 0:
        raise ValueError(f"ann_file: {where}: bbox {bbox} has a negative width or height")
    if ann["image_id"] not in image_ids:
        raise ValueError(f"ann_file: {where}: image_id {ann['image_id']} is not in 'images'")
    cat = ann["category_id"]
    if cat not in category_ids:
        raise ValueError(f"ann_file: {where}: category_id {cat!r} is not in 'categories'")
    if num_classes is not None and not 0 <= cat < num_classes:
        raise ValueError(f"ann_file: {where}: category_id {cat} is outside [0, num_classes="
                         f"{num_classes}); raise num_classes or remap the categories")


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
        except (OSError, UnidentifiedImageError, ValueError) as e:
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
