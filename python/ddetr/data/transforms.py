"""Detection transforms: each takes and returns ``(image, target)``, moving the boxes
with the image.

A target is a dict with ``boxes`` (T, 4) boxes_xyxy in pixels of the current image
(``Normalize`` turns them into boxes_cxcywh normalised to [0, 1]), ``labels`` (T,),
``area`` (T,), ``iscrowd`` (T,) and ``size`` (2,) = (height, width); per-box entries are
kept in step when boxes are dropped. Images are PIL images until ``Normalize``, which
returns a (3, H, W) float tensor. Randomness comes from Python's ``random`` module (as
the official code), which the training engine seeds and checkpoints.

``train_transforms`` and ``val_transforms`` build the official recipe for an 800-pixel
base size, or the same recipe scaled to a smaller ``base_size``.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image

from ddetr.models.box_ops import box_xyxy_to_cxcywh

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PER_BOX_KEYS = ("boxes", "labels", "area", "iscrowd")


def _keep(target: dict, keep: torch.Tensor) -> dict:
    return {k: (v[keep] if k in PER_BOX_KEYS else v) for k, v in target.items()}


def hflip(image: Image.Image, target: dict) -> tuple[Image.Image, dict]:
    """Mirrors the image left-right: x0, x1 -> W - x1, W - x0."""
    w = image.width
    target = dict(target)
    x0, y0, x1, y1 = target["boxes"].unbind(-1)
    target["boxes"] = torch.stack([w - x1, y0, w - x0, y1], -1)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), target


def resized_size(width: int, height: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """(width, height) with the shorter side ``size``, shrunk so the longer side stays
    at most ``max_size`` (the official rule)."""
    short, long = min(width, height), max(width, height)
    if max_size is not None and long / short * size > max_size:
        size = int(round(max_size * short / long))
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def resize(image: Image.Image, target: dict, size: int, max_size: int | None = None):
    """Resizes (bilinear) so the shorter side is ``size``; boxes and areas scale along."""
    new_w, new_h = resized_size(image.width, image.height, size, max_size)
    sx, sy = new_w / image.width, new_h / image.height
    target = dict(target)
    target["boxes"] = target["boxes"] * torch.tensor([sx, sy, sx, sy])
    target["area"] = target["area"] * (sx * sy)
    target["size"] = torch.tensor([new_h, new_w])
    return image.resize((new_w, new_h), Image.Resampling.BILINEAR), target


def crop(image: Image.Image, target: dict, top: int, left: int, height: int, width: int):
    """Crops the region; boxes are shifted and clipped to it, boxes left with no area
    are dropped, and areas are recomputed from the clipped boxes."""
    target = dict(target)
    boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
    boxes = torch.min(boxes.view(-1, 2, 2), torch.tensor([width, height], dtype=torch.float32))
    boxes = boxes.clamp(min=0)
    # (T, 2, 2) corners -> (T, 2) extent
    extent = boxes[:, 1] - boxes[:, 0]
    target["boxes"] = boxes.reshape(-1, 4)
    target["area"] = extent.prod(-1)
    target["size"] = torch.tensor([height, width])
    target = _keep(target, (extent > 0).all(-1))
    return image.crop((left, top, left + width, top + height)), target


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, target):
        return hflip(image, target) if random.random() < self.p else (image, target)


class RandomResize:
    """Shorter side drawn uniformly from ``sizes``, longer side capped at ``max_size``."""

    def __init__(self, sizes, max_size: int | None = None):
        self.sizes, self.max_size = list(sizes), max_size

    def __call__(self, image, target):
        return resize(image, target, random.choice(self.sizes), self.max_size)


class Resize:
    """Shorter side ``size``, longer side capped at ``max_size`` (deterministic)."""

    def __init__(self, size: int, max_size: int | None = None):
        self.size, self.max_size = size, max_size

    def __call__(self, image, target):
        return resize(image, target, self.size, self.max_size)


class RandomSizeCrop:
    """A crop of random width and height in [min_size, max_size] (at most the image's)
    at a random position."""

    def __init__(self, min_size: int, max_size: int):
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image, target):
        w = random.randint(min(self.min_size, image.width), min(image.width, self.max_size))
        h = random.randint(min(self.min_size, image.height), min(image.height, self.max_size))
        top = random.randint(0, image.height - h)
        left = random.randint(0, image.width - w)
        return crop(image, target, top, left, h, w)


class RandomSelect:
    """``first`` with probability ``p``, otherwise ``second``."""

    def __init__(self, first, second, p: float = 0.5):
        self.first, self.second, self.p = first, second, p

    def __call__(self, image, target):
        return self.first(image, target) if random.random() < self.p else self.second(image, target)


class Normalize:
    """PIL image -> (3, H, W) float tensor normalised with ``mean``/``std``; boxes_xyxy
    in pixels -> boxes_cxcywh normalised by the image size."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean = torch.tensor(mean)[:, None, None]
        self.std = torch.tensor(std)[:, None, None]

    def __call__(self, image, target):
        # (H, W, 3) uint8 -> (3, H, W) float in [0, 1]
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        tensor = (torch.from_numpy(array).permute(2, 0, 1) - self.mean) / self.std
        target = dict(target)
        h, w = tensor.shape[-2:]
        boxes_cxcywh = box_xyxy_to_cxcywh(target.pop("boxes"))
        target["boxes"] = boxes_cxcywh / torch.tensor([w, h, w, h], dtype=torch.float32)
        return tensor, target


def _scaled(values, factor: float) -> list[int]:
    return sorted({max(8, int(round(v * factor))) for v in values})


def train_transforms(base_size: int = 800, max_size: int = 1333) -> Compose:
    """The official training augmentation, scaled by ``base_size / 800``: horizontal
    flip, then either a resize of the shorter side to one of 480..800 step 32 (longer
    side <= max_size), or a resize to 400/500/600, a random 384..600 crop and that same
    multi-scale resize; then ``Normalize``."""
    f = base_size / 800
    scales = _scaled(range(480, 801, 32), f)
    crop_branch = Compose([RandomResize(_scaled((400, 500, 600), f)),
                           RandomSizeCrop(*_scaled((384, 600), f)),
                           RandomResize(scales, max_size)])
    return Compose([RandomHorizontalFlip(),
                    RandomSelect(RandomResize(scales, max_size), crop_branch),
                    Normalize()])


def val_transforms(base_size: int = 800, max_size: int = 1333) -> Compose:
    """Shorter side ``base_size`` (longer side <= max_size), then ``Normalize``."""
    return Compose([Resize(base_size, max_size), Normalize()])
