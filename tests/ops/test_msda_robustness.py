"""Cases a user hit with the MSDA op: second derivatives through the drop-in Function,
level tables on another device, float sizes, float16 on the CPU, infinite weights."""

import pytest
import torch

from ddetr.ops import MSDeformAttnFunction, ms_deform_attn, ms_deform_attn_reference
from tests.ops.msda_cases import CASES, make_inputs

CASE = CASES[2]  # 2 levels, N=2, M=3, D=24


def test_function_refuses_double_backward():
    # Its backward is not differentiable: create_graph=True must not hand back
    # constant gradients of the gradients.
    value, shapes, start, loc, attn = make_inputs(CASE, torch.float64, kind="inside")
    leaves = [t.requires_grad_() for t in (value, loc, attn)]
    out = MSDeformAttnFunction.apply(value, shapes, start, loc, attn, 64)
    grads = torch.autograd.grad(out.square().sum(), leaves, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        sum(g.square().sum() for g in grads).backward()


@pytest.mark.parametrize("which", ["spatial_shapes", "level_start_index"])
def test_level_table_on_the_meta_device_is_refused(which):
    value, shapes, start, loc, attn = make_inputs(CASE, torch.float32)
    args = dict(value=value, spatial_shapes=shapes, level_start_index=start,
                sampling_locations=loc, attention_weights=attn)
    args[which] = args[which].to("meta")
    with pytest.raises(ValueError, match=which):
        ms_deform_attn(**args)


def test_float_sizes_in_a_list_are_refused_not_truncated():
    value, shapes, start, loc, attn = make_inputs(CASE, torch.float32)
    floats = [[float(h) + 0.9, float(w)] for h, w in shapes.tolist()]
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn(value, floats, None, loc, attn)
    with pytest.raises(ValueError, match="level_start_index"):
        ms_deform_attn(value, shapes, [0.0, 35.0], loc, attn)


def test_function_computes_float16_on_the_cpu():
    value, shapes, start, loc, attn = make_inputs(CASE, torch.float32, kind="inside")
    half = value.half().requires_grad_()
    out = MSDeformAttnFunction.apply(half, shapes, start, loc, attn, 64)
    assert out.dtype == torch.float16
    ref = ms_deform_attn_reference(half.double(), shapes, start, loc.double(), attn.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)
    out.float().sum().backward()
    assert half.grad.dtype == torch.float16 and torch.isfinite(half.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_infinite_weight_on_a_pixel_centre_gives_inf_like_the_reference(dtype, device):
    # A location on a pixel centre has three corners of weight 0: inf * 0 must not
    # turn the sample into NaN. Positive values, so every in-map sample is > 0.
    value, shapes, start, loc, attn = make_inputs(CASE, dtype, device, kind="inside")
    value = value.abs() + 0.5
    h, w = shapes[1].tolist()  # 3 x 4: the centre below is exact in binary
    loc[..., 1, :, 0] = (1 + 0.5) / w  # the centre of pixel (1, 1) of level 1
    loc[..., 1, :, 1] = (1 + 0.5) / h
    attn[:, :, :, 1, 0] = float("inf")
    out = ms_deform_attn(value, shapes, start, loc, attn)
    ref = ms_deform_attn_reference(value, shapes, start, loc, attn)
    assert torch.isinf(ref).all() and not torch.isnan(out).any()
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_weight_off_the_map_adds_nothing(bad, device):
    # As the official op (and the CUDA kernels): an off-map sample is skipped whatever
    # its weight, so the output equals that of a zero weight there.
    value, shapes, start, loc, attn = make_inputs(CASE, torch.float64, device, kind="inside")
    loc[:, :, :, 1, 0, 0] = 2.5  # first point of level 1 far right of the map
    poisoned = attn.clone()
    poisoned[:, :, :, 1, 0] = bad
    zeroed = attn.clone()
    zeroed[:, :, :, 1, 0] = 0
    out = ms_deform_attn(value, shapes, start, loc, poisoned)
    assert torch.equal(out, ms_deform_attn(value, shapes, start, loc, zeroed))
