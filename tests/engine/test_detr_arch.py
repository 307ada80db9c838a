"""``--arch detr``: the DETR baseline through the same builders, training loop, evaluation
and prediction as Deformable DETR."""

import json
import math

import pytest
import torch
from PIL import Image

from ddetr import Detr, cli
from ddetr.engine.builders import build_criterion, build_model, build_postprocess
from ddetr.engine.config import PRESETS
from ddetr.engine.optim import build_optimizer
from ddetr.engine.predict import detect, load_detector
from ddetr.engine.train import train_step
from ddetr.models.postprocess import PostProcess, SoftmaxPostProcess
from tests.engine.test_train_step import batch
from tests.engine.tiny import cli_flags, tiny_config


def test_builders_make_detr_and_its_softmax_losses(tmp_path):
    config = tiny_config(tmp_path, arch="detr", eos_coef=0.2)
    torch.manual_seed(0)
    model = build_model(config, num_classes=4)
    criterion = build_criterion(config, num_classes=4)
    assert isinstance(model, Detr) and model.class_embed.out_features == 5
    assert criterion.classification == "softmax" and criterion.eos_coef == 0.2
    assert criterion.matcher.classification == "softmax"
    assert isinstance(build_postprocess(model), SoftmaxPostProcess)
    assert isinstance(build_postprocess(build_model(tiny_config(tmp_path), 4)), PostProcess)
    optimizer, _ = build_optimizer(model, lr=1e-3)
    before = model.class_embed.weight.detach().clone()
    values = train_step(model, criterion, *batch(), optimizer, clip_max_norm=0.1, amp="off")
    assert math.isfinite(values["loss"]) and values["grad_norm"] > 0
    assert not torch.equal(before, model.class_embed.weight)
    assert {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0"} <= set(values)


def test_unknown_arch(tmp_path):
    with pytest.raises(ValueError, match="arch"):
        build_model(tiny_config(tmp_path, arch="yolo"), num_classes=4)


def test_detr_preset_is_the_official_recipe():
    detr = PRESETS["detr"]
    assert detr["arch"] == "detr" and detr["num_queries"] == 100
    assert detr["dim_feedforward"] == 2048 and detr["set_cost_class"] == 1.0
    assert detr["cls_loss_coef"] == 1.0 and detr["lr"] == 1e-4 and detr["lr_backbone"] == 1e-5
    assert PRESETS["detr-dc5"]["dilation"]


def test_cli_trains_evaluates_and_predicts_with_arch_detr(tmp_path, capsys):
    out = tmp_path / "out"
    # 4 training images at batch 4: one step
    code = cli.main(["train", *cli_flags(tmp_path), "--arch", "detr", "--epochs", "1",
                     "--output_dir", str(out), "--synthetic_train", "4"])
    assert code == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["arch"] == "detr"
    detector = load_detector(str(out / "checkpoint.pth"))
    assert isinstance(detector.model, Detr)
    image = Image.new("RGB", (80, 60), (120, 30, 200))
    found = detect(detector, image, threshold=0.0)
    classes = detector.model.config["num_classes"]
    assert len(found["scores"]) == 10 and found["labels"].max() < classes  # no "no object"
    with pytest.raises(ValueError, match="record_sampling"):
        detect(detector, image, record_sampling=True)
    capsys.readouterr()
    checkpoint = str(out / "checkpoint.pth")
    assert cli.main(["eval", "--checkpoint", checkpoint, "--num_workers", "0",
                     "--no-progress"]) == 0
    assert "Average Precision" in capsys.readouterr().out
    assert cli.main(["export", "--checkpoint", checkpoint, "--output",
                     str(tmp_path / "detr.onnx")]) == 2
    assert "Deformable DETR models only" in capsys.readouterr().err
