import pytest
import torch

from ddetr.engine.optim import build_optimizer, param_groups
from tests.models.detr_cases import tiny_model


def test_official_groups_and_lrs():
    model = tiny_model()
    groups = {g["name"]: g for g in param_groups(model, lr=2e-4, lr_backbone=2e-5,
                                                 lr_linear_proj_mult=0.1)}
    names = {id(p): n for n, p in model.named_parameters()}
    assert groups["backbone"]["lr"] == 2e-5
    assert all(names[id(p)].startswith("backbone.0") for p in groups["backbone"]["params"])
    assert groups["linear_proj"]["lr"] == pytest.approx(2e-5)
    assert all("sampling_offsets" in names[id(p)] or "reference_points" in names[id(p)]
               for p in groups["linear_proj"]["params"])
    assert groups["rest"]["lr"] == 2e-4
    trainable = [p for p in model.parameters() if p.requires_grad]
    grouped = [p for g in groups.values() for p in g["params"]]
    assert len(grouped) == len(trainable) == len({id(p) for p in grouped})


def test_step_schedule():
    model = tiny_model()
    optimizer, scheduler = build_optimizer(model, lr=1e-3, lr_drop=2)
    assert isinstance(optimizer, torch.optim.AdamW)
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4])


def test_bad_lr():
    with pytest.raises(ValueError, match="lr"):
        build_optimizer(tiny_model(), lr=0)
