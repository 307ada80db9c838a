import torch

from ddetr.engine.builders import build_model, unfreeze_batch_norm
from ddetr.models.backbone import FrozenBatchNorm2d, ResNet
from tests.engine.tiny import tiny_config


def test_trainable_batch_norm_matches_frozen_in_eval_mode():
    torch.manual_seed(0)
    body = ResNet("basic", (1, 1, 1, 1), (8, 16, 16, 16), 8)
    for m in body.modules():
        if isinstance(m, FrozenBatchNorm2d):
            for key in ("weight", "bias", "running_mean"):
                getattr(m, key).normal_()
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 32, 32)
    frozen = [f.clone() for f in body(x)]
    keys = set(body.state_dict())
    unfreeze_batch_norm(body)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    assert set(body.state_dict()) == keys
    body.eval()
    for a, b in zip(frozen, body(x)):
        assert torch.allclose(a, b, atol=1e-5)


def test_from_scratch_model_trains_the_whole_backbone(tmp_path):
    model = build_model(tiny_config(tmp_path), num_classes=5)
    body = model.backbone[0].body
    assert all(p.requires_grad for p in body.parameters())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
    frozen = build_model(tiny_config(tmp_path, lr_backbone=0.0, backbone_norm="frozen"), 5)
    assert not any(p.requires_grad for p in frozen.backbone[0].body.parameters())
