import json

import pytest
from PIL import Image

from ddetr import cli
from ddetr.engine import train
from ddetr.engine.config import CPU_SMALL, make_config, read_config_file
from tests.data.test_coco import bomb_png, write_dataset
from tests.engine.tiny import make_data


def dataset_flags(root) -> list[str]:
    """A COCO-format dataset that is not the demo's (the tiny synthetic one, in a folder
    of one's own), given by paths as one's own data would be."""
    make_data(root)
    return ["--train_images", str(root / "train"), "--train_annotations",
            str(root / "annotations" / "instances_train.json"), "--val_images",
            str(root / "val"), "--val_annotations", str(root / "annotations" / "instances_val.json")]


@pytest.fixture
def resolved(monkeypatch):
    """Runs ``ddetr train ARGS`` without training; returns the config it would train."""
    seen = []
    monkeypatch.setattr(train, "fit", lambda config, on_epoch=None: seen.append(config) or {})

    def run(*args) -> object:
        assert cli.main(["train", *args]) == 0
        return seen[-1]
    return run


def test_preset_cpu_small_resolves_to_the_demo_recipe(tmp_path, resolved):
    config = resolved("--preset", "cpu-small", *dataset_flags(tmp_path / "data"))
    demo = make_config({})
    assert not config.uses_synthetic()
    for key, value in CPU_SMALL.items():
        assert getattr(config, key) == value == getattr(demo, key), key


def test_flags_override_the_config_file_which_overrides_the_preset(tmp_path, resolved):
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"preset": "+refine", "lr": 5e-4, "epochs": 3, "d_model": 128}))
    config = resolved("--config", str(run), "--preset", "cpu-small", "--epochs", "2",
                      "--train_images", "x", "--train_annotations", "x.json")
    assert (config.epochs, config.lr, config.d_model, config.backbone) == (2, 5e-4, 128,
                                                                          "resnet18-tiny")
    assert resolved("--config", str(run), "--coco_path", "c").with_box_refine  # file's preset


def test_config_file_errors_exit_with_a_message(tmp_path, capsys):
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"epochs": 1, "learning_rate": 1e-3}))
    assert cli.main(["train", "--config", str(run)]) == 2
    err = capsys.readouterr().err
    assert "run.json" in err and "unknown key 'learning_rate'" in err


def test_help_documents_the_recipe_flags_and_plot(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("--preset", "--config", "cpu-small", "deformable-detr", "+refine",
                  "++two-stage", "single-scale", "dc5", "--dilation", "config.json"):
        assert words in text
    with pytest.raises(SystemExit):
        cli.main(["plot", "--help"])
    assert "--output" in capsys.readouterr().out


def test_too_few_images_for_a_batch_exit_with_a_message(tmp_path, capsys):
    images, annotations = write_dataset(tmp_path, [], n_images=2)
    out = tmp_path / "out"
    code = cli.main(["train", "--preset", "cpu-small", "--train_images", images,
                     "--train_annotations", annotations, "--batch_size", "4", "--no-progress",
                     "--output_dir", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "has 2 image(s), fewer than --batch_size 4" in err
    assert not (out / "checkpoint.pth").exists()


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    """``ddetr train --preset cpu-small`` for one epoch on a tiny dataset of one's own
    (2-7 s on 2 cores; once, for the tests marked slow below)."""
    tmp_path = tmp_path_factory.mktemp("own")
    out = tmp_path / "out"
    code = cli.main(["train", "--preset", "cpu-small", *dataset_flags(tmp_path / "data"),
                     "--epochs", "1", "--batch_size", "4", "--num_workers", "0", "--base_size",
                     "64", "--max_size", "96", "--no-progress", "--output_dir", str(out)])
    assert code == 0
    return tmp_path, out


@pytest.mark.slow
def test_cpu_small_trains_on_ones_own_data(own_run):
    tmp_path, out = own_run
    assert (out / "checkpoint.pth").is_file() and (out / "log.jsonl").is_file()
    record = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert "coco_eval_bbox" in record and "train_loss" in record
    saved = read_config_file(str(out / "config.json"))
    assert saved["backbone"] == "resnet18-tiny" and saved["base_size"] == 64
    assert saved["train_images"] == str(tmp_path / "data" / "train")


@pytest.mark.slow
def test_saved_config_repeats_the_run(own_run, resolved):
    _, out = own_run
    again = resolved("--config", str(out / "config.json"))
    assert again.to_dict() == json.loads((out / "config.json").read_text())


@pytest.mark.slow
def test_plot_command_writes_the_curves(own_run, tmp_path, capsys):
    _, out = own_run
    png = tmp_path / "curves.png"
    assert cli.main(["plot", str(out / "log.jsonl"), "--output", str(png), "--width", "800",
                     "--height", "300"]) == 0
    assert str(png) in capsys.readouterr().out
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (800, 300)
    assert cli.main(["plot", str(tmp_path / "none.jsonl")]) == 2


@pytest.mark.slow
def test_predict_skips_a_decompression_bomb(own_run, tmp_path, capsys):
    data, out = own_run
    bomb = tmp_path / "bomb.png"
    bomb_png(bomb)
    good = data / "data" / "val" / "000000.png"
    code = cli.main(["predict", str(bomb), str(good), "--checkpoint", str(out / "checkpoint.pth"),
                     "--threshold", "0", "--output_dir", str(tmp_path / "pred")])
    assert code == 2  # an image was left out
    captured = capsys.readouterr()
    assert "bomb.png" in captured.err and "skipped" in captured.err
    assert f"{good}: " in captured.out and (tmp_path / "pred" / "000000_pred.png").is_file()
