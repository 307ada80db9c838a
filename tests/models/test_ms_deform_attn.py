"""MSDeformAttn: official initialisation, location math, padding mask, arguments."""

import math

import pytest
import torch

from ddetr import MSDeformAttn
from ddetr.ops import ms_deform_attn_reference

SHAPES = torch.tensor([[6, 8], [3, 4], [2, 2]])
S = int((SHAPES[:, 0] * SHAPES[:, 1]).sum())


def make(n=2, lq=5, d_model=32, ref_dim=2, seed=0):
    torch.manual_seed(seed)
    module = MSDeformAttn(d_model=d_model, n_levels=3, n_heads=4, n_points=3).double()
    # Move off the official init so offsets and weights depend on the query.
    with torch.no_grad():
        module.sampling_offsets.weight.normal_(0, 0.05)
        module.attention_weights.weight.normal_(0, 0.1)
    query = torch.randn(n, lq, d_model, dtype=torch.float64)
    src = torch.randn(n, S, d_model, dtype=torch.float64)
    ref = torch.rand(n, lq, 3, ref_dim, dtype=torch.float64)
    if ref_dim == 4:
        ref[..., 2:] = ref[..., 2:] * 0.5 + 0.1
    return module, query, ref, src


def expected(module, query, ref, src, mask=None):
    """The module's math written out independently, on the reference op."""
    n, lq, _ = query.shape
    m, lv, p = module.n_heads, module.n_levels, module.n_points
    value = module.value_proj(src)
    if mask is not None:
        value = value * (~mask)[..., None]
    value = value.view(n, S, m, -1)
    off = module.sampling_offsets(query).view(n, lq, m, lv, p, 2)
    logits = module.attention_weights(query).view(n, lq, m, lv * p)
    weights = logits.softmax(-1).view(n, lq, m, lv, p)
    loc = torch.empty_like(off)
    for lvl, (h, w) in enumerate(SHAPES.tolist()):
        base = ref[:, :, None, lvl, None, :2]
        if ref.shape[-1] == 2:
            scale = torch.tensor([1.0 / w, 1.0 / h], dtype=off.dtype)
        else:
            scale = ref[:, :, None, lvl, None, 2:] * 0.5 / p
        loc[:, :, :, lvl] = base + off[:, :, :, lvl] * scale
    return module.output_proj(ms_deform_attn_reference(value, SHAPES, None, loc, weights))


def test_official_initialisation():
    module = MSDeformAttn(d_model=256, n_levels=4, n_heads=8, n_points=4)
    assert torch.count_nonzero(module.sampling_offsets.weight) == 0
    bias = module.sampling_offsets.bias.view(8, 4, 4, 2)
    for head in range(8):
        angle = 2 * math.pi * head / 8
        direction = torch.tensor([math.cos(angle), math.sin(angle)])
        direction /= direction.abs().max()
        for point in range(4):
            for level in range(4):
                torch.testing.assert_close(bias[head, level, point], direction * (point + 1))
    assert torch.count_nonzero(module.attention_weights.weight) == 0
    assert torch.count_nonzero(module.attention_weights.bias) == 0
    assert torch.count_nonzero(module.value_proj.bias) == 0
    assert torch.count_nonzero(module.output_proj.bias) == 0
    names = {n for n, _ in module.named_parameters()}
    assert names == {f"{layer}.{kind}" for layer in ("sampling_offsets", "attention_weights",
                                                     "value_proj", "output_proj")
                     for kind in ("weight", "bias")}


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_forward_matches_written_out_math(ref_dim):
    module, query, ref, src = make(ref_dim=ref_dim)
    out = module(query, ref, src, SHAPES, None)
    torch.testing.assert_close(out, expected(module, query, ref, src))
    out.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())


def test_padding_mask_hides_padded_values():
    module, query, ref, src = make()
    mask = torch.zeros(2, S, dtype=torch.bool)
    mask[1, 30:] = True
    out = module(query, ref, src, SHAPES, None, mask)
    torch.testing.assert_close(out, expected(module, query, ref, src, mask))
    changed = src.clone()
    changed[1, 30:] = 1e3
    torch.testing.assert_close(module(query, ref, changed, SHAPES, None, mask), out)


def test_any_number_of_levels_and_points():
    torch.manual_seed(0)
    shapes = torch.tensor([[3, 3]] + [[1, 2]] * 6)
    s = int((shapes[:, 0] * shapes[:, 1]).sum())
    module = MSDeformAttn(d_model=8, n_levels=7, n_heads=1, n_points=9)
    out = module(torch.randn(1, 4, 8), torch.rand(1, 4, 7, 2), torch.randn(1, s, 8), shapes)
    assert out.shape == (1, 4, 8) and torch.isfinite(out).all()


@pytest.mark.parametrize("kwargs, needle", [
    (dict(d_model=30, n_heads=8), "divisible"),
    (dict(n_points=0), "n_points"),
    (dict(n_levels=2.5), "n_levels"),
])
def test_bad_constructor_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        MSDeformAttn(**kwargs)


def test_bad_forward_arguments():
    module, query, ref, src = make()
    with pytest.raises(ValueError, match="query"):
        module(query[..., :-1], ref, src, SHAPES)
    with pytest.raises(ValueError, match="reference_points"):
        module(query, ref[:, :, :2], src, SHAPES)
    with pytest.raises(ValueError, match="input_flatten"):
        module(query, ref, src[:1], SHAPES)
    with pytest.raises(ValueError, match="input_spatial_shapes"):
        module(query, ref, src, SHAPES[:2])
    with pytest.raises(ValueError, match="input_padding_mask"):
        module(query, ref, src, SHAPES, None, torch.zeros(2, S))
    with pytest.raises(ValueError, match="value has"):  # levels do not add up to S
        module(query, ref, src[:, :-1], SHAPES)
