"""DETR conversion: parity with transformers' DetrForObjectDetection, bare state dicts,
facebookresearch/detr checkpoints (tensors and saved args) and clear errors."""

import argparse
import logging

import pytest
import torch

from ddetr import Detr, convert

from tests.hf_cases import jittered
from tests.models.detr_cases import TINY_DETR, assert_same, images, outputs, tiny_detr

transformers = pytest.importorskip("transformers")


def hf_config(**overrides):
    """transformers' config of TINY_DETR (HF ResNet backbone returning stage 4)."""
    backbone = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
        layer_type="bottleneck", out_features=["stage4"])
    sizes = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                 num_queries=10, num_labels=5)
    return transformers.DetrConfig(use_timm_backbone=False, backbone_config=backbone,
                                   use_pretrained_backbone=False, **{**sizes, **overrides})


def hf_model(**overrides):
    """A random transformers DETR, every parameter and frozen-BN statistic moved off
    its initial value so that each one takes part in the comparison."""
    torch.manual_seed(0)
    model = transformers.DetrForObjectDetection(hf_config(**overrides))
    return jittered(model)


@pytest.fixture(scope="module")
def hf():
    return hf_model()


def hf_outputs(hf, x, mask):
    with torch.no_grad():
        return hf(pixel_values=x, pixel_mask=(~mask).long())


@pytest.mark.parametrize("via", ["detr_from_hf", "from_hf"])
def test_from_hf_matches_transformers(via, hf):
    ours = getattr(convert, via)(hf).eval()
    assert isinstance(ours, Detr) and ours.config["backbone"]["widths"] == [16, 32, 64, 128]
    x, mask = images()
    expected, out = hf_outputs(hf, x, mask), outputs(ours, x, mask)
    assert (out["pred_logits"] - expected.logits).abs().max() < 1e-4
    assert (out["pred_boxes"] - expected.pred_boxes).abs().max() < 1e-4


def test_from_hf_learned_position_embedding():
    hf = hf_model(position_embedding_type="learned")
    ours = convert.detr_from_hf(hf).eval()
    x, mask = images()
    expected, out = hf_outputs(hf, x, mask), outputs(ours, x, mask)
    assert (out["pred_logits"] - expected.logits).abs().max() < 1e-4
    assert (out["pred_boxes"] - expected.pred_boxes).abs().max() < 1e-4


def test_from_hf_warns_that_auxiliary_loss_changes_transformers_decoder(caplog, hf):
    # same weights; transformers' auxiliary_loss=True model feeds its layers normed states
    aux = transformers.DetrForObjectDetection(hf_config(auxiliary_loss=True)).eval()
    aux.load_state_dict(hf.state_dict())
    with caplog.at_level(logging.WARNING):
        ours = convert.detr_from_hf(aux).eval()
    assert "auxiliary_loss=True" in caplog.text
    x, mask = images()
    assert (outputs(ours, x, mask)["pred_logits"] - hf_outputs(hf, x, mask).logits).abs().max() < 1e-4


def test_from_hf_state_dict_without_config(hf):
    ours = convert.detr_from_hf(hf.state_dict(), num_heads=4).eval()
    assert {k: ours.config[k] for k in TINY_DETR} == TINY_DETR
    x, mask = images()
    torch.testing.assert_close(outputs(ours, x, mask)["pred_boxes"],
                               hf_outputs(hf, x, mask).pred_boxes, atol=1e-4, rtol=0)


def test_from_hf_base_model_has_no_heads(hf):
    with pytest.raises(ValueError, match="class_embed"):
        convert.detr_from_hf(hf.model)
    ours = convert.detr_from_hf(hf.model, strict=False)
    torch.testing.assert_close(ours.query_embed.weight, hf.model.query_position_embeddings.weight)


def test_official_checkpoint_file_with_args(tmp_path):
    model = tiny_detr(dilation=True)
    args = argparse.Namespace(nheads=4, dilation=True, dropout=0.1, hidden_dim=32, lr=1e-4,
                              backbone="resnet50", num_queries=10, aux_loss=True)
    path = tmp_path / "detr.pth"
    torch.save({"model": model.state_dict(), "args": args, "epoch": 499}, path)
    back = convert.detr_from_official(str(path)).eval()
    assert back.config == model.config  # heads and dilation from args, the rest from tensors
    x, mask = images()
    assert_same(outputs(model, x, mask), outputs(back, x, mask))


def test_official_state_dict_inference():
    config = convert.infer_detr_config(Detr(num_queries=7).state_dict())
    assert config == {"d_model": 256, "dim_feedforward": 2048, "num_encoder_layers": 6,
                      "num_decoder_layers": 6, "position_embedding": "sine",
                      "num_classes": 91, "num_queries": 7, "backbone": "resnet50"}


def test_errors_name_the_problem(caplog, hf):
    with pytest.raises(ValueError, match="not a DETR state dict"):
        convert.detr_from_official({"model": {"weight": torch.zeros(1)}})
    state = tiny_detr().state_dict()
    state["transformer.decoder.layers.1.linear2.weight"] = torch.zeros(32, 65)
    with pytest.raises(ValueError, match=r"transformer\.decoder\.layers\.1\.linear2\.weight"):
        convert.detr_from_official(state, num_heads=4)
    state = tiny_detr().state_dict()
    del state["transformer.encoder.layers.1.norm1.weight"]
    with pytest.raises(ValueError, match=r"norm1\.weight"):
        convert.detr_from_official(state, num_heads=4)
    with caplog.at_level(logging.WARNING):
        convert.detr_from_official(state, num_heads=4, strict=False)
    assert "1 missing keys" in caplog.text
    with pytest.raises(ValueError, match="decoder_ffn_dim"):
        convert.detr_from_hf(hf.state_dict(), config=hf_config(decoder_ffn_dim=48))
    with pytest.raises(ValueError, match="model_or_state_dict"):
        convert.detr_from_hf(42)
