"""Inference sees the weights as they are now, however they were changed: through an
optimiser step, through ``.data`` (as EMA updates and many training scripts write them),
or by torch's fused AdamW, neither of which moves a tensor's version counter. (ddetr once
kept folded batch-norm weights and joined offset / attention-weight matrices between
calls, keyed on version counters, and served stale ones after such changes.)"""

import copy

import pytest
import torch

from ddetr.ops.native_layers import library_ready
from tests.models.detr_cases import tiny_model


def _outputs(model, images):
    with torch.no_grad():
        out = model(images)
    return out["pred_logits"], out["pred_boxes"]


def _fresh_copy_equals(model, images, got):
    # the same weights in a model that never ran: what the outputs must be
    fresh = copy.deepcopy(model)
    want = _outputs(fresh, images)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def _change_through_data(model):
    # backbone convolution weights and frozen batch-norm statistics, and the offsets /
    # attention-weight projections of every deformable attention, written via .data
    for name, p in model.named_parameters():
        if "sampling_offsets" in name or "attention_weights" in name or "backbone" in name:
            p.data.mul_(1.5).add_(0.01)
    for name, b in model.named_buffers():
        if "running_var" in name:
            b.data.mul_(2.0)


@pytest.mark.parametrize("native", [True, False] if library_ready(torch.zeros(1)) else [False])
def test_inference_after_weights_change_without_a_version_bump(native):
    model = tiny_model("two_stage", jitter=0.05)
    model.set_native_layers(native)
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    before = _outputs(model, images)
    _change_through_data(model)
    after = _outputs(model, images)
    assert not torch.equal(before[0], after[0])
    _fresh_copy_equals(model, images, after)


def test_inference_after_a_fused_adamw_step():
    model = tiny_model("two_stage", jitter=0.05)
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    before = _outputs(model, images)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, fused=True)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    after = _outputs(model, images)
    assert not torch.equal(before[0], after[0])
    _fresh_copy_equals(model, images, after)
