"""Dropping feature levels (``compress.drop_levels``): the kept levels' pyramid, weights
and attention as in the original, the backbone stopping early, two-stage proposals sized
by their level in the full pyramid, round trips and named errors."""

import pytest
import torch

from ddetr import DeformableDetr, compress
from ddetr.models.two_stage import proposal_boxes
from tests.models.detr_cases import VARIANTS, assert_same, images, outputs, tiny_model
from tests.models.test_dino import tiny_dino

MULTI_SCALE = [v for v in VARIANTS if v != "single_scale"]


def model_of(variant):
    return tiny_dino() if variant == "dino" else tiny_model(variant)


@pytest.mark.parametrize("variant", [*VARIANTS, "dino"])
def test_all_levels_is_the_original(variant):
    model = model_of(variant)
    x, mask = images()
    same = compress.drop_levels(model, model.feature_levels)
    assert same.config["feature_levels"] is None
    assert same.state_dict().keys() == model.state_dict().keys()
    assert_same(outputs(same, x, mask), outputs(model, x, mask))


@pytest.mark.parametrize("variant", [*MULTI_SCALE, "dino"])
@pytest.mark.parametrize("levels", [[0, 1], [0, 2], [1, 3], [1]])
def test_kept_levels_as_in_the_original(variant, levels):
    model = model_of(variant)
    x, mask = images()
    small = compress.drop_levels(model, levels)
    assert small.feature_levels == levels and small.config["feature_levels"] == levels
    # the pyramid: exactly the original's levels, in order
    with torch.no_grad():
        want, got = model.pyramid(x, mask), small.pyramid(x, mask)
    for w, g in zip(want, got):
        assert len(g) == len(levels)
        for lvl, t in zip(levels, g):
            assert torch.equal(t, w[lvl])
    assert torch.equal(small.transformer.level_embed, model.transformer.level_embed[levels])
    all_strides = model.level_strides()
    assert small.level_strides() == [all_strides[lvl] for lvl in levels]
    # every attention: the kept levels' offsets, and their weights renormalised
    query = torch.randn(2, 7, model.config["d_model"])
    for name, module in model.named_modules():
        if not name.endswith(("self_attn", "cross_attn")) or not hasattr(module, "n_levels"):
            continue
        other = small.get_submodule(name)
        m, p = module.n_heads, module.n_points
        with torch.no_grad():
            off = module.sampling_offsets(query).view(2, 7, m, 4, p, 2)[:, :, :, levels]
            logits = module.attention_weights(query).view(2, 7, m, 4, p)[:, :, :, levels]
            weights = logits.flatten(3).softmax(-1)
            got_off = other.sampling_offsets(query).view(2, 7, m, len(levels), p, 2)
            got_w = other.attention_weights(query).view(2, 7, m, -1).softmax(-1)
        torch.testing.assert_close(got_off, off, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_w, weights, rtol=1e-6, atol=1e-7)
    out = outputs(small, x, mask)
    assert out["pred_boxes"].isfinite().all() and out["pred_logits"].isfinite().all()


def test_without_the_coarsest_levels_the_last_stage_is_not_run():
    model = tiny_model("two_stage")
    x, mask = images()

    def layer4_calls(m):
        calls = []
        hook = m.backbone[0].body.layer4.register_forward_hook(lambda *a: calls.append(1))
        outputs(m, x, mask)
        hook.remove()
        return len(calls)

    assert layer4_calls(model) == 1
    assert layer4_calls(compress.drop_levels(model, [0, 1])) == 0
    assert layer4_calls(compress.drop_levels(model, [0, 3])) == 1  # the extra level needs C5


def test_proposals_are_sized_by_their_level_in_the_full_pyramid():
    mask = torch.zeros(1, 4 * 4 + 2 * 2, dtype=torch.bool)
    boxes = proposal_boxes(mask, [(4, 4), (2, 2)], level_ids=[1, 3])
    assert torch.allclose(boxes[0, :16, 2:], torch.tensor(0.05 * 2))
    assert torch.allclose(boxes[0, 16:, 2:], torch.tensor(0.05 * 8))
    model = compress.drop_levels(tiny_model("two_stage"), [1, 3])
    assert model.transformer.proposal_levels == [1, 3]


def test_dropped_levels_round_trip_and_compose(tmp_path):
    model = tiny_model("two_stage")
    x, mask = images()
    small = compress.drop_levels(compress.prune_points(model, 1, 2), [0, 1, 3])
    smaller = compress.drop_levels(small, [0, 3])
    assert smaller.config["feature_levels"] == [0, 3]
    assert smaller.config["enc_num_points"] == 1
    assert [r["technique"] for r in smaller.compression] == ["prune_points", "drop_levels",
                                                             "drop_levels"]
    smaller.save_pretrained(tmp_path)
    again = DeformableDetr.from_pretrained(tmp_path).eval()
    assert_same(outputs(again, x, mask), outputs(smaller, x, mask))


def test_level_usage_shares_sum_to_one():
    model = tiny_model("plain")
    shares = compress.level_usage(model, compress.point_usage(model, [images()]))
    assert list(shares) == [0, 1, 2, 3]
    assert abs(sum(shares.values()) - 1) < 1e-5 and all(v > 0 for v in shares.values())


@pytest.mark.parametrize("levels", [[], [1, 0], [0, 0], [4], [0.0], None, "01", [True]])
def test_bad_levels_named(levels):
    with pytest.raises(ValueError, match="levels"):
        compress.drop_levels(tiny_model("plain"), levels)


def test_levels_already_dropped_cannot_come_back():
    small = compress.drop_levels(tiny_model("plain"), [0, 1])
    with pytest.raises(ValueError, match=r"levels: .*\[0, 1\]"):
        compress.drop_levels(small, [0, 2])


@pytest.mark.parametrize("levels", [[], [2, 1], [4], [-1]])
def test_bad_feature_levels_config_named(levels):
    with pytest.raises(ValueError, match="feature_levels"):
        DeformableDetr(**{**tiny_model("plain").config, "feature_levels": levels})


def test_search_skips_a_candidate_that_cannot_run(monkeypatch):
    # A two-stage model on too few levels has fewer tokens than proposals on small
    # images: the search leaves that candidate out instead of failing.
    from ddetr.compress import search
    from ddetr.models.deformable_transformer import TooFewTokens
    model = tiny_model("two_stage")
    x, _ = images(n=1)

    def accuracy(m, dataset, device):
        outputs(m, x, None)
        return {"AP": 0.5, "AP50": 0.5, "AP_small": 0.5}

    monkeypatch.setattr(search, "accuracy", accuracy)
    monkeypatch.setattr(search, "latency", lambda *a, **k: {"latency_ms": 1.0})

    def fresh():
        return search.Search(dataset_at=lambda scale: [(x[0], {})], latency_images=1,
                             device=torch.device("cpu"), max_ap_drop=0.01,
                             deadline=float("inf"))

    s = fresh()
    assert s.measure(model, "original", [])["AP"] == 0.5
    too_small = compress.drop_levels(model, [3])  # 1x2 tokens for 15 proposals
    assert s.measure(too_small, "levels 3", ["levels 3"]) is None
    assert s.cannot_run == [["levels 3"]] and len(s.rows) == 1
    with pytest.raises(TooFewTokens):
        fresh().measure(too_small, "original", [])
