import json
import sys

import pytest

from ddetr.engine import builders
from ddetr.engine.config import (CPU_SMALL, PRESET_HELP, PRESETS, SYNTHETIC_PRESET, TrainConfig,
                                 make_config, read_config_file, write_config)

FOREIGN = {"train_images": "d/train", "train_annotations": "d/train.json"}


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


def test_cpu_small_is_the_demo_recipe_on_ones_own_data():
    demo, own = make_config({}), make_config(FOREIGN, "cpu-small")
    assert not own.uses_synthetic()
    for key in CPU_SMALL:
        assert getattr(own, key) == getattr(demo, key) == CPU_SMALL[key], key
    assert SYNTHETIC_PRESET == {**CPU_SMALL, "output_dir": "output-synthetic"}
    assert own.output_dir == "output"


def test_paper_presets():
    paper = make_config(FOREIGN, "deformable-detr")
    assert paper == make_config(FOREIGN)  # the official defaults
    assert (paper.backbone, paper.num_feature_levels, paper.num_queries) == ("resnet50", 4, 300)
    assert not (paper.with_box_refine or paper.two_stage or paper.dilation)
    refine, two_stage = make_config(FOREIGN, "+refine"), make_config(FOREIGN, "++two-stage")
    assert refine.with_box_refine and not refine.two_stage
    assert two_stage.with_box_refine and two_stage.two_stage
    single, dc5 = make_config(FOREIGN, "single-scale"), make_config(FOREIGN, "dc5")
    assert single.num_feature_levels == 1 and not single.dilation
    assert dc5.num_feature_levels == 1 and dc5.dilation and dc5.backbone == "resnet50"


def test_dc5_builds_a_dilated_single_scale_model():
    config = make_config({**FOREIGN, "enc_layers": 1, "dec_layers": 1}, "dc5")
    model = builders.build_model(config, num_classes=3)
    assert model.backbone[0].strides == [16] and model.num_feature_levels == 1


def test_precedence_defaults_preset_file_flags(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"lr": 5e-4, "epochs": 3, "preset": "deformable-detr"}))
    from_file = read_config_file(str(path))
    config = make_config({**FOREIGN, "epochs": 2}, "cpu-small", from_file)
    assert (config.epochs, config.lr, config.d_model) == (2, 5e-4, 64)  # flag, file, preset
    assert config.weight_decay == 1e-4 and config.focal_alpha == 0.25  # defaults
    assert make_config(FOREIGN, None, from_file).d_model == 256  # the file's preset


def test_resolved_config_repeats_the_run(tmp_path):
    config = make_config({**FOREIGN, "lr": 3e-4}, "++two-stage")
    written = write_config(config, str(tmp_path))
    assert written == str(tmp_path / "config.json")
    assert make_config({}, None, read_config_file(written)) == config


def test_yaml_config(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "run.yaml"
    path.write_text("preset: cpu-small\nlr: 1e-3\nepochs: 4\nnum_classes: null\n"
                    "two_stage: false\n")
    values = read_config_file(str(path))
    assert values == {"preset": "cpu-small", "lr": 1e-3, "epochs": 4, "num_classes": None,
                      "two_stage": False}  # YAML reads 1e-3 as a string: made a float


def test_yaml_without_pyyaml_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml raises ImportError
    path = tmp_path / "run.yml"
    path.write_text("lr: 0.001\n")
    with pytest.raises(ValueError, match=r"run\.yml is YAML, which needs PyYAML.*JSON"):
        read_config_file(str(path))


@pytest.mark.parametrize("text, message", [
    ('{"lr_bakbone": 1}', r"unknown key 'lr_bakbone' \(did you mean 'lr_backbone'\?\)"),
    ('{"command": "train"}', r"unknown key 'command'"),
    ('{"epochs": 2.5}', r"epochs must be int, got 2\.5"),
    ('{"epochs": true}', r"epochs must be int, got True"),
    ('{"two_stage": 1}', r"two_stage must be bool, got 1"),
    ('{"backbone": null}', r"backbone must be str, got None"),
    ('{"preset": "dc6"}', r"preset 'dc6' is not one of cpu-small"),
    ('[1, 2]', r"must hold an object of settings"),
    ('{"lr": ', r"is not valid JSON"),
])
def test_config_file_errors_name_the_file_and_the_key(tmp_path, text, message):
    path = tmp_path / "run.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"config: .*run\.json.*" + message):
        read_config_file(str(path))


def test_config_file_kinds(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_config_file(str(tmp_path / "missing.json"))
    (tmp_path / "run.toml").write_text("")
    with pytest.raises(ValueError, match=r"expected a \.json, \.yaml or \.yml file"):
        read_config_file(str(tmp_path / "run.toml"))


def test_every_preset_key_is_a_field_and_has_help():
    assert set(PRESET_HELP) == set(PRESETS)
    for values in PRESETS.values():
        assert set(values) <= set(TrainConfig().to_dict())
