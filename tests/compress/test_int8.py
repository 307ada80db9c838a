"""``compress.to_int8``: which layers become int8, outputs within stated tolerances of
float32, the round trips through save_pretrained and the ``ddetr compress`` checkpoint,
later techniques on an int8 model, and named errors.

Tolerances (tiny detectors, logits of magnitude about 6, 3 seeds measured at most 0.031
and 0.00033): logits within 0.06 and boxes (normalised cxcywh) within 0.002 of float32.
Two-stage models pick their decoder queries by top-k of the encoder's proposal scores,
which int8 rounding may reorder when scores nearly tie: there the encoder's outputs are
held to the same bounds, the decoder's only run."""

import pytest
import torch
from torch import nn

from ddetr import DeformableDetr, _native, compress
from ddetr.engine.compress import save_detector
from ddetr.engine.predict import load_detector
from ddetr.models import native_layers
from ddetr.models.int8 import DEFAULT_INT8_ROLES, INT8_ROLES, Int8MultiheadAttention
from ddetr.ops import Int8Linear
from tests.models.detr_cases import VARIANTS, assert_same, images, outputs, tiny_model

pytestmark = pytest.mark.skipif(not _native.available(), reason="native extension not built")

LOGITS_ATOL, BOXES_ATOL = 0.06, 0.002


def assert_close_to(got: dict, want: dict) -> None:
    assert (got["pred_logits"] - want["pred_logits"]).abs().max() <= LOGITS_ATOL
    assert (got["pred_boxes"] - want["pred_boxes"]).abs().max() <= BOXES_ATOL


@pytest.mark.parametrize("include", [DEFAULT_INT8_ROLES, INT8_ROLES])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_outputs_within_tolerance_of_float32(variant, include):
    model = tiny_model(variant)
    x, mask = images()
    want = outputs(model, x, mask)
    got = outputs(compress.to_int8(model, include), x, mask)
    if variant == "two_stage":
        assert_close_to(got["enc_outputs"], want["enc_outputs"])
        assert got["pred_boxes"].isfinite().all()
    else:
        assert_close_to(got, want)
        for a, b in zip(got["aux_outputs"], want["aux_outputs"]):
            assert_close_to(a, b)


def _kinds(model) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules()}


def test_default_roles_and_the_original_untouched():
    model = tiny_model("box_refine")
    x, mask = images()
    want = outputs(model, x, mask)
    small = compress.to_int8(model)
    kinds = _kinds(small)
    for name, kind in kinds.items():
        leaf = name.rpartition(".")[2]
        if name.startswith("transformer.") and leaf in ("value_proj", "output_proj", "linear1",
                                                        "linear2"):
            assert kind is Int8Linear, name
        if leaf in ("sampling_offsets", "attention_weights"):
            assert kind is nn.Linear, name  # float by default
    assert all(kinds[f"transformer.decoder.layers.{i}.self_attn"] is Int8MultiheadAttention
               for i in range(2))
    assert type(small.class_embed[1]) is nn.Linear
    assert type(small.bbox_embed[1].layers[0]) is nn.Linear
    assert small.compression[-1]["technique"] == "to_int8"
    assert small.compression[-1]["include"] == list(DEFAULT_INT8_ROLES)
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    assert model.compression == []
    got = outputs(model, x, mask)
    assert torch.equal(got["pred_logits"], want["pred_logits"])


def test_included_offsets_weights_and_heads_become_int8_and_shared_heads_stay_shared():
    small = compress.to_int8(tiny_model("plain"), INT8_ROLES)
    kinds = _kinds(small)
    assert kinds["transformer.encoder.layers.0.self_attn.sampling_offsets"] is Int8Linear
    assert kinds["transformer.decoder.layers.1.cross_attn.attention_weights"] is Int8Linear
    assert kinds["class_embed.0"] is Int8Linear and kinds["bbox_embed.0.layers.2"] is Int8Linear
    # without box refinement every decoder layer shares one head
    assert small.class_embed[0] is small.class_embed[1]
    assert small.bbox_embed[0] is small.bbox_embed[1]


def test_int8_layers_keep_the_pytorch_path():
    small = compress.to_int8(tiny_model("plain"))
    x = torch.randn(1, 5, 32)
    for layer in (small.transformer.encoder.layers[0], small.transformer.decoder.layers[0]):
        assert layer.native_layers  # switched on, but the layer cannot take it
        assert not native_layers.supports(layer, x)
        assert "plain" in native_layers.unsupported(layer, x)


@pytest.mark.parametrize("variant", ["box_refine", "two_stage"])
def test_save_pretrained_round_trip_gives_identical_outputs(tmp_path, variant):
    small = compress.to_int8(tiny_model(variant), INT8_ROLES)
    small.save_pretrained(tmp_path)
    again = DeformableDetr.from_pretrained(tmp_path).eval()
    assert again.compression == small.compression
    assert isinstance(again.transformer.encoder.layers[0].linear1, Int8Linear)
    x, mask = images()
    a, b = outputs(small, x, mask), outputs(again, x, mask)
    assert_same(a, b)


def test_compress_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    small = compress.to_int8(tiny_model("plain"))
    path = str(tmp_path / "checkpoint.pth")
    save_detector(small, {"config": {}}, path)
    again = load_detector(path).model
    x, mask = images()
    a, b = outputs(small, x, mask), outputs(again, x, mask)
    assert_same(a, b)


def test_later_structural_techniques_keep_the_int8_layers():
    # quantising is per output channel: truncating before or after gives the same model
    model = tiny_model("box_refine")
    x, mask = images()
    after = compress.truncate_decoder(compress.to_int8(model), 1)
    before = compress.to_int8(compress.truncate_decoder(model, 1))
    assert isinstance(after.transformer.decoder.layers[0].linear2, Int8Linear)
    assert [r["technique"] for r in after.compression] == ["to_int8", "truncate_decoder"]
    assert torch.equal(outputs(after, x, mask)["pred_boxes"],
                       outputs(before, x, mask)["pred_boxes"])
    pruned = compress.prune_points(compress.to_int8(model), 1, 2)
    assert isinstance(pruned.transformer.encoder.layers[0].self_attn.value_proj, Int8Linear)


@pytest.mark.parametrize("call, name", [
    (lambda m: compress.to_int8(nn.Linear(2, 2)), "model"),
    (lambda m: compress.to_int8(m, ["linear3"]), "include"),
    (lambda m: compress.to_int8(m, "linear1"), "include"),
    (lambda m: compress.to_int8(m, []), "include"),
    (lambda m: compress.to_int8(compress.to_bfloat16(m)), "model"),
    (lambda m: compress.to_int8(compress.to_int8(m)), "model"),
    (lambda m: compress.prune_points(compress.to_int8(m, INT8_ROLES), 1), "model"),
])
def test_bad_arguments_named(call, name):
    with pytest.raises(ValueError, match=name):
        call(tiny_model("plain"))


def test_sparse_encoder_and_int8_combine_in_either_order():
    # the token scorer (which has a linear1 too) stays float
    model = tiny_model("box_refine")
    x, mask = images()
    sparse = compress.sparsify_encoder(model, 0.5)
    first = compress.to_int8(sparse)
    second = compress.sparsify_encoder(compress.to_int8(model), 0.5,
                                       sparse.transformer.token_scorer.state_dict())
    assert type(first.transformer.token_scorer.linear1) is nn.Linear
    a, b = outputs(first, x, mask), outputs(second, x, mask)
    assert torch.equal(a["pred_boxes"], b["pred_boxes"])
    assert_close_to(a, outputs(sparse, x, mask))
