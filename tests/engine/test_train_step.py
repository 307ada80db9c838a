import math

import pytest
import torch

from ddetr.engine import amp
from ddetr.engine.builders import build_criterion, build_model
from ddetr.engine.optim import build_optimizer
from ddetr.engine.train import train_step
from tests.engine.tiny import tiny_config


def batch():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 64, generator=g)
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2],
                                                                       [0.7, 0.6, 0.3, 0.2]])},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    return images, mask, targets


@pytest.mark.parametrize("mode", ["off", "bf16"])
def test_step_updates_parameters(tmp_path, mode):
    config = tiny_config(tmp_path)
    torch.manual_seed(0)
    model = build_model(config, num_classes=4)
    criterion = build_criterion(config, num_classes=4)
    optimizer, _ = build_optimizer(model, lr=1e-3)
    before = model.class_embed[0].weight.detach().clone()
    values = train_step(model, criterion, *batch(), optimizer, clip_max_norm=0.1, amp=mode)
    assert math.isfinite(values["loss"]) and values["grad_norm"] > 0
    assert not torch.equal(before, model.class_embed[0].weight)
    assert {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_ce_enc"} <= set(values)


def test_amp_modes():
    cpu = torch.device("cpu")
    assert amp.resolve("auto", cpu) == "bf16"
    assert amp.resolve("auto", torch.device("cuda")) == "fp16"
    with pytest.raises(ValueError, match="amp: fp16 needs CUDA"):
        amp.resolve("fp16", cpu)
    with pytest.raises(ValueError, match="amp: expected one of"):
        amp.resolve("half", cpu)
    assert amp.grad_scaler("bf16", cpu) is None
