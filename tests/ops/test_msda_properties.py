"""Property-based tests of ms_deform_attn against the pure-PyTorch reference: random
level tables (1-4 levels, sides 1-9), batch, heads, odd head sizes, queries and points;
locations inside, on the borders, off the map and non-finite; float64 and float32, and
bfloat16 values against float32. The number of examples is bounded (CI runs the default
profile; DDETR_HYPOTHESIS_EXAMPLES raises it for a longer local search)."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddetr import _native
from ddetr.ops import ms_deform_attn, ms_deform_attn_reference

pytestmark = pytest.mark.skipif(not _native.available(), reason="native extension not built")
EXAMPLES = int(os.environ.get("DDETR_HYPOTHESIS_EXAMPLES", "40"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
SPECIAL = [0.0, 1.0, 0.5, -0.5, 1.5, 1e9, -1e9, float("nan"), float("inf"), -float("inf")]


@st.composite
def problems(draw):
    levels = draw(st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1,
                           max_size=4))
    n, m = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    d, lq, p = draw(st.integers(1, 9)), draw(st.integers(1, 12)), draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    special_share = draw(st.sampled_from([0.0, 0.1, 0.5]))
    return levels, n, m, d, lq, p, seed, special_share


def make(levels, n, m, d, lq, p, seed, special_share):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in levels)
    value = torch.randn(n, s, m, d, generator=g, dtype=torch.float64)
    loc = torch.rand(n, lq, m, len(levels), p, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
    specials = torch.tensor(SPECIAL, dtype=torch.float64)
    pick = torch.randint(0, len(SPECIAL), loc.shape, generator=g)
    use = torch.rand(loc.shape, generator=g) < special_share
    loc = torch.where(use, specials[pick], loc)
    attn = torch.rand(n, lq, m, len(levels), p, generator=g, dtype=torch.float64)
    return value, torch.tensor(levels), loc, attn


def both(inputs, dtype):
    """(ours, reference) outputs and gradients of inputs in dtype."""
    results = []
    for fn in (ms_deform_attn, ms_deform_attn_reference):
        leaves = [inputs[0].to(dtype).requires_grad_(), inputs[2].to(dtype).requires_grad_(),
                  inputs[3].to(dtype).requires_grad_()]
        out = fn(leaves[0], inputs[1], None, leaves[1], leaves[2])
        g = torch.ones_like(out)
        results.append([out, *torch.autograd.grad(out, leaves, g)])
    return results


def on_the_edge(levels, loc):
    """(N, Lq, M, L, P, 1) True where x * W - 0.5 or y * H - 0.5 is exactly -1 or W (H):
    off the map by the op's definition (no gradient), while grid_sample still gives the
    location a one-sided gradient there."""
    size = torch.tensor([[w, h] for h, w in levels], dtype=loc.dtype).view(1, 1, 1, -1, 1, 2)
    px = loc * size - 0.5
    return ((px == -1) | (px == size)).any(-1, keepdim=True)


@SETTINGS
@given(problems(), st.sampled_from([torch.float64, torch.float32]))
def test_matches_reference(problem, dtype):
    inputs = make(*problem)
    ours, ref = both(inputs, dtype)
    tol = {torch.float64: 1e-9, torch.float32: 2e-4}[dtype]
    edge = on_the_edge(problem[0], inputs[2].to(dtype))
    for name, a, b in zip(("out", "grad_value", "grad_loc", "grad_attn"), ours, ref):
        assert torch.isfinite(a).all(), name
        # the reference's location gradient is not defined at non-finite locations, and
        # one-sided on the map's edge: ours is 0 at both (documented)
        keep = torch.isfinite(b)
        if name == "grad_loc":
            assert (a[edge.expand_as(a)] == 0).all()
            keep &= ~edge
        torch.testing.assert_close(a[keep], b[keep], rtol=tol, atol=tol, msg=name)


@SETTINGS
@given(problems())
def test_bfloat16_values_against_float32(problem):
    value, shapes, loc, attn = make(*problem)
    out16 = ms_deform_attn(value.to(torch.bfloat16), shapes, None, loc.float(), attn.float())
    out32 = ms_deform_attn(value.to(torch.bfloat16).float(), shapes, None, loc.float(),
                           attn.float())
    # the same bf16 values summed in float32: only the output's rounding to bf16 differs
    torch.testing.assert_close(out16.float(), out32, rtol=2 ** -8, atol=1e-6)
