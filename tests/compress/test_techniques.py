"""Compression techniques: exact identity settings for every variant, what each keeps,
save/load round trips, bf16 against float32, and named errors."""

import pytest
import torch

from ddetr import DeformableDetr, compress
from tests.models.detr_cases import VARIANTS, assert_same, images, outputs, tiny_model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_identity_settings_give_the_original_outputs(variant):
    model = tiny_model(variant)
    x, mask = images()
    want = outputs(model, x, mask)
    cfg = model.config
    for new in (compress.truncate_decoder(model, cfg["num_decoder_layers"]),
                compress.reduce_queries(model, model.num_queries),
                compress.prune_points(model, cfg["enc_num_points"], cfg["dec_num_points"],
                                      compress.point_usage(model, [(x, mask)]))):
        got = outputs(new, x, mask)
        assert torch.equal(got["pred_logits"], want["pred_logits"])
        assert torch.equal(got["pred_boxes"], want["pred_boxes"])


@pytest.mark.parametrize("variant", ["plain", "two_stage"])
def test_truncated_decoder_reads_out_with_that_layers_head(variant):
    model = tiny_model(variant)
    x, mask = images()
    want = outputs(model, x, mask)["aux_outputs"][0]
    got = outputs(compress.truncate_decoder(model, 1), x, mask)
    assert torch.equal(got["pred_logits"], want["pred_logits"])
    assert torch.equal(got["pred_boxes"], want["pred_boxes"])


def test_pruned_points_equal_masking_their_logits():
    # Dropping points = their attention logits at -inf in the original model: the
    # softmax renormalises over the points kept.
    model = tiny_model("box_refine")
    x, mask = images()
    usage = compress.point_usage(model, [(x, mask)])
    pruned = compress.prune_points(model, 2, 3, usage)
    hooks = []
    for name, m in model.named_modules():
        if name in usage:
            keep = usage[name].topk(2 if "encoder" in name else 3, -1).indices
            drop = torch.ones_like(usage[name], dtype=torch.bool).scatter(-1, keep, False)
            hooks.append(m.attention_weights.register_forward_hook(
                lambda mod, inp, out, drop=drop: out.masked_fill(drop.flatten(), float("-inf"))))
    try:
        want = outputs(model, x, mask)
    finally:
        for h in hooks:
            h.remove()
    got = outputs(pruned, x, mask)
    assert pruned.config["enc_num_points"] == 2 and pruned.config["dec_num_points"] == 3
    torch.testing.assert_close(got["pred_boxes"], want["pred_boxes"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["pred_logits"], want["pred_logits"], rtol=1e-5, atol=1e-5)


def test_fewer_queries_keeps_the_chosen_learned_queries():
    model = tiny_model("plain")
    x, mask = images()
    usage = compress.query_usage(model, [(x, mask)], threshold=0.0)
    assert usage.shape == (model.num_queries,) and (usage == x.shape[0]).all()
    keep = [0, 3, 5]
    small = compress.reduce_queries(model, 3, keep)
    assert torch.equal(small.query_embed.weight, model.query_embed.weight[keep])
    assert outputs(small, x, mask)["pred_logits"].shape[1] == 3
    two = compress.reduce_queries(tiny_model("two_stage"), 4)
    assert two.config["two_stage_num_proposals"] == 4
    assert outputs(two, x, mask)["pred_boxes"].shape[1] == 4


def test_compressed_model_round_trips(tmp_path):
    model = tiny_model("two_stage")
    x, mask = images()
    small = compress.prune_points(compress.truncate_decoder(model, 1), 1, 2)
    small.save_pretrained(tmp_path)
    again = DeformableDetr.from_pretrained(tmp_path).eval()
    a, b = outputs(small, x, mask), outputs(again, x, mask)
    assert_same(a, b)


def test_bfloat16_close_to_float32():
    # one-stage: no top-k selection whose ties bf16 rounding may break
    model = tiny_model("box_refine")
    x, mask = images()
    want = outputs(model, x, mask)
    got = outputs(compress.to_bfloat16(model), x, mask)
    assert got["pred_logits"].dtype == torch.bfloat16
    torch.testing.assert_close(got["pred_boxes"].float(), want["pred_boxes"], rtol=0, atol=0.03)
    torch.testing.assert_close(got["pred_logits"].float(), want["pred_logits"], rtol=0, atol=0.1)


def test_two_stage_runs_in_bfloat16():
    out = outputs(compress.to_bfloat16(tiny_model("two_stage")), *images())
    assert out["pred_boxes"].dtype == torch.bfloat16 and torch.isfinite(out["pred_boxes"]).all()


@pytest.mark.parametrize("call, name", [
    (lambda m: compress.truncate_decoder(m, 0), "k"),
    (lambda m: compress.truncate_decoder(m, 99), "k"),
    (lambda m: compress.truncate_decoder(m, 1.0), "k"),
    (lambda m: compress.reduce_queries(m, 0), "k"),
    (lambda m: compress.reduce_queries(m, 2, [1, 1]), "keep"),
    (lambda m: compress.reduce_queries(m, 2, [0, 999]), "keep"),
    (lambda m: compress.prune_points(m, enc_points=99), "enc_points"),
    (lambda m: compress.prune_points(m, dec_points=0), "dec_points"),
    (lambda m: compress.truncate_decoder(torch.nn.Linear(2, 2), 1), "model"),
])
def test_bad_arguments_named(call, name):
    with pytest.raises(ValueError, match=name):
        call(tiny_model("plain"))


def test_what_was_applied_is_recorded_and_reloaded(tmp_path):
    model = tiny_model("box_refine")
    small = compress.to_bfloat16(compress.truncate_decoder(model, 1))
    assert [r["technique"] for r in small.compression] == ["truncate_decoder", "to_bfloat16"]
    small.save_pretrained(tmp_path)
    again = DeformableDetr.from_pretrained(tmp_path).eval()
    assert again.compression == small.compression
    assert next(again.parameters()).dtype == torch.bfloat16
    x, mask = images()
    assert torch.equal(outputs(again, x, mask)["pred_boxes"], outputs(small, x, mask)["pred_boxes"])


def test_resize_inputs_records_the_scale():
    model = tiny_model("plain")
    small = compress.resize_inputs(compress.resize_inputs(model, 0.5), 0.75)
    assert [r["scale"] for r in small.compression] == [0.5, 0.75]
    x, mask = images()
    assert torch.equal(outputs(small, x, mask)["pred_boxes"], outputs(model, x, mask)["pred_boxes"])
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="scale"):
            compress.resize_inputs(model, bad)


def test_latency_against_a_reference_is_a_ratio_of_medians():
    from ddetr.compress.measure import latency
    model = tiny_model()
    images = [torch.randn(3, 64, 64) for _ in range(3)]
    alone = latency(model, images, torch.device("cpu"))
    assert "relative_latency" not in alone and alone["latency_ms"] > 0
    paired = latency(model, images, torch.device("cpu"), reference=(model, images))
    assert 0.2 < paired["relative_latency"] < 5.0  # the same model on both sides
