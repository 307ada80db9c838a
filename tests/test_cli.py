import contextlib
import io

import pytest

from ddetr import cli
from ddetr.engine.config import config_fields
from tests.engine.tiny import cli_flags, make_data


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny checkpoint trained by ``ddetr train`` (2 epochs, 2 steps each)."""
    tmp_path = tmp_path_factory.mktemp("cli")
    make_data(tmp_path / "cache")
    out = tmp_path / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main(["train", *cli_flags(tmp_path), "--epochs", "2",
                         "--output_dir", str(out), "--synthetic_train", "8"])
    assert code == 0
    return tmp_path, out, printed.getvalue()


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    for name, *_ in config_fields():
        assert f"--{name}" in text
    for flag in ("--lr_backbone", "--lr_linear_proj_mult", "--clip_max_norm", "--with_box_refine",
                 "--two_stage", "--resume", "--amp", "--enc_n_points", "--dec_n_points"):
        assert flag in text


@pytest.mark.parametrize("command", ["train", "eval", "predict", "export", "compress", "plot",
                                     "tune"])
def test_every_help_page_prints_clean_text(command, capsys):
    # argparse %-formats each flag's help but not a command's description: a "%%" written
    # for one shows literally in the other
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = capsys.readouterr().out
    assert f"usage: ddetr {command}" in text
    assert "%%" not in text and "%(" not in text


def test_train_prints_coco_numbers(trained):
    tmp_path, out, printed = trained
    assert "no dataset given" in printed
    assert "epoch 1: loss" in printed
    assert "final AP" in printed and "AP50" in printed and "AP_small" in printed
    assert (out / "checkpoint.pth").is_file() and (out / "log.jsonl").is_file()
    assert len((out / "log.jsonl").read_text().splitlines()) == 2


def test_eval_prints_all_twelve_numbers(trained, capsys):
    tmp_path, out, _ = trained
    assert cli.main(["eval", "--checkpoint", str(out / "checkpoint.pth"), "--num_workers", "0",
                     "--no-progress"]) == 0
    text = capsys.readouterr().out
    for name in ("AP ", "AP50", "AP75", "AP_small", "AR100", "AR_large"):
        assert name in text
    assert "Average Precision" in text


def test_eval_on_explicit_dataset(trained, capsys):
    tmp_path, out, _ = trained
    cache = tmp_path / "cache"
    assert cli.main(["eval", "--checkpoint", str(out / "checkpoint.pth"), "--num_workers", "0",
                     "--val_images", str(cache / "val"), "--val_annotations",
                     str(cache / "annotations" / "instances_val.json"), "--no-progress"]) == 0


def test_predict_draws_boxes_and_sampling_points(trained, capsys, tmp_path):
    data, out, _ = trained
    image = data / "cache" / "val" / "000000.png"
    code = cli.main(["predict", str(image), "--checkpoint", str(out / "checkpoint.pth"),
                     "--threshold", "0", "--output_dir", str(tmp_path), "--show-sampling-points"])
    assert code == 0
    text = capsys.readouterr().out
    assert "detections" in text and "wrote" in text
    assert (tmp_path / "000000_pred.png").is_file()
    assert (tmp_path / "000000_pred_sampling.png").is_file()


def test_errors_name_the_file(trained, capsys, tmp_path):
    _, out, _ = trained
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert cli.main(["predict", str(broken), "--checkpoint", str(out / "checkpoint.pth")]) == 2
    assert "broken.png" in capsys.readouterr().err
    bad_ann = tmp_path / "ann.json"
    bad_ann.write_text("[]")
    assert cli.main(["train", "--train_images", str(tmp_path), "--train_annotations",
                     str(bad_ann), "--no-progress"]) == 2
    assert "ann.json" in capsys.readouterr().err
