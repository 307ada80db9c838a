"""bfloat16 inference for every variant (the Deformable DETR variants, DETR and DINO),
both ways users ask for it: the model converted (``model.to(torch.bfloat16)``, float32
images accepted) and float32 under ``torch.autocast("cpu", dtype=torch.bfloat16)``.

Bounds (about twice the largest of three seeds measured): logits within 0.08 and boxes
within 0.015 of float32. A random two-stage model's proposal scores are close to tied, so
bfloat16 rounding may pick other proposals: its encoder outputs are held to the bounds
(0.15 / 0.01), its decoder outputs to being finite. DINO selects its queries from the
proposals the same way, so its encoder's output (the memory, up to 3.5 in size here) is
held to 0.25 (three seeds measured 0.08-0.12) and its outputs to being finite."""

import pytest
import torch

from tests.models.detr_cases import VARIANTS, images, tiny_detr, tiny_model
from tests.models.test_dino import tiny_dino

DC5 = {"num_feature_levels": 1, "dilation": True,
       "backbone": {"block": "bottleneck", "depths": [1, 1, 1, 1], "widths": [64, 64, 128, 128],
                    "stem_width": 32}}
CASES = [(v, {}) for v in VARIANTS] + [("plain", DC5)]


def _runs(variant, overrides, seed):
    x, mask = images()
    with torch.no_grad():
        ref = tiny_model(variant, seed=seed, **overrides)(x, mask)
        converted = tiny_model(variant, seed=seed, **overrides).to(torch.bfloat16)(x, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = tiny_model(variant, seed=seed, **overrides)(x, mask)
    return ref, {"converted": converted, "autocast": autocast}


def _diff(a, b) -> float:
    return (a.float() - b).abs().max().item()


@pytest.mark.parametrize("variant, overrides", CASES,
                         ids=[v for v in VARIANTS] + ["dc5"])
@pytest.mark.parametrize("seed", [0, 1])
def test_bfloat16_inference_close_to_float32(variant, overrides, seed):
    ref, runs = _runs(variant, overrides, seed)
    for how, out in runs.items():
        assert out["pred_logits"].dtype == torch.bfloat16 or how == "autocast", how
        for key in ("pred_logits", "pred_boxes"):
            assert torch.isfinite(out[key].float()).all(), (how, key)
        if "enc_outputs" in ref:
            enc, enc_ref = out["enc_outputs"], ref["enc_outputs"]
            assert _diff(enc["pred_logits"], enc_ref["pred_logits"]) < 0.15, how
            assert _diff(enc["pred_boxes"], enc_ref["pred_boxes"]) < 0.01, how
            continue
        assert _diff(out["pred_logits"], ref["pred_logits"]) < 0.08, how
        assert _diff(out["pred_boxes"], ref["pred_boxes"]) < 0.015, how


def _run(model, x, mask, autocast=False):
    """(the encoder's output, the detector's outputs) of one inference."""
    seen = {}
    hook = model.transformer.encoder.register_forward_hook(
        lambda module, args, out: seen.__setitem__("memory", out))
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x, mask)
    finally:
        hook.remove()
    return seen["memory"], out


@pytest.mark.parametrize("seed", [0, 1])
def test_bfloat16_detr_close_to_float32(seed):
    x, mask = images()
    _, ref = _run(tiny_detr(seed=seed), x, mask)
    runs = {"converted": _run(tiny_detr(seed=seed).to(torch.bfloat16), x, mask)[1],
            "autocast": _run(tiny_detr(seed=seed), x, mask, autocast=True)[1]}
    for how, out in runs.items():
        assert out["pred_logits"].dtype == torch.bfloat16 or how == "autocast", how
        assert _diff(out["pred_logits"], ref["pred_logits"]) < 0.08, how
        assert _diff(out["pred_boxes"], ref["pred_boxes"]) < 0.015, how


@pytest.mark.parametrize("seed", [0, 1])
def test_bfloat16_dino_runs_and_its_encoder_agrees(seed):
    x, mask = images()
    memory_ref, _ = _run(tiny_dino(seed=seed).eval(), x, mask)
    runs = {"converted": _run(tiny_dino(seed=seed).eval().to(torch.bfloat16), x, mask),
            "autocast": _run(tiny_dino(seed=seed).eval(), x, mask, autocast=True)}
    for how, (memory, out) in runs.items():
        assert _diff(memory, memory_ref) < 0.25, how
        assert out["pred_logits"].dtype == torch.bfloat16 or how == "autocast", how
        for key in ("pred_logits", "pred_boxes"):
            assert torch.isfinite(out[key].float()).all(), (how, key)
