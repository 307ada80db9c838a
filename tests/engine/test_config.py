from ddetr.engine.config import SYNTHETIC_PRESET, TrainConfig, make_config


def test_official_defaults_with_a_dataset():
    config = make_config({"coco_path": "/data/coco"})
    assert (config.lr, config.lr_backbone, config.lr_linear_proj_mult) == (2e-4, 2e-5, 0.1)
    assert (config.weight_decay, config.epochs, config.lr_drop) == (1e-4, 50, 40)
    assert (config.clip_max_norm, config.batch_size, config.num_queries) == (0.1, 2, 300)
    assert (config.set_cost_class, config.set_cost_bbox, config.set_cost_giou) == (2, 5, 2)
    assert (config.cls_loss_coef, config.bbox_loss_coef, config.giou_loss_coef) == (2, 5, 2)
    assert config.backbone == "resnet50" and config.backbone_norm == "frozen"


def test_synthetic_preset_and_explicit_flags_win():
    config = make_config({"lr": 5e-4})
    assert config.uses_synthetic()
    assert config.lr == 5e-4
    assert config.backbone == SYNTHETIC_PRESET["backbone"]
    assert config.epochs == SYNTHETIC_PRESET["epochs"]


def test_two_stage_implies_box_refine():
    config = make_config({"coco_path": "x", "two_stage": True})
    assert config.with_box_refine


def test_every_preset_key_is_a_field():
    assert set(SYNTHETIC_PRESET) <= set(TrainConfig().to_dict())
