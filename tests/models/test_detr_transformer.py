"""DETR's dense transformer against a direct computation of the official equations, and
the padding mask."""

import pytest
import torch

from ddetr.models.detr_transformer import DetrTransformer


def attend(mha, q_in, k_in, v_in, key_padding_mask=None):
    """Multi-head attention written out from the module's (q, k, v) projection rows.
    q_in (N, Lq, D), k_in and v_in (N, S, D) -> (N, Lq, D)."""
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    m = mha.num_heads
    n, lq, d = q_in.shape

    def heads(x):  # (N, L, D) -> (N, M, L, D/M)
        return x.view(n, x.shape[1], m, d // m).transpose(1, 2)

    q, k, v = heads(q_in @ wq.T + bq), heads(k_in @ wk.T + bk), heads(v_in @ wv.T + bv)
    scores = q @ k.transpose(-1, -2) / (d // m) ** 0.5
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, lq, d)
    return mha.out_proj(out)


def ffn(layer, x):
    return layer.linear2(torch.relu(layer.linear1(x)))


def reference(model, src, mask, query_embed, pos):
    """The official post-norm equations, layer by layer."""
    # (N, D, H, W) -> (N, S, D)
    src, pos, mask = src.flatten(2).transpose(1, 2), pos.flatten(2).transpose(1, 2), mask.flatten(1)
    for layer in model.encoder.layers:
        src = layer.norm1(src + attend(layer.self_attn, src + pos, src + pos, src, mask))
        src = layer.norm2(src + ffn(layer, src))
    query_pos = query_embed[None].expand(src.shape[0], -1, -1)
    tgt, outs = torch.zeros_like(query_pos), []
    for layer in model.decoder.layers:
        tgt = layer.norm1(tgt + attend(layer.self_attn, tgt + query_pos, tgt + query_pos, tgt))
        tgt = layer.norm2(tgt + attend(layer.multihead_attn, tgt + query_pos, src + pos, src, mask))
        tgt = layer.norm3(tgt + ffn(layer, tgt))
        outs.append(model.decoder.norm(tgt))
    return torch.stack(outs)


def case(seed=0, n=2, d=32, h=5, w=7, lq=6):
    torch.manual_seed(seed)
    model = DetrTransformer(d, 4, 2, 3, 48, dropout=0.1).eval()
    with torch.no_grad():  # LayerNorms off identity so that they count
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    mask = torch.zeros(n, h, w, dtype=torch.bool)
    mask[1, 3:, :] = True
    mask[1, :, 5:] = True
    return model, torch.randn(n, d, h, w), mask, torch.randn(lq, d), torch.randn(n, d, h, w)


def test_matches_the_official_equations():
    model, src, mask, query_embed, pos = case()
    with torch.no_grad():
        hs = model(src, mask, query_embed, pos)
        expected = reference(model, src, mask, query_embed, pos)
    assert hs.shape == (3, 2, 6, 32)
    torch.testing.assert_close(hs, expected, atol=1e-5, rtol=0)


def test_padding_is_never_attended():
    model, src, mask, query_embed, pos = case(seed=1)
    changed = src.clone()
    changed[1][:, mask[1]] = 100.0  # only padded pixels of image 1
    with torch.no_grad():
        a = model(src, mask, query_embed, pos)
        b = model(changed, mask, query_embed, pos)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_dropout_only_in_training():
    model, src, mask, query_embed, pos = case(seed=2)
    with torch.no_grad():
        assert torch.equal(model(src, mask, query_embed, pos), model(src, mask, query_embed, pos))
        model.train()
        assert not torch.equal(model(src, mask, query_embed, pos),
                               model(src, mask, query_embed, pos))


def test_bad_sizes():
    with pytest.raises(ValueError, match="num_heads"):
        DetrTransformer(d_model=30, num_heads=4)
    with pytest.raises(ValueError, match="activation"):
        DetrTransformer(d_model=32, num_heads=4, activation="tanh")
