"""Weight conversion: parity with transformers' Deformable DETR for every variant, timm
key names, official checkpoints (round trip, inference, files) and clear errors."""

import argparse
import logging
import re

import pytest
import torch

from ddetr import DeformableDetr, convert
from ddetr.models.backbone import ResNet

from tests.hf_cases import jittered
from tests.models.detr_cases import TINY, VARIANTS, images, tiny_model

transformers = pytest.importorskip("transformers")

HF_VARIANTS = {
    "plain": {},
    "box_refine": {"with_box_refine": True},
    "two_stage": {"with_box_refine": True, "two_stage": True},
    "single_scale": {"num_feature_levels": 1},
}


def hf_config(**variant):
    """transformers' config of the tiny model in tests.models.detr_cases."""
    levels = variant.get("num_feature_levels", 4)
    backbone = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
        layer_type="bottleneck",
        out_features=["stage2", "stage3", "stage4"] if levels > 1 else ["stage4"])
    return transformers.DeformableDetrConfig(
        use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False,
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10,
        num_labels=5, encoder_n_points=2, decoder_n_points=3, two_stage_num_proposals=15,
        **variant)


def hf_model(variant):
    """A random transformers model, every parameter and frozen-BN statistic moved off
    its initial value so that each one takes part in the comparison."""
    torch.manual_seed(0)
    model = transformers.DeformableDetrForObjectDetection(hf_config(**HF_VARIANTS[variant]))
    return jittered(model)


@pytest.mark.parametrize("variant", list(HF_VARIANTS))
def test_from_hf_matches_transformers(variant):
    hf = hf_model(variant)
    ours = convert.from_hf(hf).eval()
    assert ours.config["with_box_refine"] == hf.config.with_box_refine
    assert ours.config["two_stage"] == hf.config.two_stage
    x, mask = images()
    with torch.no_grad():
        expected = hf(pixel_values=x, pixel_mask=(~mask).long())
        out = ours(x, mask)
    assert (out["pred_logits"] - expected.logits).abs().max() < 1e-4
    assert (out["pred_boxes"] - expected.pred_boxes).abs().max() < 1e-4
    if variant == "two_stage":
        enc = out["enc_outputs"]
        assert (enc["pred_logits"] - expected.enc_outputs_class).abs().max() < 1e-4
        boxes = expected.enc_outputs_coord_logits.sigmoid()
        assert (enc["pred_boxes"] - boxes).abs().max() < 1e-4


def test_from_hf_state_dict_without_config():
    hf = hf_model("box_refine")
    ours = convert.from_hf(hf.state_dict(), num_heads=4).eval()
    assert ours.config["with_box_refine"] and ours.config["enc_num_points"] == 2
    x, mask = images()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, mask)["pred_boxes"],
                                   hf(pixel_values=x, pixel_mask=(~mask).long()).pred_boxes,
                                   atol=1e-4, rtol=0)


def test_from_hf_base_model_has_no_heads(caplog):
    hf = hf_model("plain")
    with pytest.raises(ValueError, match="class_embed"):
        convert.from_hf(hf.model)
    with caplog.at_level(logging.WARNING):
        ours = convert.from_hf(hf.model, strict=False)
    assert "missing keys" in caplog.text
    torch.testing.assert_close(ours.transformer.level_embed, hf.model.level_embed)


def to_hf_timm_names(state, old_names):
    """Official keys -> transformers keys of a timm-backbone model (5.x names, or the
    4.x ones: conv_encoder, fc1/fc2, out_proj), written out independently of ddetr."""
    out = {}
    for key, value in state.items():
        if key.startswith("transformer.decoder.") and ("bbox_embed" in key or "class_embed" in key):
            out["model." + key[len("transformer."):]] = value
            continue
        if key.startswith(("class_embed", "bbox_embed")):
            out[key] = value
            continue
        key = key.replace("backbone.0.body.",
                          "backbone.conv_encoder.model." if old_names else "backbone.model.")
        key = key.replace("query_embed.", "query_position_embeddings.")
        key = re.sub(r"^transformer\.", "", key)
        layer = re.match(r"^(encoder|decoder)\.layers\.\d+\.", key)
        if layer:
            prefix, rest = layer.group(0), key[layer.end():]
            ffn = {"linear1.": "fc1." if old_names else "mlp.fc1.",
                   "linear2.": "fc2." if old_names else "mlp.fc2."}
            norms = ({"norm1.": "self_attn_layer_norm.", "norm2.": "final_layer_norm."}
                     if layer.group(1) == "encoder" else
                     {"norm1.": "encoder_attn_layer_norm.", "norm2.": "self_attn_layer_norm.",
                      "norm3.": "final_layer_norm.", "cross_attn.": "encoder_attn.",
                      "self_attn.out_proj.": "self_attn.out_proj." if old_names
                      else "self_attn.o_proj."})
            for old, new in {**ffn, **norms}.items():
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            if rest.startswith("self_attn.in_proj_"):
                kind = rest[len("self_attn.in_proj_"):]
                for name, part in zip("qkv", value.chunk(3, 0)):
                    out[f"model.{prefix}self_attn.{name}_proj.{kind}"] = part
                continue
            key = prefix + rest
        out["model." + key] = value
    return out


@pytest.mark.parametrize("old_names", [False, True])
def test_from_hf_timm_key_names(old_names):
    ours = tiny_model("box_refine", backbone="resnet18")
    cfg = hf_config(with_box_refine=True)
    cfg = transformers.DeformableDetrConfig(**{
        **cfg.to_dict(), "backbone_config": None, "use_timm_backbone": True,
        "backbone": "resnet18"})
    hf_state = to_hf_timm_names(convert.to_official(ours), old_names)
    assert "model.backbone.model.layer1.0.conv1.weight" in hf_state or old_names
    back = convert.from_hf(hf_state, config=cfg).eval()
    assert back.config["backbone"] == "resnet18"
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_hf_config_backbone_and_dilation():
    cfg = transformers.DeformableDetrConfig(use_timm_backbone=True, backbone="resnet50",
                                            dilation=True, num_feature_levels=1)
    kwargs = convert._hf_mapping.config_to_kwargs(cfg)
    assert kwargs["backbone"] == "resnet50" and kwargs["dilation"]
    bad = transformers.DeformableDetrConfig(use_timm_backbone=True, backbone="vit_base")
    with pytest.raises(ValueError, match="vit_base"):
        convert._hf_mapping.config_to_kwargs(bad)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_official_round_trip(variant):
    model = tiny_model(variant)
    state = convert.to_official(model)
    if variant in ("plain", "single_scale"):  # shared heads, one key copy per layer
        assert torch.equal(state["class_embed.0.weight"], state["class_embed.1.weight"])
    if variant != "plain":
        assert ("transformer.decoder.bbox_embed.0.layers.0.weight" in state) == (
            variant != "single_scale")
    # what the tensors cannot tell: the head count and the number of proposals (and,
    # two-stage, the unused num_queries)
    extra = {"num_heads": 4, "two_stage_num_proposals": 15, "num_queries": 10}
    back = convert.from_official({"model": state}, **extra).eval()
    assert back.config == model.config
    x, mask = images()
    with torch.no_grad():
        a, b = model(x, mask), back(x, mask)
    assert torch.equal(a["pred_logits"], b["pred_logits"])
    assert torch.equal(a["pred_boxes"], b["pred_boxes"])


def test_official_checkpoint_file_with_args(tmp_path):
    model = tiny_model("plain", dilation=True, num_feature_levels=1)
    args = argparse.Namespace(nheads=4, dilation=True, dropout=0.1, lr=2e-4,
                              two_stage_num_proposals=15, backbone="resnet50")
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": convert.to_official(model), "args": args, "epoch": 49}, path)
    back = convert.from_official(str(path))
    assert back.config == model.config  # heads and dilation from args, the rest from tensors


def test_official_inference_of_a_resnet101_detector():
    state = convert.to_official(tiny_model("plain"))
    state = {k: v for k, v in state.items() if not k.startswith("backbone.0.body.")}
    for key, value in ResNet("bottleneck", (3, 4, 23, 3)).state_dict().items():
        state["backbone.0.body." + key] = value
    config = convert.infer_official_config(state, num_heads=4)
    assert config["backbone"] == "resnet101"
    assert {k: config[k] for k in ("num_classes", "num_queries", "num_feature_levels",
                                   "num_encoder_layers", "num_decoder_layers",
                                   "dim_feedforward", "enc_num_points", "dec_num_points",
                                   "d_model")} == {k: TINY.get(k, 4) for k in (
        "num_classes", "num_queries", "num_feature_levels", "num_encoder_layers",
        "num_decoder_layers", "dim_feedforward", "enc_num_points", "dec_num_points",
        "d_model")}


def test_wrong_shape_names_the_tensor():
    state = convert.to_official(tiny_model("plain"))
    state["transformer.decoder.layers.1.linear2.weight"] = torch.zeros(32, 65)
    with pytest.raises(ValueError, match=r"transformer\.decoder\.layers\.1\.linear2\.weight"):
        convert.from_official(state, num_heads=4)


def test_missing_and_unexpected_keys_reported(caplog):
    state = convert.to_official(tiny_model("plain"))
    del state["transformer.encoder.layers.1.norm1.weight"]
    state["transformer.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"(?s)norm1\.weight.*transformer\.extra\.weight"):
        convert.from_official(state, num_heads=4)
    with caplog.at_level(logging.WARNING):
        convert.from_official(state, num_heads=4, strict=False)
    assert "1 missing keys" in caplog.text and "1 unexpected keys" in caplog.text


def test_differing_copies_of_a_shared_head_refused():
    state = convert.to_official(tiny_model("plain"))
    state["class_embed.1.weight"] = state["class_embed.1.weight"] + 1
    with pytest.raises(ValueError, match="with_box_refine"):
        convert.from_official(state, num_heads=4)


def test_not_an_official_state_dict():
    with pytest.raises(ValueError, match="level_embed"):
        convert.from_official({"model": {"weight": torch.zeros(1)}})
    with pytest.raises(ValueError, match="path_or_state_dict"):
        convert.from_official(42)


def test_default_model_round_trips_through_official_inference():
    state = DeformableDetr(num_queries=5).state_dict()
    config = convert.infer_official_config(state)
    assert config["backbone"] == "resnet50" and config["num_heads"] == 8
    assert config["enc_num_points"] == 4 and config["num_queries"] == 5
