"""ms_deform_attn against the grid_sample reference: values, gradients, precisions."""

import pytest
import torch

from ddetr.ops import MSDeformAttnFunction, ms_deform_attn, ms_deform_attn_reference
from tests.ops.msda_cases import CASES, MANY_QUERIES, Case, make_inputs

torch.set_num_threads(2)


@pytest.fixture
def reproducible():
    """Deterministic algorithms on for one test: the CUDA backward's default path adds
    into grad_value with atomics, in a different order each run, so two runs agree
    bitwise only on the deterministic path."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def run(fn, inputs, grad_out=None, create=None):
    """Output and the gradients (value, locations, weights) of `fn` on fresh leaves."""
    value, shapes, start, loc, attn = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    out = fn(leaves[0], shapes, start, leaves[1], leaves[2])
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                               dtype=torch.float64).to(out)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return out, grads, grad_out


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("kind", ["random", "inside", "border"])
def test_float64_matches_reference(case, kind, device):
    inputs = make_inputs(case, torch.float64, device, kind)
    out, grads, g = run(ms_deform_attn, inputs)
    ref, ref_grads, _ = run(ms_deform_attn_reference, inputs, g)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    names = ["value", "sampling_locations", "attention_weights"]
    for name, got, want in zip(names, grads, ref_grads):
        if kind == "border" and name == "sampling_locations":
            # Exact pixel centres sit on the kinks of the bilinear interpolant, where the
            # derivative is one-sided and rounding decides the side: compare elsewhere.
            continue
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_float32_matches_float64_reference(case, device):
    inputs64 = make_inputs(case, torch.float64, device)
    inputs32 = tuple(t.float() if t.is_floating_point() else t for t in inputs64)
    out, grads, g = run(ms_deform_attn, inputs32)
    ref, ref_grads, _ = run(ms_deform_attn_reference, inputs64, g)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        # Location gradients scale with the level size (d/dx = W * ...).
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["random", "border"])
def test_many_queries_match_reference(kind, device):
    # float64: the reordered backward sums the same terms, to rounding
    inputs64 = make_inputs(MANY_QUERIES, torch.float64, device, kind)
    out, grads, g = run(ms_deform_attn, inputs64)
    ref, ref_grads, _ = run(ms_deform_attn_reference, inputs64, g)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for name, got, want in zip(["value", "locations", "weights"], grads, ref_grads):
        if kind == "border" and name == "locations":
            continue  # one-sided derivatives at pixel centres (see above)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=name)
    # float32: within 3x the error of the reference computed in float32 (location
    # gradients reach ~1e3 here, scaled by the level width, so fixed tolerances do not fit)
    inputs32 = tuple(t.float() if t.is_floating_point() else t for t in inputs64)
    _, grads32, _ = run(ms_deform_attn, inputs32, g)
    _, ref32, _ = run(ms_deform_attn_reference, inputs32, g)
    for name, got, low, want in zip(["value", "locations", "weights"], grads32, ref32,
                                    ref_grads):
        if kind == "border" and name == "locations":
            continue
        err = (got.double() - want).abs().max().item()
        ref_err = (low.double() - want).abs().max().item()
        assert err <= 3 * ref_err + 1e-6, (name, err, ref_err)


# gradcheck perturbs every input element: keep these problems tiny.
GRADCHECK_CASES = [
    Case(((1, 1),), n=1, m=1, d=2, lq=2, p=1),
    Case(((3, 2), (1, 2)), n=2, m=2, d=3, lq=2, p=2),
    Case(((4, 3), (2, 2), (1, 1)), n=1, m=2, d=2, lq=3, p=2),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=str)
def test_gradcheck_float64(case, device):
    value, shapes, start, loc, attn = make_inputs(case, torch.float64, device, "inside")
    leaves = [t.requires_grad_() for t in (value, loc, attn)]
    assert torch.autograd.gradcheck(
        lambda v, l, a: ms_deform_attn(v, shapes, start, l, a), leaves, eps=1e-6, atol=1e-5)


def low_precision_error(case, dtype, device):
    """Max errors vs float64 of (native in dtype, reference in dtype): forward, grads."""
    inputs64 = make_inputs(case, torch.float64, device, "inside")
    low = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs64)
    ref, ref_grads, g = run(ms_deform_attn_reference, inputs64)
    results = []
    for fn in (ms_deform_attn, ms_deform_attn_reference):
        out, grads, _ = run(fn, low, g)
        errs = [(out.double() - ref).abs().max().item()]
        errs += [(a.double() - b).abs().max().item() for a, b in zip(grads, ref_grads)]
        results.append(errs)
    return results


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bfloat16_error_bounded_by_reference_error(case, device):
    # Rule: the kernel's error against float64 is at most 2x the error of the reference
    # run in the same precision (3x for gradients), plus a floor of one bf16 ulp of the
    # output scale for cases where the reference happens to round luckily.
    native, reference = low_precision_error(case, torch.bfloat16, device)
    factors = [2, 3, 3, 3]
    for i, (got, ref_err, factor) in enumerate(zip(native, reference, factors)):
        assert got <= factor * ref_err + 1e-2, (i, got, ref_err)
    # and in absolute terms: a few bf16 ulps of outputs that are sums of ~L*P/2 values
    assert native[0] < 0.02 * len(case.shapes) * case.p


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES, ids=str)
def test_float16_error_bounded_by_reference_error_cuda(case):
    native, reference = low_precision_error(case, torch.float16, "cuda")
    for i, (got, ref_err, factor) in enumerate(zip(native, reference, [2, 3, 3, 3])):
        assert got <= factor * ref_err + 1e-3, (i, got, ref_err)


def test_float16_on_cpu_runs_in_float32():
    inputs = make_inputs(CASES[2], torch.float64, "cpu", "inside")
    half = tuple(t.half() if t.is_floating_point() else t for t in inputs)
    out = ms_deform_attn(*half)
    assert out.dtype == torch.float16
    ref = ms_deform_attn_reference(*inputs)
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_backward_is_deterministic(dtype, device, reproducible):
    try:
        # Big enough (281,600 samples) for the CPU kernels to use their thread team, with
        # enough queries (1,100) for the backward to visit them in strips.
        case = Case(((16, 20), (8, 10), (4, 5), (2, 3)), n=2, m=8, d=32, lq=1100, p=4)
        inputs = make_inputs(case, dtype, device)
        _, first, g = run(ms_deform_attn, inputs)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            _, again, _ = run(ms_deform_attn, inputs, g)
            for a, b in zip(first, again):
                assert torch.equal(a, b)
    finally:
        torch.set_num_threads(2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_locations_are_off_the_map(bad, device):
    value, shapes, start, loc, attn = make_inputs(CASES[4], torch.float64, device, "inside")
    poisoned = loc.clone()
    poisoned[:, :, :, :, 0, 0] = bad  # x of every first point
    far = loc.clone()
    far[:, :, :, :, 0, :] = 10.0     # the same samples, well off the map
    out, grads, g = run(ms_deform_attn, (value, shapes, start, poisoned, attn))
    want, want_grads, _ = run(ms_deform_attn, (value, shapes, start, far, attn), g)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want)
    for got, exp in zip(grads, want_grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, exp)
    assert (grads[1][:, :, :, :, 0] == 0).all() and (grads[2][:, :, :, :, 0] == 0).all()


def test_non_contiguous_inputs(device, reproducible):
    value, shapes, start, loc, attn = make_inputs(CASES[4], torch.float64, device)
    # Same numbers in transposed storage.
    value_t = value.transpose(0, 1).contiguous().transpose(0, 1)
    loc_t = loc.permute(5, 0, 1, 2, 3, 4).contiguous().permute(1, 2, 3, 4, 5, 0)
    attn_t = attn.transpose(1, 3).contiguous().transpose(1, 3)
    assert not (value_t.is_contiguous() or loc_t.is_contiguous() or attn_t.is_contiguous())
    out, grads, g = run(ms_deform_attn, (value_t, shapes, start, loc_t, attn_t))
    want, want_grads, _ = run(ms_deform_attn, (value, shapes, start, loc, attn), g)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dim", ["n", "lq", "m", "d", "p", "p-many-queries"])
def test_zero_sized_dimensions(dim, device):
    from dataclasses import replace
    # (no points with enough queries for the CPU backward's visit order, which must not
    # read the empty locations)
    base = MANY_QUERIES if dim == "p-many-queries" else CASES[2]
    case = replace(base, **{dim.split("-")[0]: 0})
    inputs = make_inputs(case, torch.float64, device)
    out, grads, g = run(ms_deform_attn, inputs)
    ref, ref_grads, _ = run(ms_deform_attn_reference, inputs, g)
    assert out.shape == ref.shape == (case.n, case.lq, case.m * case.d)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_list_shapes_and_missing_start_index():
    value, shapes, start, loc, attn = make_inputs(CASES[4], torch.float64)
    want = ms_deform_attn(value, shapes, start, loc, attn)
    got = ms_deform_attn(value, shapes.tolist(), None, loc, attn)
    assert torch.equal(got, want)


def test_official_function_signature(device, reproducible):
    inputs = make_inputs(CASES[3], torch.float64, device)
    out, grads, g = run(lambda *a: MSDeformAttnFunction.apply(*a, 64), inputs)
    want, want_grads, _ = run(ms_deform_attn, inputs, g)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mixed_dtypes_keep_value_dtype_and_input_grads():
    value, shapes, start, loc, attn = make_inputs(CASES[4], torch.float32)
    value = value.bfloat16().requires_grad_()
    loc, attn = loc.requires_grad_(), attn.requires_grad_()
    out = ms_deform_attn(value, shapes, start, loc, attn)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert value.grad.dtype == torch.bfloat16
    assert loc.grad.dtype == attn.grad.dtype == torch.float32


def test_falls_back_to_the_reference_with_a_warning(monkeypatch):
    from ddetr._native import loader
    inputs = make_inputs(CASES[4], torch.float64)
    want, want_grads, g = run(ms_deform_attn_reference, inputs)
    monkeypatch.setattr(loader, "_C", None)
    monkeypatch.setattr(loader, "_warned", False)
    with pytest.warns(RuntimeWarning, match="pure-PyTorch reference"):
        out, grads, _ = run(ms_deform_attn, inputs, g)
    torch.testing.assert_close(out, want)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b)
    with pytest.warns(RuntimeWarning, match="pure-PyTorch reference"):
        monkeypatch.setattr(loader, "_warned", False)
        out, grads, _ = run(lambda *a: MSDeformAttnFunction.apply(*a, 64), inputs, g)
    torch.testing.assert_close(out, want)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b)
