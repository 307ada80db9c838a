"""DeformableDetr: outputs of every variant, inputs, gradients against the reference
op, save/load, post-processing and argument errors."""

import pytest
import torch

import ddetr.models.ms_deform_attn as msda_module
from ddetr import DeformableDetr
from ddetr.models import PostProcess
from ddetr.ops import ms_deform_attn_reference

from tests.models.detr_cases import TINY, VARIANTS, images, tiny_model

TOKENS = 8 * 12 + 4 * 6 + 2 * 3 + 1 * 2  # 64x96 images at strides 8, 16, 32, 64


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_outputs(variant):
    model = tiny_model(variant)
    x, mask = images()
    with torch.no_grad():
        out = model(x, mask)
    q = 15 if variant == "two_stage" else 10
    assert out["pred_logits"].shape == (2, q, 5)
    assert out["pred_boxes"].shape == (2, q, 4)
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    assert len(out["aux_outputs"]) == 1
    assert out["aux_outputs"][0]["pred_boxes"].shape == (2, q, 4)
    if variant == "two_stage":
        assert out["enc_outputs"]["pred_logits"].shape == (2, TOKENS, 5)
        assert out["enc_outputs"]["pred_boxes"].shape == (2, TOKENS, 4)
    else:
        assert "enc_outputs" not in out


def test_list_of_images_is_padded_and_masked():
    model = tiny_model()
    x, mask = images()
    small = x[1, :, :40, :70].clone()
    with torch.no_grad():
        from_list = model([x[0], small])
        from_batch = model(x, mask)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(from_list[key], from_batch[key])


def loss_and_grads(model, x, mask):
    """A simple differentiable function of every output, and its parameter gradients."""
    model.zero_grad()
    out = model(x, mask)
    terms = [out] + out["aux_outputs"] + ([out["enc_outputs"]] if "enc_outputs" in out else [])
    loss = sum((t["pred_logits"] ** 2).sum() + t["pred_boxes"].abs().sum() for t in terms)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", ["plain", "two_stage", "single_scale"])
def test_gradients_match_reference_op(variant, monkeypatch):
    # Jittered weights keep sampling points off integer pixel positions, where the
    # bilinear location gradient is discontinuous (and the two ops may pick sides).
    model = tiny_model(variant, dropout=0.0).train()
    x, mask = images()
    native = loss_and_grads(model, x, mask)
    monkeypatch.setattr(msda_module, "ms_deform_attn", ms_deform_attn_reference)
    reference = loss_and_grads(model, x, mask)
    assert native.keys() == reference.keys()
    assert "backbone.0.body.layer2.0.conv1.weight" in native
    assert "backbone.0.body.conv1.weight" not in native  # the stem stays frozen
    total = torch.cat([g.flatten() for g in reference.values()]).norm()
    for name, grad in reference.items():
        error = (native[name] - grad).norm()
        if name.startswith("input_proj.") and name.endswith(".0.bias"):
            # these biases feed GroupNorm with one channel per group: their true gradient
            # is 0, so both computations are rounding noise (tiny against the total)
            assert native[name].norm() < 1e-6 * total and grad.norm() < 1e-6 * total
            continue
        assert error <= 1e-5 * grad.norm(), f"{name}: relative error {error / grad.norm():.2e}"


@pytest.mark.parametrize("variant, safe", [("plain", True), ("box_refine", False)])
def test_save_and_load_pretrained(tmp_path, variant, safe):
    model = tiny_model(variant)
    model.save_pretrained(tmp_path, safe_serialization=safe)
    loaded = DeformableDetr.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    if variant == "plain":
        assert loaded.class_embed[1] is loaded.class_embed[0]


def test_from_pretrained_needs_a_config(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        DeformableDetr.from_pretrained(tmp_path)


def test_postprocess_by_hand():
    logits = torch.full((1, 3, 2), -10.0)
    logits[0, 2, 1] = 2.0   # best: query 2, class 1
    logits[0, 0, 0] = 1.0   # second: query 0, class 0
    boxes_cxcywh = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1],
                                  [0.25, 0.75, 0.5, 0.5]]])
    out = PostProcess(num_select=2)({"pred_logits": logits, "pred_boxes": boxes_cxcywh},
                                    torch.tensor([[100, 200]]))
    assert len(out) == 1
    torch.testing.assert_close(out[0]["scores"], torch.sigmoid(torch.tensor([2.0, 1.0])))
    assert out[0]["labels"].tolist() == [1, 0]
    # (cx, cy, w, h) -> (x0, y0, x1, y1), times (w=200, h=100)
    torch.testing.assert_close(out[0]["boxes"], torch.tensor([[0.0, 50.0, 100.0, 100.0],
                                                              [80.0, 30.0, 120.0, 70.0]]))


def test_postprocess_keeps_at_most_all_pairs():
    model = tiny_model()
    x, mask = images()
    with torch.no_grad():
        out = model(x, mask)
    results = model.postprocess(out, [[64, 96], [40, 70]])
    assert [r["scores"].shape[0] for r in results] == [50, 50]  # 10 queries x 5 classes
    scores, index = out["pred_logits"][1].sigmoid().flatten().topk(50)
    torch.testing.assert_close(results[1]["scores"], scores)
    cx, cy, w, h = out["pred_boxes"][1, index // 5].unbind(-1)
    expected = torch.stack([(cx - w / 2) * 70, (cy - h / 2) * 40, (cx + w / 2) * 70,
                            (cy + h / 2) * 40], -1)
    torch.testing.assert_close(results[1]["boxes"], expected)


def test_default_is_the_official_model():
    model = DeformableDetr()
    state = model.state_dict()
    assert state["transformer.level_embed"].shape == (4, 256)
    assert state["query_embed.weight"].shape == (300, 512)
    assert state["transformer.decoder.layers.5.self_attn.in_proj_weight"].shape == (768, 256)
    assert state["input_proj.3.0.weight"].shape == (256, 2048, 3, 3)
    assert state["class_embed.5.weight"].shape == (91, 256)
    assert "transformer.decoder.bbox_embed.0.layers.0.weight" not in state
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == 40


@pytest.mark.parametrize("kwargs, name", [
    ({"d_model": 48}, "d_model"),
    ({"num_feature_levels": 2}, "num_feature_levels"),
    ({"two_stage": True}, "two_stage"),
    ({"num_queries": 0}, "num_queries"),
    ({"activation": "tanh"}, "activation"),
])
def test_bad_arguments_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DeformableDetr(**{**TINY, **kwargs})


def test_bad_inputs_named():
    model = tiny_model()
    x, mask = images()
    with pytest.raises(ValueError, match="mask"):
        model(x, mask.float())
    with pytest.raises(ValueError, match="images"):
        model(x[0])
    with pytest.raises(ValueError, match="mask"):
        model([x[0], x[1]], mask)
    with pytest.raises(ValueError, match="two_stage_num_proposals"):
        tiny_model("two_stage", two_stage_num_proposals=500)(x, mask)


@pytest.mark.parametrize("bad", [
    "one-channel list", "uint8 list", "four-channel tensor", "empty batch", "empty list",
    "mixed dtypes"])
def test_bad_images_named(bad):
    model = tiny_model().eval()
    x, _ = images()
    given = {"one-channel list": [x[0, :1], x[1]],
             "uint8 list": [x[0].to(torch.uint8)],
             "four-channel tensor": torch.cat([x, x[:, :1]], 1),
             "empty batch": x[:0],
             "empty list": [],
             "mixed dtypes": [x[0], x[1].double()]}[bad]
    with pytest.raises(ValueError, match="images"):
        model(given)


def test_d_model_32_at_batch_1_on_a_tiny_image():
    # GroupNorm(32, 32) of a 1x1 level holds one value per group: torch refuses it at
    # batch 1; it normalises to 0, so the level is the GroupNorm's bias.
    model = tiny_model(d_model=32).eval()
    x, _ = images()
    with torch.no_grad():
        alone = model(x[:1, :, :48, :48])
        pair = model(torch.cat([x[:1, :, :48, :48]] * 2))
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(alone[key][0], pair[key][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["box_refine", "two_stage"])
def test_refined_boxes_are_the_box_outputs(variant, monkeypatch):
    # with box refinement the decoder's refined boxes (before the detach) are the box
    # outputs: the same values and the same gradients as running the box head again
    # from each layer's output and input reference (the official computation)
    model = tiny_model(variant, dropout=0.0).train()
    x, mask = images()
    with torch.no_grad():
        out = model.transformer(*model.pyramid(x, mask),
                                None if model.two_stage else model.query_embed.weight)
    assert out.boxes is not None and out.boxes.shape[0] == TINY["num_decoder_layers"]
    reused = loss_and_grads(model, x, mask)
    reused_out = model(x, mask)
    predict = DeformableDetr._predict
    monkeypatch.setattr(DeformableDetr, "_predict",
                        lambda self, hs, init, inter, refined=None: predict(self, hs, init, inter))
    again = loss_and_grads(model, x, mask)
    again_out = model(x, mask)
    torch.testing.assert_close(reused_out["pred_boxes"], again_out["pred_boxes"],
                               rtol=0, atol=0)
    for a, b in zip(reused_out["aux_outputs"], again_out["aux_outputs"]):
        torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"], rtol=0, atol=0)
    assert reused.keys() == again.keys()
    total = torch.cat([g.flatten() for g in again.values()]).norm()
    for name, grad in again.items():
        if name.startswith("input_proj.") and name.endswith(".0.bias"):
            # true gradient 0 (they feed a GroupNorm of one channel per group): both
            # are rounding noise, tiny against the total
            assert reused[name].norm() < 1e-6 * total and grad.norm() < 1e-6 * total
            continue
        # (the two sum the box head's gradient contributions in another order)
        assert (reused[name] - grad).norm() <= 1e-5 * grad.norm(), name


def test_without_refinement_the_heads_read_out():
    model = tiny_model("plain")
    x, mask = images()
    with torch.no_grad():
        out = model.transformer(*model.pyramid(x, mask), model.query_embed.weight)
    assert out.boxes is None
