"""Batching images of different sizes: zero-padding at the bottom and right to the
largest height and width in the batch, with the padding mask (True on padding)."""

from __future__ import annotations

import torch
from torch import Tensor


def pad_images(images: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(3, H_i, W_i) images -> ``(batch (N, 3, H, W), mask (N, H, W) bool)``, H and W
    the largest sizes; the mask is True where a pixel is padding."""
    if not images:
        raise ValueError("images: expected at least one image")
    h = max(im.shape[-2] for im in images)
    w = max(im.shape[-1] for im in images)
    batch = images[0].new_zeros(len(images), images[0].shape[0], h, w)
    mask = torch.ones(len(images), h, w, dtype=torch.bool)
    for i, im in enumerate(images):
        batch[i, :, :im.shape[-2], :im.shape[-1]] = im
        mask[i, :im.shape[-2], :im.shape[-1]] = False
    return batch, mask


def collate_fn(samples: list[tuple[Tensor, dict]]) -> tuple[Tensor, Tensor, list[dict]]:
    """A DataLoader ``collate_fn``: ``[(image, target), ...]`` -> ``(images, mask,
    targets)`` with ``images`` (N, 3, H, W), ``mask`` (N, H, W) and the targets list."""
    images, targets = zip(*samples)
    batch, mask = pad_images(list(images))
    return batch, mask, list(targets)
