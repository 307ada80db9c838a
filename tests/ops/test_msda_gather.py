"""The gather form of MSDA (what ONNX graphs hold) against the native op and the
grid_sample reference, on the shared cases: random, border and NaN/inf locations."""

import pytest
import torch

from ddetr.ops import ms_deform_attn, ms_deform_attn_reference
from ddetr.ops.msda_gather import ms_deform_attn_gather
from tests.ops.msda_cases import CASES, make_inputs


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("kind", ["random", "border"])
def test_float64_matches_reference_and_native(case, kind):
    value, shapes, start, loc, attn = make_inputs(case, torch.float64, "cpu", kind)
    out = ms_deform_attn_gather(value, shapes, start, loc, attn)
    ref = ms_deform_attn_reference(value, shapes, start, loc, attn)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, ms_deform_attn(value, shapes, start, loc, attn),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", CASES[:5], ids=str)
def test_float32_close_to_float64(case):
    inputs = make_inputs(case, torch.float64, "cpu", "random")
    ref = ms_deform_attn_gather(*inputs)
    out = ms_deform_attn_gather(*(t.float() if t.is_floating_point() else t for t in inputs))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_locations_add_nothing(bad):
    value, shapes, start, loc, attn = make_inputs(CASES[4], torch.float64, "cpu", "inside")
    loc = loc.clone()
    loc[0, 2, 1, 0, 1, 0] = bad
    out = ms_deform_attn_gather(value, shapes, start, loc, attn)
    assert torch.isfinite(out).all()
    # the same as giving that point no weight
    attn = attn.clone()
    attn[0, 2, 1, 0, 1] = 0
    kept = ms_deform_attn_gather(value, shapes, start, loc.nan_to_num(0.5), attn)
    torch.testing.assert_close(out, kept, rtol=1e-12, atol=1e-12)


def test_gradcheck_float64():
    value, shapes, start, loc, attn = make_inputs(CASES[2], torch.float64, "cpu", "inside")
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    assert torch.autograd.gradcheck(
        lambda v, lo, a: ms_deform_attn_gather(v, shapes, start, lo, a), leaves)
