"""Whole detectors on the GPU against the same model on the CPU: every variant and DINO,
outputs and every parameter gradient, in float64 (so the comparison is about the
kernels, not about TF32 convolutions or summation order), and a bfloat16 autocast run
against float32.

The sine position embedding is computed in float32 whatever the model's dtype (as in
the official code), and CUDA's float32 sin/cos may differ from the CPU's by an ulp, so
the float64 models agree to about 1e-8, not to float64 rounding: the tolerance is 1e-6
relative, which a kernel mistake (an O(1) error somewhere) cannot pass."""

import copy

import pytest
import torch

from tests.models.detr_cases import VARIANTS, images, tiny_model
from tests.models.test_dino import targets, tiny_dino

pytestmark = pytest.mark.cuda


def _loss(out):
    terms = [out] + out.get("aux_outputs", [])
    for key in ("enc_outputs", "interm_outputs"):
        if key in out:
            terms.append(out[key])
    if "dn_outputs" in out:
        terms += [out["dn_outputs"]] + out["dn_outputs"]["aux_outputs"]
    return sum((t["pred_logits"] ** 2).sum() + t["pred_boxes"].abs().sum() for t in terms)


def _run(model, device, x, mask, tgts=None):
    model = copy.deepcopy(model).to(device)
    model.zero_grad()
    args = (x.to(device), mask.to(device))
    if tgts is not None:
        args += ([{k: v.to(device) for k, v in t.items()} for t in tgts],)
    out = model(*args)
    _loss(out).backward()
    grads = {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}
    return {k: out[k].detach().cpu() for k in ("pred_logits", "pred_boxes")}, grads


def _compare(cpu, cuda):
    (out_a, grads_a), (out_b, grads_b) = cpu, cuda
    for key in out_a:
        torch.testing.assert_close(out_b[key], out_a[key], rtol=1e-6, atol=1e-7)
    assert grads_a.keys() == grads_b.keys() and grads_a
    # a floor relative to all gradients: the input projections' GroupNorm biases have a
    # true gradient of 0, so both sides hold rounding noise there
    total = torch.cat([g.flatten() for g in grads_a.values()]).norm()
    for name, grad in grads_a.items():
        err = (grads_b[name] - grad).norm()
        assert err <= 1e-6 * grad.norm() + 1e-9 * total, (
            f"{name}: {err:.3e} vs |g| {grad.norm():.3e}")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_deformable_detr_cuda_matches_cpu_float64(variant):
    model = tiny_model(variant, dropout=0.0).double().train()
    x, mask = images()
    x = x.double()
    _compare(_run(model, "cpu", x, mask), _run(model, "cuda", x, mask))


def test_dino_cuda_matches_cpu_float64():
    # no denoising noise: the CPU and CUDA generators draw different numbers
    model = tiny_dino(dropout=0.0, dn_label_noise_ratio=0.0, dn_box_noise_scale=0.0).double()
    x, mask = images()
    x = x.double()
    tgts = [{"labels": t["labels"], "boxes": t["boxes"].double()} for t in targets()]
    _compare(_run(model, "cpu", x, mask, tgts), _run(model, "cuda", x, mask, tgts))


# (not two-stage: its top-k proposal choice flips between near-equal scores of the tiny
# random model under bfloat16, and then the outputs are different queries)
@pytest.mark.parametrize("variant", ["plain", "box_refine"])
def test_bfloat16_autocast_close_to_float32(variant):
    model = tiny_model(variant, dropout=0.0).cuda().eval()
    x, mask = images()
    x, mask = x.cuda(), mask.cuda()
    with torch.no_grad():
        ref = model(x, mask)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(x, mask)
    for key in ("pred_logits", "pred_boxes"):
        assert torch.isfinite(low[key]).all()
        err = (low[key].float() - ref[key]).abs().max().item()
        assert err < 0.05 * ref[key].abs().max().item() + 0.02, (key, err)
