"""Batching images for the detectors: a (N, 3, H, W) tensor with its padding mask, from
a batch tensor (and optional mask) or a list of differently sized images."""

from __future__ import annotations

import torch
from torch import Tensor


def batch_images(images, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """A (N, 3, H, W) batch and its (N, H, W) padding mask (True on padding), from a
    batch tensor with an optional mask, or from a list of (3, H_i, W_i) images that are
    zero-padded at the bottom and right to the largest size."""
    if isinstance(images, (list, tuple)):
        if mask is not None:
            raise ValueError("mask: not accepted with a list of images (built from their sizes)")
        return _pad(images)
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point() \
            or images.shape[1] != 3 or images.numel() == 0:
        raise ValueError(f"images: expected a non-empty floating (N, 3, H, W) tensor or a "
                         f"list of (3, H, W) tensors, got {_describe(images)}")
    n, _, h, w = images.shape
    if mask is None:
        return images, torch.zeros(n, h, w, dtype=torch.bool, device=images.device)
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (n, h, w):
        raise ValueError(f"mask: expected a bool tensor of shape {(n, h, w)} (True on "
                         f"padding), got {_describe(mask)}")
    return images, mask


def _pad(images) -> tuple[Tensor, Tensor]:
    for i, im in enumerate(images):
        if not isinstance(im, Tensor) or im.dim() != 3 or im.shape[0] != 3 \
                or not im.is_floating_point() or im.numel() == 0:
            raise ValueError(f"images[{i}]: expected a non-empty floating (3, H, W) tensor "
                             f"(normalised RGB), got {_describe(im)}")
        if im.dtype != images[0].dtype or im.device != images[0].device:
            raise ValueError(f"images[{i}]: expected {images[0].dtype} on {images[0].device} "
                             f"like images[0], got {im.dtype} on {im.device}")
    if not images:
        raise ValueError("images: an empty list (expected at least one (3, H, W) tensor)")
    h = max(im.shape[1] for im in images)
    w = max(im.shape[2] for im in images)
    batch = images[0].new_zeros(len(images), images[0].shape[0], h, w)
    mask = torch.ones(len(images), h, w, dtype=torch.bool, device=images[0].device)
    for i, im in enumerate(images):
        batch[i, :, :im.shape[1], :im.shape[2]].copy_(im)
        mask[i, :im.shape[1], :im.shape[2]] = False
    return batch, mask


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
