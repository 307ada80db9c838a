import random

import numpy as np
import pytest
import torch
from PIL import Image

from ddetr.data import transforms as T


def make_case(w=100, h=60):
    """An image with a white 20x10 block at x 10..30, y 5..15 and its target."""
    image = Image.new("RGB", (w, h))
    image.paste((255, 255, 255), (10, 5, 30, 15))
    target = {"boxes": torch.tensor([[10.0, 5.0, 30.0, 15.0], [60.0, 40.0, 100.0, 60.0]]),
              "labels": torch.tensor([1, 2]), "area": torch.tensor([200.0, 800.0]),
              "iscrowd": torch.tensor([0, 0]), "size": torch.tensor([h, w])}
    return image, target


def white_extent(image):
    """(x0, y0, x1, y1) of the pixels brighter than mid-grey."""
    gray = torch.from_numpy(np.asarray(image.convert("L")).copy())
    ys, xs = torch.nonzero(gray > 127, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_hflip():
    image, target = make_case()
    flipped, t = T.hflip(image, target)
    assert t["boxes"].tolist() == [[70.0, 5.0, 90.0, 15.0], [0.0, 40.0, 40.0, 60.0]]
    assert white_extent(flipped) == [70, 5, 90, 15]


def test_resize_moves_boxes_with_the_image():
    image, target = make_case()
    out, t = T.resize(image, target, 120)  # shorter side 60 -> 120: x2
    assert out.size == (200, 120)
    assert t["boxes"][0].tolist() == [20.0, 10.0, 60.0, 30.0]
    assert t["area"].tolist() == [800.0, 3200.0]
    assert t["size"].tolist() == [120, 200]
    assert white_extent(out) == pytest.approx([20, 10, 60, 30], abs=1)


def test_resize_respects_max_size():
    assert T.resized_size(100, 60, 120, max_size=150) == (150, 90)
    assert T.resized_size(60, 100, 800, max_size=1333) == (800, 1333)
    assert T.resized_size(640, 480, 800, max_size=1333) == (1066, 800)


def test_crop_clips_and_drops_boxes():
    image, target = make_case()
    out, t = T.crop(image, target, top=8, left=20, height=30, width=40)
    # box 0 clipped to x 20..30, y 8..15 -> shifted; box 1 lies outside and is dropped
    assert t["boxes"].tolist() == [[0.0, 0.0, 10.0, 7.0]]
    assert t["labels"].tolist() == [1] and t["area"].tolist() == [70.0]
    assert out.size == (40, 30) and t["size"].tolist() == [30, 40]
    assert white_extent(out) == [0, 0, 10, 7]


def test_normalize_gives_cxcywh_in_unit_range():
    image, target = make_case()
    tensor, t = T.Normalize()(image, target)
    assert tensor.shape == (3, 60, 100)
    assert torch.allclose(t["boxes"][0], torch.tensor([0.2, 10 / 60, 0.2, 10 / 60]))
    white = (torch.ones(3) - torch.tensor(T.IMAGENET_MEAN)) / torch.tensor(T.IMAGENET_STD)
    assert torch.allclose(tensor[:, 10, 20], white)


def test_empty_targets_pass_through():
    image, target = make_case()
    empty = {**target, "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "area": torch.zeros(0), "iscrowd": torch.zeros(0, dtype=torch.int64)}
    random.seed(0)
    for _ in range(5):
        tensor, t = T.train_transforms(base_size=64, max_size=128)(image, empty)
        assert t["boxes"].shape == (0, 4)


@pytest.mark.parametrize("seed", range(8))
def test_train_recipe_keeps_boxes_on_the_object(seed):
    random.seed(seed)
    image, target = make_case(200, 160)
    target = {k: v[:1] if k != "size" else v for k, v in target.items()}
    image = Image.new("RGB", (200, 160))
    image.paste((255, 255, 255), (60, 50, 140, 110))
    target["boxes"] = torch.tensor([[60.0, 50.0, 140.0, 110.0]])
    tensor, t = T.train_transforms(base_size=160, max_size=320)(image, target)
    assert min(tensor.shape[-2:]) <= 160 and max(tensor.shape[-2:]) <= 320
    if len(t["boxes"]):  # the crop may cut the object out
        h, w = tensor.shape[-2:]
        cx, cy, bw, bh = (t["boxes"][0] * torch.tensor([w, h, w, h])).tolist()
        bright = tensor[0] > 0  # white normalises above 0, black below
        ys, xs = torch.nonzero(bright, as_tuple=True)
        assert xs.min().item() == pytest.approx(cx - bw / 2, abs=1.5)
        assert xs.max().item() + 1 == pytest.approx(cx + bw / 2, abs=1.5)
        assert ys.min().item() == pytest.approx(cy - bh / 2, abs=1.5)


def test_official_scales():
    recipe = T.train_transforms()
    multi = recipe.transforms[1].first
    assert multi.sizes == list(range(480, 801, 32)) and multi.max_size == 1333
    crop_branch = recipe.transforms[1].second
    assert crop_branch.transforms[0].sizes == [400, 500, 600]
    assert (crop_branch.transforms[1].min_size, crop_branch.transforms[1].max_size) == (384, 600)
    resize = T.val_transforms().transforms[0]
    assert (resize.size, resize.max_size) == (800, 1333)
