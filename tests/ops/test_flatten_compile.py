"""The flattening ops are torch.library custom ops: torch.compile traces them whole."""

import pytest
import torch

from ddetr.ops import encoder_reference_points, flatten_multiscale
from tests.ops.flatten_cases import Pyramid, leaves, make_pyramid

CASE = Pyramid(((6, 5), (3, 3)), c=8, padding=("none", "pad"))


class Encoder(torch.nn.Module):
    """Flatten, reference points, then a layer that uses all three outputs."""

    def __init__(self):
        super().__init__()
        self.level_embed = torch.nn.Parameter(torch.randn(2, 8))
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, features, masks, pos_embeds):
        flat = flatten_multiscale(features, masks, pos_embeds, self.level_embed)
        sizes = [f.shape[-2:] for f in features]
        points = encoder_reference_points(sizes, flat.valid_ratios)
        tokens = self.proj(flat.src + flat.pos).masked_fill(flat.mask[..., None], 0)
        return tokens * points.sum((-1, -2))[..., None]


def test_compile_fullgraph_forward_and_backward():
    torch.manual_seed(0)
    model = Encoder()
    features, masks, pos_embeds, _ = make_pyramid(CASE)
    compiled = torch.compile(model, fullgraph=True)
    results = []
    for fn in (model, compiled):
        (feats,) = leaves(features)
        out = fn(feats, masks, pos_embeds)
        grads = torch.autograd.grad(out.square().sum(), feats + list(model.parameters()))
        results.append((out, grads))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


def test_compiled_reference_points_with_a_tensor_say_what_to_do():
    features, masks, pos_embeds, level_embed = make_pyramid(CASE)

    def fn(ratios, shapes):
        return encoder_reference_points(shapes, ratios)

    flat = flatten_multiscale(features, masks, pos_embeds, level_embed)
    with pytest.raises(Exception, match=r"pass the \(H, W\) pairs as Python ints"):
        torch.compile(fn, fullgraph=True)(flat.valid_ratios, flat.spatial_shapes)


def test_opcheck():
    features, masks, pos_embeds, level_embed = make_pyramid(CASE, torch.float64)
    feats, pos, embed = leaves(features, pos_embeds, level_embed)
    torch.library.opcheck(torch.ops.ddetr.flatten_multiscale.default,
                          (feats, masks, pos, embed))
    torch.library.opcheck(torch.ops.ddetr.flatten_multiscale.default,
                          (feats, [], pos, None))
    ratios = flatten_multiscale(features, masks, pos_embeds, level_embed).valid_ratios
    torch.library.opcheck(torch.ops.ddetr.encoder_reference_points.default,
                          (ratios.requires_grad_(), [6, 5, 3, 3]))
