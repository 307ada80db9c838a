"""flatten_multiscale and encoder_reference_points against their PyTorch references."""

import pytest
import torch

from ddetr.ops import (encoder_reference_points, encoder_reference_points_reference,
                       flatten_multiscale, flatten_multiscale_reference)
from tests.ops.flatten_cases import CASES, GRADCHECK_CASES, Pyramid, leaves, make_pyramid

torch.set_num_threads(2)

DIFFERENTIABLE = ("src", "pos")


def assert_same(got, want, device):
    """Every field equal; valid_ratios to 1 ulp on CUDA, where PyTorch divides by a
    CPU scalar through its reciprocal."""
    for name, a, b in zip(got._fields, got, want):
        if name == "levels":  # the table of spatial_shapes and level_start_index
            assert a.rows == b.rows and torch.equal(a.spatial_shapes, got.spatial_shapes)
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if device == "cuda" and name == "valid_ratios":
            torch.testing.assert_close(a, b, rtol=2e-7, atol=0, msg=name)
        else:
            assert torch.equal(a, b), name


def run(fn, inputs, grads=None):
    """Output of `fn` on fresh leaves and the gradients of (features, pos_embeds,
    level_embed) for upstream gradients `grads` of (src, pos) (drawn when None)."""
    features, masks, pos_embeds, level_embed = inputs
    feats, pos, embed = leaves(features, pos_embeds, level_embed)
    out = fn(feats, masks, pos, embed)
    if grads is None:
        g = torch.Generator().manual_seed(1)
        grads = [torch.randn(out.src.shape, generator=g, dtype=torch.float64).to(out.src)
                 for _ in DIFFERENTIABLE]
    got = torch.autograd.grad([out.src, out.pos], feats + pos + [embed],
                              [gr.to(out.src.dtype) for gr in grads])
    n = len(feats)
    return out, (got[:n], got[n:2 * n], got[-1]), grads


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_matches_reference(case, dtype, device):
    inputs = make_pyramid(case, dtype, device)
    assert_same(flatten_multiscale(*inputs), flatten_multiscale_reference(*inputs), device)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward_matches_reference(case, device):
    inputs = make_pyramid(case, torch.float32, device)
    _, (g_feat, g_pos, g_embed), grads = run(flatten_multiscale, inputs)
    _, (r_feat, r_pos, _), _ = run(flatten_multiscale_reference, inputs, grads)
    for got, want in zip(g_feat + g_pos, r_feat + r_pos):  # pure copies: bitwise
        assert got.is_contiguous() and torch.equal(got, want.contiguous())
    # level_embed sums in float64 and rounds once: within an ulp of the exact sum.
    inputs64 = tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point()
                     else t for t in inputs)
    _, (_, _, exact), _ = run(flatten_multiscale_reference, inputs64, grads)
    torch.testing.assert_close(g_embed.double(), exact, rtol=1.2e-7, atol=1e-30)


@pytest.mark.parametrize("case", CASES[2:5], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_reference(case, dtype, device):
    inputs = make_pyramid(case, dtype, device)
    out, (g_feat, g_pos, g_embed), grads = run(flatten_multiscale, inputs)
    ref, (r_feat, r_pos, r_embed), _ = run(flatten_multiscale_reference, inputs, grads)
    assert_same(out, ref, device)
    for got, want in zip(g_feat + g_pos, r_feat + r_pos):
        assert torch.equal(got, want)
    # The reference sums in its dtype; the op in float64, rounded once.
    torch.testing.assert_close(g_embed.float(), r_embed.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_gradcheck_float64(case, seed, device):
    features, masks, pos_embeds, level_embed = make_pyramid(case, torch.float64, device, seed)
    n = len(features)
    args = [t.requires_grad_() for t in features + pos_embeds + [level_embed]]

    def fn(*flat):
        out = flatten_multiscale(list(flat[:n]), masks, list(flat[n:2 * n]), flat[-1])
        return out.src, out.pos

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_points_match_reference(case, dtype, device):
    out = flatten_multiscale(*make_pyramid(case, dtype, device))
    got = encoder_reference_points(out.spatial_shapes, out.valid_ratios)
    want = encoder_reference_points_reference(out.spatial_shapes, out.valid_ratios)
    assert got.dtype == want.dtype and got.shape == (case.n, out.src.shape[1], len(case.shapes), 2)
    assert torch.equal(got, want)
    # a list of (H, W) pairs is the same as the tensor
    assert torch.equal(encoder_reference_points(case.shapes, out.valid_ratios), got)


def test_reference_points_gradcheck(device):
    ratios = (torch.rand(2, 3, 2, dtype=torch.float64, device=device) * 0.5 + 0.5)
    shapes = [(3, 2), (2, 2), (1, 3)]
    assert torch.autograd.gradcheck(lambda r: encoder_reference_points(shapes, r),
                                    [ratios.requires_grad_()])


def test_fully_padded_level_is_finite(device):
    case = Pyramid(((6, 5), (3, 3)), c=4, padding=("none", "empty"))
    features, masks, pos_embeds, level_embed = make_pyramid(case, torch.float32, device)
    masks[0][1] = True  # image 1: both levels entirely padding
    out = flatten_multiscale(features, masks, pos_embeds, level_embed)
    assert out.mask[1].all() and not out.mask[0].any()
    # no valid row or column counts as one: ratios (1 / W, 1 / H), never 0
    want = torch.tensor([[1 / 5, 1 / 6], [1 / 3, 1 / 3]], device=device)
    torch.testing.assert_close(out.valid_ratios[1], want)
    points = encoder_reference_points(out.spatial_shapes, out.valid_ratios)
    assert torch.isfinite(points).all()


@pytest.mark.parametrize("no_masks", [None, []])
def test_no_masks_means_no_padding(no_masks, device):
    case = Pyramid(((5, 7), (3, 4)), c=8, padding=("none", "none"))
    features, masks, pos_embeds, level_embed = make_pyramid(case, torch.float32, device)
    assert_same(flatten_multiscale(features, no_masks, pos_embeds, level_embed),
                flatten_multiscale(features, masks, pos_embeds, level_embed), device)


def test_without_level_embed(device):
    features, masks, pos_embeds, _ = make_pyramid(CASES[3], torch.float32, device)
    out = flatten_multiscale(features, masks, pos_embeds, None)
    assert_same(out, flatten_multiscale_reference(features, masks, pos_embeds, None), device)
    (feats,) = leaves(features)
    flatten_multiscale(feats, masks, pos_embeds).src.sum().backward()
    assert all(torch.equal(f.grad, torch.ones_like(f)) for f in feats)


def test_only_some_inputs_need_grad(device):
    # The detector's case: sine position embeddings need no gradient.
    features, masks, pos_embeds, level_embed = make_pyramid(CASES[4], torch.float32, device)
    feats, embed = leaves(features, level_embed)
    out = flatten_multiscale(feats, masks, pos_embeds, embed)
    g_feat = torch.autograd.grad(out.src.sum() + out.pos.sum(), feats + [embed])
    assert all(torch.equal(g, torch.ones_like(g)) for g in g_feat[:-1])
    tokens = sum(h * w for h, w in CASES[4].shapes[:1]) * CASES[4].n
    assert g_feat[-1][0, 0].item() == tokens
    # and an unused output gets a zero gradient
    feats, pos = leaves(features, pos_embeds)
    out = flatten_multiscale(feats, masks, pos, level_embed)
    grads = torch.autograd.grad(out.pos.sum(), feats + pos, allow_unused=True)
    assert all(g is None or not g.any() for g in grads[:len(feats)])
    assert all(torch.equal(g, torch.ones_like(g)) for g in grads[len(feats):])


def test_mixed_dtypes_are_promoted(device):
    features, masks, pos_embeds, level_embed = make_pyramid(CASES[2], torch.float32, device)
    features = [f.bfloat16() for f in features]
    out = flatten_multiscale(features, masks, pos_embeds, level_embed)
    assert out.src.dtype == out.pos.dtype == torch.float32
    assert_same(out, flatten_multiscale_reference(features, masks, pos_embeds, level_embed),
                device)


def test_non_contiguous_inputs(device):
    features, masks, pos_embeds, level_embed = make_pyramid(CASES[3], torch.float32, device)
    want = flatten_multiscale(features, masks, pos_embeds, level_embed)
    strided = ([f.to(memory_format=torch.channels_last) for f in features],
               [m.transpose(1, 2).contiguous().transpose(1, 2) for m in masks],
               [p.transpose(2, 3).contiguous().transpose(2, 3) for p in pos_embeds],
               level_embed.t().contiguous().t())
    assert_same(flatten_multiscale(*strided), want, device)


def test_level_embed_gradient_does_not_depend_on_threads():
    case = Pyramid(((37, 29), (19, 15), (10, 8)), c=256, padding=("pad", "none"))
    inputs = make_pyramid(case, torch.float32)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results.append(run(flatten_multiscale, inputs)[1][2])
    torch.set_num_threads(2)
    assert all(torch.equal(r, results[0]) for r in results[1:])


def test_empty_batch(device):
    case = Pyramid(((5, 7), (3, 4)), c=8, padding=("none",))
    features, masks, pos_embeds, level_embed = make_pyramid(case, torch.float32, device)
    features, pos_embeds = [f[:0] for f in features], [p[:0] for p in pos_embeds]
    masks = [m[:0] for m in masks]
    feats, embed = leaves(features, level_embed)
    out = flatten_multiscale(feats, masks, pos_embeds, embed)
    assert out.src.shape == (0, 47, 8) and out.valid_ratios.shape == (0, 2, 2)
    (g,) = torch.autograd.grad(out.pos.sum(), embed)
    assert torch.equal(g, torch.zeros_like(g))
    assert encoder_reference_points(out.spatial_shapes, out.valid_ratios).shape == (0, 47, 2, 2)


def test_falls_back_to_the_reference_with_a_warning(monkeypatch):
    from ddetr._native import loader
    inputs = make_pyramid(CASES[3], torch.float64)
    want, want_grads, grads = run(flatten_multiscale_reference, inputs)
    monkeypatch.setattr(loader, "_C", None)
    monkeypatch.setattr(loader, "_warned", False)
    with pytest.warns(RuntimeWarning, match="pure-PyTorch reference"):
        got, got_grads, _ = run(flatten_multiscale, inputs, grads)
    assert_same(got, want, "cpu")
    for a, b in zip([*got_grads[0], *got_grads[1], got_grads[2]],
                    [*want_grads[0], *want_grads[1], want_grads[2]]):
        assert torch.equal(a, b)
    monkeypatch.setattr(loader, "_warned", False)
    with pytest.warns(RuntimeWarning, match="pure-PyTorch reference"):
        points = encoder_reference_points(want.spatial_shapes, want.valid_ratios)
    assert torch.equal(points, encoder_reference_points_reference(want.spatial_shapes,
                                                                  want.valid_ratios))
