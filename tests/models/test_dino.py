"""DINO (DeformableDetr(variant="dino")): the denoising queries and their attention mask,
eval mode without them, look forward twice, the native layers, the losses and the
official checkpoint layout."""

import re

import pytest
import torch

from ddetr import DeformableDetr, Dino, convert
from ddetr.models import DinoCriterion, denoising
from ddetr.models import native_layers as native_module
from ddetr.models.box_ops import box_cxcywh_to_xyxy
from ddetr.ops import native_layers as ops_native

from tests.models.detr_cases import TINY, TINY_BACKBONE, images, tiny_model

DINO_TINY = dict(TINY, num_queries=12, two_stage_num_proposals=12, dn_number=6)


def tiny_dino(seed=0, jitter=0.02, **overrides):
    """A tiny DINO in train mode, parameters moved off their init by ``jitter``."""
    torch.manual_seed(seed)
    model = Dino(**{**DINO_TINY, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * jitter)
    return model.train()


def targets(shift=0.0):
    return [{"labels": torch.tensor([1, 3]),
             "boxes": torch.tensor([[0.3 + shift, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.4]])},
            {"labels": torch.tensor([4]), "boxes": torch.tensor([[0.5, 0.5 + shift, 0.5, 0.4]])}]


def test_attention_mask_small_case():
    # 2 groups of 2 rows (1 positive, 1 negative), 2 matching queries; True = blocked
    dn = denoising.Denoising(torch.zeros(1, 4, 8), torch.zeros(1, 4, 4), groups=2, group_size=2)
    mask = denoising.attention_mask(dn, num_queries=2)
    expected = torch.tensor([
        # dn group 0 | dn group 1 | matching
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_denoising_queries_layout():
    torch.manual_seed(0)
    label_enc = torch.nn.Embedding(6, 8)
    dn = denoising.denoising_queries(targets(), label_enc, 5, dn_number=6, label_noise_ratio=0.0,
                                     box_noise_scale=0.5)
    # the most targets per image is 2: 6 // 2 = 3 groups of 2 positive + 2 negative rows
    assert (dn.groups, dn.group_size, dn.num_queries) == (3, 4, 12)
    assert dn.content.shape == (2, 12, 8) and dn.box_logits.shape == (2, 12, 4)
    for g in range(3):
        base = g * 4
        for j, label in enumerate([1, 3]):
            for row in (base + j, base + 2 + j):  # positive, then negative
                assert torch.equal(dn.content[0, row], label_enc.weight[label])
        # image 1 has one target: its second positive and negative rows are padding
        assert torch.equal(dn.content[1, base + 1], torch.zeros(8))
        assert torch.equal(dn.box_logits[1, base + 3], torch.zeros(4))
    boxes = dn.box_logits.sigmoid()
    truth = box_cxcywh_to_xyxy(targets()[0]["boxes"])
    # corners move by less than half the size x scale (positives), more for negatives
    half = torch.tensor([0.1, 0.1, 0.1, 0.1]) * 0.5
    for g in range(3):
        pos = box_cxcywh_to_xyxy(boxes[0, g * 4])
        neg = box_cxcywh_to_xyxy(boxes[0, g * 4 + 2])
        assert ((pos - truth[0]).abs() <= half + 1e-3).all()
        assert ((neg - truth[0]).abs() >= half - 1e-3).all()
    assert denoising.denoising_queries([{"labels": torch.zeros(0, dtype=torch.int64),
                                         "boxes": torch.zeros(0, 4)}], label_enc, 5, 6,
                                       0.5, 1.0) is None


def test_positive_indices():
    found = denoising.positive_indices(targets(), groups=2, group_size=4)
    assert found[0][0].tolist() == [0, 1, 4, 5] and found[0][1].tolist() == [0, 1, 0, 1]
    assert found[1][0].tolist() == [0, 4] and found[1][1].tolist() == [0, 0]


def test_training_outputs_and_losses():
    model = tiny_dino()
    x, mask = images()
    out = model(x, mask, targets())
    assert out["pred_logits"].shape == (2, 12, 5) and out["pred_boxes"].shape == (2, 12, 4)
    dn = out["dn_outputs"]
    assert dn["dn_groups"] == 3 and dn["dn_group_size"] == 4
    assert dn["pred_logits"].shape == (2, 12, 5) and len(dn["aux_outputs"]) == 1
    assert out["interm_outputs"]["pred_boxes"].shape == (2, 12, 4)
    criterion = DinoCriterion(5)
    losses = criterion(out, targets())
    for suffix in ("", "_0", "_interm", "_dn", "_dn_0"):
        assert {f"loss_ce{suffix}", f"loss_bbox{suffix}", f"loss_giou{suffix}"} <= set(losses)
    total = criterion.total(losses)
    total.backward()
    assert model.label_enc.weight.grad.abs().sum() > 0
    assert model.transformer.tgt_embed.weight.grad.abs().sum() > 0
    # without targets (or in eval mode): no denoising rows, zero denoising losses
    plain = criterion(model(x, mask), targets())
    assert float(plain["loss_ce_dn"]) == 0.0 and float(plain["loss_bbox_dn_0"]) == 0.0


def test_eval_has_no_denoising_and_ignores_targets():
    model = tiny_dino().eval()
    x, mask = images()
    with torch.no_grad():
        with_targets = model(x, mask, targets())
        other = model(x, mask, targets(shift=0.1))
        without = model(x, mask)
    assert "dn_outputs" not in with_targets
    assert with_targets["pred_logits"].shape == (2, 12, 5)
    for out in (other, without):
        torch.testing.assert_close(out["pred_logits"], with_targets["pred_logits"], rtol=0, atol=0)
        torch.testing.assert_close(out["pred_boxes"], with_targets["pred_boxes"], rtol=0, atol=0)


def _decode(model):
    """The transformer's output and every layer's boxes, on the test images."""
    srcs, masks, pos = model.pyramid(*images())
    queries = None if model.two_stage else model.query_embed.weight  # (DINO: no denoising)
    out = model.transformer(srcs, masks, pos, queries)
    return out, model._predict(out.hs, out.init_reference, out.inter_references)[1]


def test_look_forward_twice_reaches_the_previous_box_plain_refinement_does_not():
    dino = tiny_dino(native_layers=False)
    out, boxes = _decode(dino)
    # layer 1's box is a correction of layer 0's refined box, not detached ...
    (grad,) = torch.autograd.grad(boxes[1].sum(), out.inter_references, retain_graph=True)
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() == 0
    # ... while layer 1 itself took that box detached: its output does not depend on the
    # (shared) box head through it
    head = list(dino.bbox_embed[0].parameters())
    found = torch.autograd.grad(out.hs[1].sum(), head, allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in found)
    plain = tiny_model("box_refine", native_layers=False).train()
    out, boxes = _decode(plain)
    assert not out.inter_references.requires_grad  # refinement detaches
    assert boxes[1].requires_grad


@pytest.mark.skipif(not ops_native.library_ready(torch.zeros(1)), reason="no native layers")
def test_native_layers_serve_dino(monkeypatch):
    calls = {"decoder": 0}
    real = native_module.decoder_layer

    def counting(*args, **kwargs):
        calls["decoder"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(native_module, "decoder_layer", counting)
    model = tiny_dino(native_layers=True).eval()
    x, mask = images()
    with torch.no_grad():
        native = model(x, mask)
        assert calls["decoder"] == 2  # every decoder layer, natively, at inference
        model.set_native_layers(False)
        reference = model(x, mask)
    torch.testing.assert_close(native["pred_boxes"], reference["pred_boxes"], atol=1e-4, rtol=0)
    # training with denoising queries: the masked self-attention runs natively too, with
    # the PyTorch path's result (the same noised queries: the same seed)
    model.train()
    outputs = {}
    for native_on in (True, False):
        model.set_native_layers(native_on)
        calls["decoder"] = 0
        torch.manual_seed(3)
        outputs[native_on] = model(x, mask, targets())
        assert calls["decoder"] == (2 if native_on else 0)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(outputs[True][key], outputs[False][key], atol=1e-4, rtol=0)
        torch.testing.assert_close(outputs[True]["dn_outputs"][key],
                                   outputs[False]["dn_outputs"][key], atol=1e-4, rtol=0)


def official_dino_keys(num_classes=5, d_model=32, ffn=64, levels=4, heads=4, enc_points=2,
                       dec_points=3, enc_layers=2, dec_layers=2, queries=12):
    """The parameter names and shapes of an IDEA-Research/DINO model (two_stage_type
    'standard', shared decoder heads, separate proposal heads, embed_init_tgt), written
    out from its module structure, without the backbone."""
    keys = {"transformer.level_embed": (levels, d_model),
            "transformer.tgt_embed.weight": (queries, d_model),
            "label_enc.weight": (num_classes + 1, d_model)}

    def linear(name, n_in, n_out):
        keys[f"{name}.weight"], keys[f"{name}.bias"] = (n_out, n_in), (n_out,)

    def norm(name):
        keys[f"{name}.weight"] = keys[f"{name}.bias"] = (d_model,)

    def msda(name, points):
        linear(f"{name}.sampling_offsets", d_model, heads * levels * points * 2)
        linear(f"{name}.attention_weights", d_model, heads * levels * points)
        linear(f"{name}.value_proj", d_model, d_model)
        linear(f"{name}.output_proj", d_model, d_model)

    def mlp(name, n_in, n_out, n_layers):
        dims = [n_in] + [d_model] * (n_layers - 1) + [n_out]
        for j in range(n_layers):
            linear(f"{name}.layers.{j}", dims[j], dims[j + 1])

    for i in range(enc_layers):
        p = f"transformer.encoder.layers.{i}"
        msda(f"{p}.self_attn", enc_points)
        norm(f"{p}.norm1"), norm(f"{p}.norm2")
        linear(f"{p}.linear1", d_model, ffn), linear(f"{p}.linear2", ffn, d_model)
    for i in range(dec_layers):
        p = f"transformer.decoder.layers.{i}"
        msda(f"{p}.cross_attn", dec_points)
        keys[f"{p}.self_attn.in_proj_weight"] = (3 * d_model, d_model)
        keys[f"{p}.self_attn.in_proj_bias"] = (3 * d_model,)
        linear(f"{p}.self_attn.out_proj", d_model, d_model)
        norm(f"{p}.norm1"), norm(f"{p}.norm2"), norm(f"{p}.norm3")
        linear(f"{p}.linear1", d_model, ffn), linear(f"{p}.linear2", ffn, d_model)
        for prefix in ("", "transformer.decoder."):
            linear(f"{prefix}class_embed.{i}", d_model, num_classes)
            mlp(f"{prefix}bbox_embed.{i}", d_model, 4, 3)
    norm("transformer.decoder.norm")
    mlp("transformer.decoder.ref_point_head", 2 * d_model, d_model, 2)
    linear("transformer.enc_output", d_model, d_model)
    norm("transformer.enc_output_norm")
    linear("transformer.enc_out_class_embed", d_model, num_classes)
    mlp("transformer.enc_out_bbox_embed", d_model, 4, 3)
    for lvl, c in enumerate([32, 64, 128]):  # TINY_BACKBONE's C3-C5 widths
        keys[f"input_proj.{lvl}.0.weight"] = (d_model, c, 1, 1)
        keys[f"input_proj.{lvl}.0.bias"] = (d_model,)
    keys["input_proj.3.0.weight"], keys["input_proj.3.0.bias"] = (d_model, 128, 3, 3), (d_model,)
    for lvl in range(levels):
        keys[f"input_proj.{lvl}.1.weight"] = keys[f"input_proj.{lvl}.1.bias"] = (d_model,)
    return keys


def test_official_dino_state_dict_loads():
    model = tiny_dino()
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()
            if not k.startswith("backbone.")}
    assert ours == official_dino_keys()
    torch.manual_seed(3)
    state = {k: torch.randn(shape) for k, shape in official_dino_keys().items()}
    state.update({k: v for k, v in model.state_dict().items() if k.startswith("backbone.")})
    for key in list(state):  # shared decoder heads: the official file repeats one tensor
        head = re.match(r"^(?:transformer\.decoder\.)?(class|bbox)_embed\.\d+\.(.*)$", key)
        if head:
            state[key] = state[f"{head.group(1)}_embed.0.{head.group(2)}"]
    args = {"nheads": 4, "dn_number": 6, "dn_label_noise_ratio": 0.4, "dn_box_noise_scale": 0.8}
    loaded = convert.dino_from_official({"model": state, "args": args}, dropout=0.0)
    assert isinstance(loaded, DeformableDetr) and loaded.config["variant"] == "dino"
    assert loaded.config["num_queries"] == 12 and loaded.config["dn_number"] == 6
    assert loaded.config["dn_box_noise_scale"] == 0.8
    torch.testing.assert_close(loaded.transformer.tgt_embed.weight,
                               state["transformer.tgt_embed.weight"])
    x, mask = images()
    with torch.no_grad():
        assert loaded.eval()(x, mask)["pred_boxes"].isfinite().all()


def test_dino_errors_name_the_argument():
    with pytest.raises(ValueError, match="variant"):
        DeformableDetr(**TINY, variant="dino")  # not two-stage
    with pytest.raises(ValueError, match="two_stage_num_proposals"):
        Dino(**{**DINO_TINY, "two_stage_num_proposals": 20})
    with pytest.raises(ValueError, match="dn_number"):
        Dino(**{**DINO_TINY, "dn_number": -1})
    with pytest.raises(ValueError, match="variant"):
        DeformableDetr(**TINY, variant="dab")
    with pytest.raises(ValueError, match="tgt_embed"):
        convert.dino_from_official(tiny_model().state_dict())


def test_save_and_load_pretrained(tmp_path):
    model = tiny_dino().eval()
    model.save_pretrained(tmp_path)
    back = DeformableDetr.from_pretrained(tmp_path).eval()
    assert back.config == model.config and back.dino
    x, mask = images()
    with torch.no_grad():
        torch.testing.assert_close(back(x, mask)["pred_boxes"], model(x, mask)["pred_boxes"])


def test_dino_defaults_are_the_recipe():
    model = Dino(backbone=TINY_BACKBONE, num_encoder_layers=1, num_decoder_layers=1)
    cfg = model.config
    assert (cfg["num_queries"], cfg["dim_feedforward"], cfg["dropout"]) == (900, 2048, 0.0)
    assert (cfg["dn_number"], cfg["dn_label_noise_ratio"], cfg["dn_box_noise_scale"]) == (100, 0.5, 1.0)
    assert model.backbone[1].temperature == 20 and model.backbone[1].offset == 0.0
