import json

import pytest
from PIL import Image

from ddetr.engine.plot import curves, plot_log, read_log


def write_log(path, epochs=4, evaluated=(1, 3)):
    with open(path, "w") as f:
        for epoch in range(epochs):
            record = {"epoch": epoch, "train_loss": 9.0 / (epoch + 1), "lr": 1e-3}
            if epoch in evaluated:
                record["coco_eval_bbox"] = [0.1 * epoch, 0.2 * epoch] + [0.05 * epoch] * 10
            f.write(json.dumps(record) + "\n")


def test_plot_writes_a_png_of_the_stated_size(tmp_path):
    write_log(tmp_path / "log.jsonl")
    out = plot_log(str(tmp_path / "log.jsonl"), str(tmp_path / "curves.png"), 700, 300)
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (700, 300)
        colours = {c for _, c in image.convert("RGB").getcolors(700 * 300)}
    assert (31, 119, 180) in colours and (44, 160, 44) in colours  # loss/AP, AP_small lines


def test_curves_take_the_last_record_of_each_epoch(tmp_path):
    write_log(tmp_path / "log.jsonl", epochs=3, evaluated=())
    with open(tmp_path / "log.jsonl", "a") as f:  # a second run in the same output_dir
        f.write(json.dumps({"epoch": 0, "train_loss": 1.5,
                            "coco_eval_bbox": [0.5, 0.7, 0.1, 0.3] + [0.0] * 8}) + "\n")
    data = curves(read_log(str(tmp_path / "log.jsonl")))
    assert data["train_loss"] == [(0, 1.5), (1, 4.5), (2, 3.0)]
    assert data["AP"] == [(0, 0.5)] and data["AP_small"] == [(0, 0.3)]


def test_a_log_without_evaluation_still_plots(tmp_path):
    write_log(tmp_path / "log.jsonl", epochs=1, evaluated=())
    out = plot_log(str(tmp_path / "log.jsonl"), str(tmp_path / "c.png"))
    with Image.open(out) as image:
        assert image.size == (960, 400)


def test_plot_errors_name_the_log(tmp_path):
    with pytest.raises(ValueError, match="missing.jsonl.*does not exist"):
        read_log(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"epoch": 0}\n{"loss": 1}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl line 2 has no 'epoch'"):
        read_log(str(bad))
    bad.write_text("")
    with pytest.raises(ValueError, match=r"bad\.jsonl has no records"):
        read_log(str(bad))
    write_log(tmp_path / "log.jsonl")
    with pytest.raises(ValueError, match="width, height"):
        plot_log(str(tmp_path / "log.jsonl"), str(tmp_path / "c.png"), 100, 100)
