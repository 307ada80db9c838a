"""Backbone: frozen batch norm, torchvision names, strides, freezing, weight loading."""

import pytest
import torch
from torch import nn

from ddetr.models.backbone import (Backbone, FrozenBatchNorm2d, ResNet, _fold_into_weights,
                                   conv_norm, load_backbone_weights,
                                   resize_mask)

from tests.models.detr_cases import TINY_BACKBONE


def test_frozen_batch_norm_equals_eval_batch_norm():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    frozen = FrozenBatchNorm2d(6)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is dropped
    x = torch.randn(2, 6, 5, 7)
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-5, atol=1e-6)
    assert not list(frozen.parameters())


def test_resnet50_has_torchvision_names():
    keys = ResNet("bottleneck", (3, 4, 6, 3)).state_dict().keys()
    # torchvision's resnet50 minus fc.{weight,bias} and 53 num_batches_tracked
    assert len(keys) == 265
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight",
                "layer1.0.downsample.1.bias", "layer3.5.conv3.weight", "layer4.2.bn3.weight"):
        assert key in keys


def test_resnet18_has_torchvision_names():
    keys = ResNet("basic", (2, 2, 2, 2)).state_dict().keys()
    assert len(keys) == 100  # torchvision's 122 minus fc and 20 counters
    assert "layer1.0.downsample.0.weight" not in keys  # 64 -> 64, stride 1
    assert "layer2.0.downsample.0.weight" in keys and "layer4.1.conv2.weight" in keys


@pytest.mark.parametrize("multi_scale, dilation, strides, sizes", [
    (True, False, [8, 16, 32], [(8, 12), (4, 6), (2, 3)]),
    (False, False, [32], [(2, 3)]),
    (False, True, [16], [(4, 6)]),
    (True, True, [8, 16, 16], [(8, 12), (4, 6), (4, 6)]),
])
def test_levels_strides_and_masks(multi_scale, dilation, strides, sizes):
    backbone = Backbone(TINY_BACKBONE, multi_scale, dilation)
    assert backbone.strides == strides
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, :, 64:] = True  # the last third of the columns
    out = backbone(torch.randn(2, 3, 64, 96), mask)
    assert [tuple(f.shape[-2:]) for f, _ in out] == sizes
    assert [f.shape[1] for f, _ in out] == backbone.num_channels
    for feat, level_mask in out:
        valid = 2 * feat.shape[-1] // 3
        assert not level_mask[0].any()
        assert level_mask[1, :, valid:].all() and not level_mask[1, :, :valid].any()


def test_stem_and_layer1_frozen():
    trainable = {n.split(".")[0] for n, p in Backbone(TINY_BACKBONE).body.named_parameters()
                 if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}
    frozen = Backbone(TINY_BACKBONE, train_backbone=False)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_basic_blocks_refuse_dilation():
    with pytest.raises(ValueError, match="dilate_last"):
        Backbone("resnet18", dilation=True)


def test_unknown_backbone_named():
    with pytest.raises(ValueError, match="backbone"):
        Backbone("resnet7")


def test_resize_mask_nearest():
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :, 2:] = True
    assert resize_mask(mask, (2, 2)).tolist() == [[[False, True], [False, True]]]


def torchvision_style_state(body: ResNet) -> dict:
    """What torchvision's resnet.state_dict() holds: plus a classifier and counters."""
    state = dict(body.state_dict())
    for key in list(state):
        if key.endswith("running_var"):
            state[key.replace("running_var", "num_batches_tracked")] = torch.tensor(7)
    state["fc.weight"] = torch.zeros(10, body.widths[-1])
    state["fc.bias"] = torch.zeros(10)
    return state


def test_load_torchvision_weights_from_file(tmp_path):
    torch.manual_seed(0)
    source = ResNet(**{"block": "bottleneck", "depths": (1, 1, 1, 1),
                       "widths": (16, 32, 64, 128), "stem_width": 8})
    for buf in source.buffers():
        buf.uniform_(0.5, 1.5)
    path = tmp_path / "resnet.pth"
    torch.save(torchvision_style_state(source), path)
    target = Backbone(TINY_BACKBONE).body
    load_backbone_weights(target, str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


def test_load_weights_wrong_shape_names_tensor():
    target = Backbone(TINY_BACKBONE).body
    state = torchvision_style_state(target)
    state["layer2.0.conv1.weight"] = torch.zeros(3, 3, 1, 1)
    with pytest.raises(ValueError, match="layer2.0.conv1.weight"):
        load_backbone_weights(target, state)
    del state["layer2.0.conv1.weight"]
    with pytest.raises(ValueError, match="missing keys"):
        load_backbone_weights(target, state)


def _frozen_and_eval_norms(channels):
    g = torch.Generator().manual_seed(1)
    frozen = FrozenBatchNorm2d(channels).double()
    bn = nn.BatchNorm2d(channels).double().eval()
    for norm in (frozen, bn):
        with torch.no_grad():
            norm.weight.copy_(torch.randn(channels, generator=g, dtype=torch.float64))
            norm.bias.copy_(torch.randn(channels, generator=g, dtype=torch.float64))
            norm.running_mean.copy_(torch.randn(channels, generator=g, dtype=torch.float64))
            norm.running_var.copy_(torch.rand(channels, generator=g, dtype=torch.float64) + 0.5)
    return frozen, bn


@pytest.mark.parametrize("size, folds", [(32, True), (4, False), (5, False)])
def test_conv_norm_folds_or_normalises_the_output(size, folds):
    # 16 -> 12 channels, 3x3 stride 2: a filter has 144 weights; a 32x32 input gives 256
    # output pixels (folded into the weights), 4x4 or 5x5 gives 4 or 9 (norm on the output)
    conv = nn.Conv2d(16, 12, 3, stride=2, padding=1, bias=False).double()
    x = torch.randn(2, 16, size, size, dtype=torch.float64)
    assert _fold_into_weights(conv, x) is folds
    for norm in _frozen_and_eval_norms(12):
        out = conv_norm(conv, norm, x)
        expected = norm(conv(x))
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        params = [conv.weight] + [p for p in norm.parameters()]
        grads = torch.autograd.grad(out.square().sum(), params)
        expected_grads = torch.autograd.grad(expected.square().sum(), params)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_conv_norm_always_folds_in_a_traced_graph(monkeypatch):
    conv = nn.Conv2d(16, 12, 3, padding=1, bias=False)
    x = torch.randn(1, 16, 2, 2)
    assert not _fold_into_weights(conv, x)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert _fold_into_weights(conv, x)
