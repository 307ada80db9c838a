"""Deformable transformer: two-stage proposals by hand, decoder reference points,
box refinement and top-k proposal selection."""

import math

import pytest
import torch

from ddetr.models.box_ops import inverse_sigmoid
from ddetr.models.deformable_transformer import DeformableTransformer
from ddetr.models.heads import MLP, build_heads
from ddetr.models import position_encoding, two_stage
from ddetr.models.two_stage import encoder_proposals, proposal_boxes, proposal_pos_embed

SHAPES = torch.tensor([[2, 2], [1, 2]])


def padding_mask():
    """(2, 6) over levels 2x2 and 1x2: image 1 has its last level-0 column padded."""
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1, [1, 3]] = True
    return mask


def test_proposal_boxes_by_hand():
    boxes = proposal_boxes(padding_mask(), SHAPES)
    a, b = 0.05, 0.1  # 0.05 * 2 ** level
    expected0 = [[.25, .25, a, a], [.75, .25, a, a], [.25, .75, a, a], [.75, .75, a, a],
                 [.25, .5, b, b], [.75, .5, b, b]]
    # image 1, level 0: one valid column, so x = (j + 0.5) / 1
    expected1 = [[.5, .25, a, a], [1.5, .25, a, a], [.5, .75, a, a], [1.5, .75, a, a],
                 [.25, .5, b, b], [.75, .5, b, b]]
    torch.testing.assert_close(boxes, torch.tensor([expected0, expected1]))


def test_encoder_proposals_invalid_become_inf():
    logits, keep = encoder_proposals(padding_mask(), SHAPES)
    assert keep[..., 0].tolist() == [[True] * 6, [True, False, True, False, True, True]]
    assert torch.isinf(logits[1, [1, 3]]).all() and torch.isfinite(logits[keep[..., 0]]).all()
    torch.testing.assert_close(logits[0, 0], inverse_sigmoid(torch.tensor([.25, .25, .05, .05])))
    # a 1x1 level l proposes size 0.05 * 2 ** l: past 0.99 from level 5 on
    shapes = torch.ones(6, 2, dtype=torch.long)
    _, keep = encoder_proposals(torch.zeros(1, 6, dtype=torch.bool), shapes)
    assert keep[0, :, 0].tolist() == [True] * 5 + [False]


def test_proposal_pos_embed_by_hand():
    logits = torch.tensor([[[0.0, 1.0, -2.0, 0.5]]])
    embed = proposal_pos_embed(logits, num_pos_feats=2)  # frequency 1 for both channels
    angles = torch.sigmoid(logits[0, 0]) * 2 * math.pi
    expected = torch.stack([angles.sin(), angles.cos()], -1).flatten()
    torch.testing.assert_close(embed[0, 0], expected)


def pyramid(n=2, c=32, seed=0):
    """Three levels; image 1 has the right half of every level padded."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(8, 12), (4, 6), (2, 4)]
    srcs = [torch.randn(n, c, h, w, generator=g) for h, w in sizes]
    pos = [torch.randn(n, c, h, w, generator=g) for h, w in sizes]
    masks = []
    for h, w in sizes:
        m = torch.zeros(n, h, w, dtype=torch.bool)
        m[1, :, w // 2:] = True
        masks.append(m)
    return srcs, masks, pos


def small_transformer(**kw):
    torch.manual_seed(0)
    return DeformableTransformer(d_model=32, num_heads=4, num_encoder_layers=1,
                                 num_decoder_layers=2, dim_feedforward=64, dropout=0.0,
                                 num_feature_levels=3, **kw).eval()


def capture_cross_attn_references(transformer):
    seen = []
    for layer in transformer.decoder.layers:
        layer.cross_attn.register_forward_pre_hook(lambda mod, args: seen.append(args[1]))
    return seen


def test_decoder_reference_points_scaled_by_valid_ratios():
    transformer = small_transformer()
    seen = capture_cross_attn_references(transformer)
    query_embed = torch.randn(5, 64)
    out = transformer(*pyramid(), query_embed)
    expected = transformer.reference_points(query_embed[:, :32]).sigmoid()
    torch.testing.assert_close(out.init_reference, expected[None].expand(2, -1, -1))
    ratios = torch.tensor([[1.0, 1.0], [0.5, 1.0]])  # (w, h) per image, same on each level
    for refs in seen:  # no refinement: both layers see the initial points
        assert refs.shape == (2, 5, 3, 2)
        expected = out.init_reference[:, :, None] * ratios[:, None, None]
        torch.testing.assert_close(refs, expected.expand(-1, -1, 3, -1))


def test_box_refinement_and_two_stage_top_k():
    transformer = small_transformer(two_stage=True, two_stage_num_proposals=7)
    class_embed, bbox_embed = build_heads(32, 3, 3, with_box_refine=True, two_stage=True)
    for head in bbox_embed:
        torch.nn.init.normal_(head.layers[-1].weight, std=0.1)
    transformer.decoder.class_embed, transformer.decoder.bbox_embed = class_embed, bbox_embed
    seen = capture_cross_attn_references(transformer)
    with torch.no_grad():
        out = transformer(*pyramid())
    top = out.enc_outputs_class[..., 0].topk(7, dim=1).indices
    chosen = torch.gather(out.enc_outputs_coord_unact, 1, top[..., None].expand(-1, -1, 4))
    torch.testing.assert_close(out.init_reference, chosen.sigmoid())
    previous = out.init_reference
    ratios = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.5, 1.0, 0.5, 1.0]])
    for i in range(2):
        expected = previous[:, :, None] * ratios[:, None, None]
        torch.testing.assert_close(seen[i], expected.expand(-1, -1, 3, -1))
        refined = (bbox_embed[i](out.hs[i]) + inverse_sigmoid(previous)).sigmoid()
        torch.testing.assert_close(out.inter_references[i], refined)
        previous = refined


def test_shared_heads_without_refinement():
    class_embed, bbox_embed = build_heads(32, 3, 4, with_box_refine=False, two_stage=False)
    assert all(h is class_embed[0] for h in class_embed)
    assert all(h is bbox_embed[0] for h in bbox_embed)
    assert isinstance(bbox_embed[0], MLP)
    assert bbox_embed[0].layers[-1].bias.tolist() == [0.0, 0.0, -2.0, -2.0]
    torch.testing.assert_close(class_embed[0].bias, torch.full((3,), -math.log(99.0)))


def test_unpadded_proposals_are_made_once_per_sizes():
    two_stage.UNPADDED.clear()
    unpadded = torch.zeros(3, 6, dtype=torch.bool)
    logits, keep = encoder_proposals(unpadded, SHAPES)
    want_logits, want_keep = two_stage._proposals(unpadded, SHAPES, torch.float32, None)
    assert torch.equal(logits, want_logits) and torch.equal(keep, want_keep)
    again, _ = encoder_proposals(unpadded[:2], SHAPES)
    cached = two_stage.UNPADDED.get((((2, 2), (1, 2)), None, torch.float32, "cpu"),
                                    lambda: pytest.fail("not cached"))
    assert again.shape == (2, 6, 4) and torch.equal(again, cached[0].expand(2, -1, -1))
    # the level ids set the box sizes: another entry
    shifted, _ = encoder_proposals(unpadded, SHAPES, level_ids=[1, 2])
    assert torch.equal(shifted, two_stage._proposals(unpadded, SHAPES, torch.float32, [1, 2])[0])
    assert not torch.equal(shifted, logits)
    assert len(two_stage.UNPADDED.keys()) == 2
    # a padded mask never reads or fills the cache
    padded_logits, _ = encoder_proposals(padding_mask(), SHAPES)
    assert torch.isinf(padded_logits[1, [1, 3]]).all()
    assert len(two_stage.UNPADDED.keys()) == 2


def test_cached_constants_made_in_inference_mode_serve_autograd():
    # a first call under torch.inference_mode (ddetr predict) must not leave inference
    # tensors that a later training step would save for its backward
    two_stage.UNPADDED.clear()
    position_encoding.FREQUENCIES.clear()
    unpadded = torch.zeros(2, 6, dtype=torch.bool)
    with torch.inference_mode():
        encoder_proposals(unpadded, SHAPES)
        proposal_pos_embed(torch.zeros(1, 1, 4), num_pos_feats=8)
    coords = torch.randn(1, 3, 4, requires_grad=True)
    logits, keep = encoder_proposals(unpadded, SHAPES)
    features = torch.randn(2, 6, 4, requires_grad=True)
    loss = proposal_pos_embed(coords, num_pos_feats=8).sum() + \
        (features.masked_fill(~keep, 0.0) * logits).sum()
    loss.backward()
    assert coords.grad.abs().sum() > 0 and features.grad.abs().sum() > 0
