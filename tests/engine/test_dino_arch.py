"""``--arch dino``: DINO through the same builders, training loop, evaluation, prediction,
compression and export as Deformable DETR, with its recipe's defaults."""

import contextlib
import io
import json
import math

import pytest
import torch
from PIL import Image

from ddetr import cli
from ddetr.engine.builders import build_criterion, build_model
from ddetr.engine.config import PRESETS, make_config
from ddetr.engine.optim import build_optimizer
from ddetr.engine.predict import detect, load_detector
from ddetr.engine.train import train_step
from ddetr.models import DeformableDetr, DinoCriterion
from tests.engine.test_train_step import batch
from tests.engine.tiny import cli_flags, tiny_config


def test_builders_make_dino_and_its_losses(tmp_path):
    config = tiny_config(tmp_path, arch="dino", dn_number=4, two_stage=True)
    torch.manual_seed(0)
    model = build_model(config, num_classes=4)
    criterion = build_criterion(config, num_classes=4)
    assert isinstance(model, DeformableDetr) and model.dino and model.takes_targets
    assert model.config["dn_number"] == 4 and isinstance(criterion, DinoCriterion)
    optimizer, _ = build_optimizer(model, lr=1e-3)
    before = model.label_enc.weight.detach().clone()
    values = train_step(model, criterion, *batch(), optimizer, clip_max_norm=0.1, amp="off")
    assert math.isfinite(values["loss"]) and values["grad_norm"] > 0
    assert values["loss_ce_dn"] > 0 and values["loss_bbox_dn_0"] > 0  # targets reached it
    assert not torch.equal(before, model.label_enc.weight)


def test_arch_dino_brings_the_recipe(tmp_path):
    config = make_config({"arch": "dino", "coco_path": str(tmp_path)})
    assert (config.num_queries, config.dim_feedforward, config.dropout) == (900, 2048, 0.0)
    assert (config.dn_number, config.dn_label_noise_ratio, config.dn_box_noise_scale) == (100, 0.5, 1.0)
    assert (config.lr, config.lr_backbone, config.epochs, config.lr_drop) == (1e-4, 1e-5, 12, 11)
    assert (config.set_cost_class, config.set_cost_bbox, config.set_cost_giou) == (2.0, 5.0, 2.0)
    assert config.cls_loss_coef == 1.0 and config.two_stage and config.with_box_refine
    assert config.num_feature_levels == 4 and config.d_model == 256
    assert (config.enc_layers, config.dec_layers) == (6, 6)
    assert PRESETS["dino"]["arch"] == "dino"
    # the flags still win, and the synthetic demo keeps its sizes
    assert make_config({"arch": "dino", "coco_path": "x", "lr": 3e-4}).lr == 3e-4
    demo = make_config({"arch": "dino"})
    assert (demo.num_queries, demo.d_model, demo.dn_number, demo.cls_loss_coef) == \
        (120, 64, 100, 2.0)
    # and its own schedule (README, DINO), while the main job's stays the demo's
    assert (demo.batch_size, demo.ema_decay, demo.epochs, demo.lr_drop) == (2, 0.999, 6, 6)
    assert (demo.lr, demo.lr_backbone) == (1e-3, 1e-3)  # the main job's
    main_job = make_config({})
    assert (main_job.batch_size, main_job.ema_decay, main_job.epochs, main_job.lr_drop) == \
        (8, 0.0, 10, 8)


def test_train_help_with_arch_dino_states_its_defaults(capsys):
    try:
        cli.main(["train", "--arch", "dino", "--help"])
    except SystemExit:
        pass
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--num_queries", "900"), ("--dim_feedforward", "2048"),
                          ("--dn_number", "100"), ("--dn_label_noise_ratio", "0.5"),
                          ("--dn_box_noise_scale", "1.0"), ("--lr", "0.0001"),
                          ("--epochs", "12"), ("--lr_drop", "11"), ("--cls_loss_coef", "1.0"),
                          ("--set_cost_class", "2.0"), ("--set_cost_bbox", "5.0"),
                          ("--set_cost_giou", "2.0"), ("--d_model", "256")):
        start = text.rindex(f"{flag} {flag.upper()[2:]}")  # (its help, after the usage)
        assert f"(default {default}" in text[start:start + 400], flag
    start = text.rindex("--ema_decay EMA_DECAY")
    assert "(default 0.0; synthetic demo 0.999)" in text[start:start + 600]
    start = text.rindex("--lr LR")
    assert "(default 0.0001; synthetic demo 0.001)" in text[start:start + 400]
    start = text.rindex("--num_queries NUM_QUERIES")
    assert "(default 900; synthetic demo 120)" in text[start:start + 400]
    try:
        cli.main(["train", "--help"])
    except SystemExit:
        pass
    plain = " ".join(capsys.readouterr().out.split())
    assert "object queries (default 300" in plain


@pytest.mark.slow
def test_cli_trains_evaluates_predicts_exports_and_compresses_dino(tmp_path):
    out = tmp_path / "out"
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet:
        code = cli.main(["train", *cli_flags(tmp_path), "--arch", "dino", "--two_stage",
                         "--epochs", "1", "--dn_number", "4", "--output_dir", str(out),
                         "--synthetic_train", "4"])
    assert code == 0
    assert json.loads((out / "config.json").read_text())["arch"] == "dino"
    record = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert "train_loss_ce_dn" in record and "coco_eval_bbox" in record
    checkpoint = str(out / "checkpoint.pth")
    detector = load_detector(checkpoint)
    assert detector.model.dino and not detector.model.training
    found = detect(detector, Image.new("RGB", (80, 60), (120, 30, 200)), threshold=0.0,
                   record_sampling=True)
    assert len(found["scores"]) == 10 and "sampling" in found
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["eval", "--checkpoint", checkpoint, "--num_workers", "0",
                         "--no-progress"]) == 0
        assert cli.main(["export", "--checkpoint", checkpoint, "--output",
                         str(tmp_path / "dino.onnx"), "--height", "64", "--width", "64"]) == 0
        assert cli.main(["compress", "--checkpoint", checkpoint, "--output_dir",
                         str(tmp_path / "small"), "--max_ap_drop", "0.05", "--calib_images",
                         "2", "--latency_images", "2", "--time_budget", "1", "--no-progress",
                         "--cache_dir", str(tmp_path / "cache")]) == 0
    assert "Average Precision" in printed.getvalue()
    assert (tmp_path / "dino.onnx").stat().st_size > 0
    small = load_detector(str(tmp_path / "small" / "checkpoint.pth"))
    assert small.model.dino
