"""``Detr``: outputs, facebookresearch/detr's checkpoint layout, inputs, post-processing,
one training step and argument errors."""

import pytest
import torch

from ddetr import Detr
from ddetr.models.criterion import SetCriterion

from tests.models.detr_cases import TINY_DETR, assert_same, images, outputs, tiny_detr


def resnet_shapes(depths, widths, stem, bottleneck=True):
    """torchvision ResNet keys and shapes (frozen BN: no num_batches_tracked)."""
    shapes = {"conv1.weight": (stem, 3, 7, 7)}
    norm = ("weight", "bias", "running_mean", "running_var")
    shapes.update({f"bn1.{k}": (stem,) for k in norm})
    in_ch = stem
    for stage, (depth, width) in enumerate(zip(depths, widths), 1):
        inner = width // 4 if bottleneck else width
        for j in range(depth):
            p = f"layer{stage}.{j}."
            convs = ([(in_ch, inner, 1), (inner, inner, 3), (inner, width, 1)] if bottleneck
                     else [(in_ch, width, 3), (width, width, 3)])
            for c, (i, o, k) in enumerate(convs, 1):
                shapes[f"{p}conv{c}.weight"] = (o, i, k, k)
                shapes.update({f"{p}bn{c}.{x}": (o,) for x in norm})
            if j == 0 and (stage > 1 or in_ch != width):
                shapes[f"{p}downsample.0.weight"] = (width, in_ch, 1, 1)
                shapes.update({f"{p}downsample.1.{x}": (width,) for x in norm})
            in_ch = width
    return shapes


def official_shapes(num_classes, num_queries, d, ffn, enc, dec, depths, widths, stem):
    """Every key and shape of a facebookresearch/detr checkpoint, written out by hand."""
    shapes = {f"backbone.0.body.{k}": v for k, v in resnet_shapes(depths, widths, stem).items()}
    attn = {"in_proj_weight": (3 * d, d), "in_proj_bias": (3 * d,),
            "out_proj.weight": (d, d), "out_proj.bias": (d,)}
    layer = {"linear1.weight": (ffn, d), "linear1.bias": (ffn,),
             "linear2.weight": (d, ffn), "linear2.bias": (d,)}
    for i in range(enc):
        p = f"transformer.encoder.layers.{i}."
        shapes.update({p + "self_attn." + k: v for k, v in attn.items()})
        shapes.update({p + k: v for k, v in layer.items()})
        shapes.update({f"{p}norm{j}.{x}": (d,) for j in (1, 2) for x in ("weight", "bias")})
    for i in range(dec):
        p = f"transformer.decoder.layers.{i}."
        for name in ("self_attn", "multihead_attn"):
            shapes.update({f"{p}{name}.{k}": v for k, v in attn.items()})
        shapes.update({p + k: v for k, v in layer.items()})
        shapes.update({f"{p}norm{j}.{x}": (d,) for j in (1, 2, 3) for x in ("weight", "bias")})
    shapes.update({"transformer.decoder.norm.weight": (d,), "transformer.decoder.norm.bias": (d,),
                   "input_proj.weight": (d, widths[-1], 1, 1), "input_proj.bias": (d,),
                   "query_embed.weight": (num_queries, d),
                   "class_embed.weight": (num_classes + 1, d), "class_embed.bias": (num_classes + 1,),
                   "bbox_embed.layers.0.weight": (d, d), "bbox_embed.layers.0.bias": (d,),
                   "bbox_embed.layers.1.weight": (d, d), "bbox_embed.layers.1.bias": (d,),
                   "bbox_embed.layers.2.weight": (4, d), "bbox_embed.layers.2.bias": (4,)})
    return shapes


def tiny_official_shapes():
    b = TINY_DETR["backbone"]
    return official_shapes(5, 10, 32, 64, 2, 2, b["depths"], b["widths"], b["stem_width"])


def test_outputs():
    model = tiny_detr()
    x, mask = images()
    out = outputs(model, x, mask)
    assert out["pred_logits"].shape == (2, 10, 6)  # 5 classes + "no object"
    assert out["pred_boxes"].shape == (2, 10, 4)
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    assert len(out["aux_outputs"]) == 1
    assert out["aux_outputs"][0]["pred_logits"].shape == (2, 10, 6)
    assert "aux_outputs" not in outputs(tiny_detr(aux_loss=False), x, mask)


def test_default_model_has_the_official_detr_r50_layout():
    shapes = official_shapes(91, 100, 256, 2048, 6, 6, (3, 4, 6, 3), (256, 512, 1024, 2048), 64)
    model = Detr()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    assert model.transformer.encoder.layers[0].dropout.p == 0.1
    assert model.transformer.decoder.layers[0].self_attn.num_heads == 8


def test_official_state_dict_loads_strictly_and_round_trips():
    torch.manual_seed(3)
    state = {k: torch.randn(v) * 0.1 for k, v in tiny_official_shapes().items()}
    state.update({k: v.abs() + 0.5 for k, v in state.items() if k.endswith("running_var")})
    model = Detr(**TINY_DETR).eval()
    model.load_state_dict(state, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    again = Detr(**TINY_DETR).eval()
    again.load_state_dict(model.state_dict(), strict=True)
    x, mask = images()
    assert_same(outputs(model, x, mask), outputs(again, x, mask))


def test_list_of_images_equals_the_padded_batch():
    model = tiny_detr()
    x, mask = images()
    listed = [x[0], x[1][:, :40, :70]]
    assert_same(outputs(model, listed, None), outputs(model, x, mask))


def test_dc5_reads_a_stride_16_map():
    model = tiny_detr(dilation=True)
    assert model.backbone[0].strides == [16]
    x, mask = images()
    seen = []
    model.input_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    outputs(model, x, mask)
    assert seen == [(2, 32, 4, 6)]  # 64 x 96 at stride 16


def test_postprocess_scores_the_best_real_class():
    model = tiny_detr()
    logits = torch.tensor([[[0.0, 3.0, 0.0, 0.0, 0.0, 5.0], [2.0, 0.0, 0.0, 0.0, 0.0, 0.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.5, 0.5, 1.0]]])
    found = model.postprocess({"pred_logits": logits, "pred_boxes": boxes}, [[100, 200]])[0]
    prob = logits.softmax(-1)[0]
    torch.testing.assert_close(found["scores"], torch.stack([prob[0, 1], prob[1, 0]]))
    assert found["labels"].tolist() == [1, 0]  # "no object" (5) never a label
    torch.testing.assert_close(found["boxes"], torch.tensor([[80.0, 30.0, 120.0, 70.0],
                                                             [0.0, 0.0, 100.0, 100.0]]))
    with pytest.raises(ValueError, match="target_sizes"):
        model.postprocess({"pred_logits": logits, "pred_boxes": boxes}, [[1, 2], [3, 4]])


def test_one_training_step_moves_every_trainable_parameter():
    model = tiny_detr().train()
    x, mask = images()
    targets = [{"labels": torch.tensor([1, 4]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2],
                                                                       [0.6, 0.5, 0.3, 0.4]])},
               {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    crit = SetCriterion(5, classification="softmax")
    losses = crit(model(x, mask), targets)
    assert {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0"} <= set(losses)
    crit.total(losses).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert not model.backbone[0].body.conv1.weight.requires_grad  # stem frozen


@pytest.mark.parametrize("kwargs, name", [
    ({"num_classes": 0}, "num_classes"), ({"num_queries": 2.5}, "num_queries"),
    ({"num_heads": 5}, "num_heads"), ({"activation": "tanh"}, "activation"),
    ({"position_embedding": "rope"}, "position_embedding"), ({"dropout": 1.0}, "dropout"),
    ({"d_model": 31, "num_heads": 1}, "d_model"), ({"backbone": "vgg16"}, "backbone"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Detr(**{**TINY_DETR, **kwargs})


def test_bad_inputs_name_the_argument():
    model = tiny_detr()
    x, mask = images()
    with pytest.raises(ValueError, match="mask"):
        model(x, mask[:, :10])
    with pytest.raises(ValueError, match="images"):
        model(x[:, :2])
