"""Tiny Deformable DETR (and DETR) configurations shared by the model and conversion
tests."""

import torch

from ddetr import DeformableDetr, Detr

# A 4-stage bottleneck ResNet with one block per stage and narrow widths.
TINY_BACKBONE = {"block": "bottleneck", "depths": [1, 1, 1, 1], "widths": [16, 32, 64, 128],
                 "stem_width": 8}
TINY = dict(num_classes=5, num_queries=10, backbone=TINY_BACKBONE, d_model=32, num_heads=4,
            num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64, enc_num_points=2,
            dec_num_points=3, two_stage_num_proposals=15)
VARIANTS = {
    "plain": {},
    "box_refine": {"with_box_refine": True},
    "two_stage": {"with_box_refine": True, "two_stage": True},
    "single_scale": {"num_feature_levels": 1},
}


def tiny_model(variant="plain", seed=0, jitter=0.02, **overrides):
    """A tiny model in eval mode, its parameters moved off the official init by
    ``jitter`` so every weight matters (zero-initialised heads would hide mistakes)."""
    torch.manual_seed(seed)
    model = DeformableDetr(**{**TINY, **VARIANTS[variant], **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * jitter)
    return model.eval()


# DETR reads only C5: the same tiny ResNet, a 2+2-layer transformer
TINY_DETR = dict(num_classes=5, num_queries=10, backbone=TINY_BACKBONE, d_model=32, num_heads=4,
                 num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64)


def tiny_detr(seed=0, jitter=0.02, **overrides):
    """A tiny ``Detr`` in eval mode, parameters moved off their init by ``jitter``."""
    torch.manual_seed(seed)
    model = Detr(**{**TINY_DETR, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * jitter)
    return model.eval()


def images(n=2, h=64, w=96, seed=1):
    """Random images and a padding mask: image 1 is padded at the bottom and right."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, h, w, generator=g)
    mask = torch.zeros(n, h, w, dtype=torch.bool)
    if n > 1:
        mask[1, 40:, :] = True
        mask[1, :, 70:] = True
        x[1][:, mask[1]] = 0.0
    return x, mask


def outputs(model, x, mask):
    """The model's outputs on (x, mask), without autograd."""
    with torch.no_grad():
        return model(x, mask)


def assert_same(a: dict, b: dict) -> None:
    """Bitwise the same logits and boxes."""
    assert torch.equal(a["pred_logits"], b["pred_logits"])
    assert torch.equal(a["pred_boxes"], b["pred_boxes"])
