"""``ddetr.data.synthetic``: a COCO-format dataset of coloured shapes, written to disk.

Every image holds 1 to ``max_objects`` shapes (circle, square, triangle, star, and
optionally cross and hexagon) in random colours and rotations, on a textured or noisy
background. Sizes are log-uniform between ``min_object_size`` pixels and half the image,
so most objects are COCO-"small" (area < 32 x 32). Shapes may overlap, but a new shape
may hide at most ``max_occlusion`` of any earlier one. Output, deterministic for a
seed::

    root/train/000000.png ...      root/val/000000.png ...
    root/annotations/instances_train.json, instances_val.json
    root/meta.json                 the generator parameters (written last)

Category ids start at 1 (as COCO's), so a model needs ``num_classes = classes + 1``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

logger = logging.getLogger(__name__)

VERSION = 1
SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon")


@dataclass(frozen=True)
class SyntheticConfig:
    """Generator parameters (the cache key together with ``VERSION``)."""
    seed: int = 0
    num_train: int = 2000
    num_val: int = 200
    image_size: int = 128
    num_classes: int = 4          # the first ``num_classes`` of SHAPES
    max_objects: int = 20
    min_object_size: int = 8
    max_occlusion: float = 0.4

    def check(self) -> None:
        if not 1 <= self.num_classes <= len(SHAPES):
            raise ValueError(f"num_classes: expected 1..{len(SHAPES)}, got {self.num_classes}")
        if self.image_size < 4 * self.min_object_size:
            raise ValueError(f"image_size: must be at least 4 * min_object_size, got {self.image_size}")
        if self.max_objects < 1 or self.num_train < 1 or self.num_val < 1:
            raise ValueError("max_objects, num_train, num_val: must be positive")


def default_cache_dir(seed: int = 0) -> str:
    """``$DDETR_CACHE/synthetic-<version>-<seed>``, ``DDETR_CACHE`` defaulting to
    ``~/.cache/ddetr``."""
    base = os.environ.get("DDETR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ddetr")
    return os.path.join(base, f"synthetic-{VERSION}-{seed}")


def ensure_dataset(root: str, config: SyntheticConfig, progress: bool = True) -> str:
    """Generates the dataset into ``root`` unless a complete one with the same
    parameters is already there; returns ``root``."""
    meta_path = os.path.join(root, "meta.json")
    wanted = {"version": VERSION, **asdict(config)}
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            if json.load(f) == wanted:
                return root
        os.remove(meta_path)
    generate(root, config, progress)
    with open(meta_path, "w") as f:
        json.dump(wanted, f, indent=1)
    return root


def generate(root: str, config: SyntheticConfig, progress: bool = True) -> None:
    """Writes both splits (images and annotation files) under ``root``."""
    config.check()
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for split, count, offset in (("train", config.num_train, 0), ("val", config.num_val, 1)):
        rng = np.random.default_rng([config.seed, offset])
        os.makedirs(os.path.join(root, split), exist_ok=True)
        coco = _empty_coco(config.num_classes)
        for index in tqdm(range(count), desc=f"synthetic {split}", disable=not progress,
                          leave=False):
            image, objects = render_image(rng, config)
            file_name = f"{index:06d}.png"
            image.save(os.path.join(root, split, file_name))
            _add_image(coco, index + 1, file_name, config.image_size, objects)
        with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump(coco, f)
        logger.info("wrote %d %s images to %s", count, split, root)


def _empty_coco(num_classes: int) -> dict:
    categories = [{"id": i + 1, "name": SHAPES[i], "supercategory": "shape"}
                  for i in range(num_classes)]
    return {"info": {"description": "ddetr synthetic shapes", "version": VERSION},
            "images": [], "annotations": [], "categories": categories}


def _add_image(coco: dict, image_id: int, file_name: str, size: int, objects) -> None:
    coco["images"].append({"id": image_id, "file_name": file_name, "width": size, "height": size})
    for category_id, (x0, y0, x1, y1) in objects:
        w, h = x1 - x0, y1 - y0
        coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image_id,
                                    "category_id": category_id, "bbox": [x0, y0, w, h],
                                    "area": w * h, "iscrowd": 0})


def render_image(rng: np.random.Generator, config: SyntheticConfig):
    """One image and its objects: a list of ``(category_id, boxes_xyxy tuple)``, the box
    being the tight pixel extent of the drawn shape."""
    size = config.image_size
    image = Image.fromarray(_background(rng, size))
    draw = ImageDraw.Draw(image)
    placed: list[tuple[int, tuple[float, float, float, float]]] = []
    wanted = int(rng.integers(1, config.max_objects + 1))
    for _ in range(wanted * 10):
        if len(placed) == wanted:
            break
        category = int(rng.integers(config.num_classes))
        points = _shape_points(rng, SHAPES[category], size, config.min_object_size)
        box = _extent(points)
        if not all(_hidden_fraction(box, other) <= config.max_occlusion for _, other in placed):
            continue
        colour = _contrasting_colour(rng, image, box)
        if SHAPES[category] == "circle":
            draw.ellipse(box, fill=colour)
        else:
            draw.polygon(points, fill=colour)
        placed.append((category + 1, box))
    return image, [(c, tuple(round(v, 2) for v in b)) for c, b in placed]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth colour texture (random coarse grid, upsampled), optional stripes, and
    pixel noise: (size, size, 3) uint8."""
    cells = int(rng.integers(2, 9))
    coarse = rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
    smooth = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    base = np.asarray(smooth, dtype=np.float32) * rng.uniform(0.3, 1.0)
    if rng.random() < 0.3:
        period = rng.uniform(4, 16)
        stripes = np.sin(np.arange(size) * 2 * math.pi / period)[None, :, None]
        base += 25 * (stripes if rng.random() < 0.5 else stripes.transpose(1, 0, 2))
    base += rng.normal(0, rng.uniform(2, 20), base.shape)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    return np.asarray(image.filter(ImageFilter.GaussianBlur(0.5)))


def _shape_points(rng, shape: str, image_size: int, min_size: int) -> list[tuple[float, float]]:
    """The outline of a randomly sized, rotated and placed shape, inside the image
    (for a circle: two opposite corners of its box)."""
    diameter = math.exp(rng.uniform(math.log(min_size), math.log(image_size / 2)))
    r = diameter / 2
    cx = rng.uniform(r, image_size - r)
    cy = rng.uniform(r, image_size - r)
    if shape == "circle":
        return [(cx - r, cy - r), (cx + r, cy + r)]
    angle = rng.uniform(0, 2 * math.pi)
    if shape == "star":
        radii = [r if k % 2 == 0 else r * 0.45 for k in range(10)]
    elif shape == "cross":
        return _cross(cx, cy, r, angle)
    else:
        radii = [r] * {"square": 4, "triangle": 3, "hexagon": 6}[shape]
    step = 2 * math.pi / len(radii)
    return [(cx + rad * math.cos(angle + k * step), cy + rad * math.sin(angle + k * step))
            for k, rad in enumerate(radii)]


def _cross(cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """A plus sign of arm half-width r/3, rotated by ``angle``."""
    a = r / 3
    outline = [(a, r), (a, a), (r, a), (r, -a), (a, -a), (a, -r),
               (-a, -r), (-a, -a), (-r, -a), (-r, a), (-a, a), (-a, r)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in outline]


def _extent(points) -> tuple[float, float, float, float]:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return min(xs), min(ys), max(xs), max(ys)


def _hidden_fraction(top, below) -> float:
    """Fraction of box ``below`` covered by box ``top``."""
    w = min(top[2], below[2]) - max(top[0], below[0])
    h = min(top[3], below[3]) - max(top[1], below[1])
    area = (below[2] - below[0]) * (below[3] - below[1])
    return max(w, 0) * max(h, 0) / max(area, 1e-6)


def _contrasting_colour(rng, image: Image.Image, box) -> tuple[int, int, int]:
    """A random colour at least 120 (L1 over RGB) from the background's mean under ``box``."""
    region = image.crop(tuple(int(v) for v in (box[0], box[1], box[2] + 1, box[3] + 1)))
    mean = np.asarray(region, dtype=np.float32).reshape(-1, 3).mean(0)
    for _ in range(50):
        colour = rng.integers(0, 256, 3)
        if np.abs(colour - mean).sum() >= 120:
            break
    return tuple(int(c) for c in colour)
