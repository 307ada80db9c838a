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


def test_fused_adamw_where_it_runs_and_the_same_update():
    # float32 parameters on the CPU: torch's fused AdamW, whose steps match the
    # per-tensor AdamW's to rounding; a bfloat16 model keeps the per-tensor loop
    model = tiny_model()
    optimizer, _ = build_optimizer(model, lr=1e-3, weight_decay=1e-4)
    assert all(g["fused"] for g in optimizer.param_groups)
    reference_model = tiny_model()
    reference_model.load_state_dict(model.state_dict())
    reference = torch.optim.AdamW(param_groups(reference_model, 1e-3, 1e-3 * 0.1, 0.1),
                                  lr=1e-3, weight_decay=1e-4)
    optimizer, _ = build_optimizer(model, lr=1e-3, lr_backbone=1e-4, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for a, b in zip(model.parameters(), reference_model.parameters()):
            if a.requires_grad:
                a.grad = torch.randn(a.shape, generator=gen)
                b.grad = a.grad.clone()
        optimizer.step()
        reference.step()
    moved = 0
    for a, b in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        moved += int(a.requires_grad)
    assert moved > 0
    bf16, _ = build_optimizer(tiny_model().to(torch.bfloat16), lr=1e-3)
    assert not any(g["fused"] for g in bf16.param_groups)
