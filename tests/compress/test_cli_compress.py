"""``ddetr compress`` end to end on a tiny trained checkpoint: the report, the chosen
model within the AP budget, and what it writes loads in ddetr eval / predict."""

import contextlib
import io
import json

import pytest
import torch

from ddetr import DeformableDetr, cli, compress
from ddetr.engine.predict import load_detector
from tests.engine.tiny import cli_flags, make_data


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("compress")
    make_data(tmp_path / "cache")
    out = tmp_path / "out"
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["train", *cli_flags(tmp_path), "--epochs", "1", "--output_dir",
                         str(out), "--synthetic_train", "8"]) == 0
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main(["compress", "--checkpoint", str(out / "checkpoint.pth"),
                         "--output_dir", str(tmp_path / "small"), "--max_ap_drop", "0.05",
                         "--calib_images", "2", "--latency_images", "2", "--no-progress",
                         "--cache_dir", str(tmp_path / "cache")])
    assert code == 0
    return tmp_path, out, printed.getvalue()


@pytest.mark.slow
def test_report_lists_every_candidate_and_the_choice(compressed):
    tmp_path, _, printed = compressed
    report = json.loads((tmp_path / "small" / "report.json").read_text())
    names = [r["name"] for r in report["rows"]]
    assert names[0] == "original" and "precision bfloat16" in names
    assert any(n.startswith("decoder layers") for n in names)
    assert any(n.startswith("input size") for n in names)
    assert report["ap_drop"] <= 0.05 + 1e-9
    assert report["chosen"]["relative_latency"] <= 1.0 == report["original"]["relative_latency"]
    assert all(r["relative_latency"] > 0 for r in report["rows"])
    assert "chosen:" in printed and (tmp_path / "small" / "report.png").stat().st_size > 1000
    assert 0 < report["pyramid_share"] <= 1
    assert report["transformer_bound"] == pytest.approx(1 / report["pyramid_share"])
    assert "cuts of the transformer alone can give at most" in printed


@pytest.mark.slow
def test_what_it_writes_loads_with_the_chosen_settings(compressed):
    tmp_path, _, _ = compressed
    report = json.loads((tmp_path / "small" / "report.json").read_text())
    detector = load_detector(str(tmp_path / "small" / "checkpoint.pth"))
    assert detector.model.compression == report["applied"]
    scale = 1.0
    for record in report["applied"]:
        scale *= record.get("scale", 1.0)
    assert detector.base_size == max(1, round(64 * scale))  # the tiny run's base_size
    pretrained = DeformableDetr.from_pretrained(tmp_path / "small" / "model").eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a, b = detector.model(x), pretrained(x)
    assert torch.equal(a["pred_boxes"], b["pred_boxes"])
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["eval", "--checkpoint", str(tmp_path / "small" / "checkpoint.pth"),
                         "--num_workers", "0", "--no-progress",
                         "--cache_dir", str(tmp_path / "cache")]) == 0


@pytest.mark.parametrize("kwargs, name", [({"max_ap_drop": -0.1}, "max_ap_drop"),
                                          ({"calib_images": 0}, "calib_images"),
                                          ({"time_budget": 0}, "time_budget")])
def test_bad_arguments_named(kwargs, name):
    from tests.models.detr_cases import tiny_model
    with pytest.raises(ValueError, match=name):
        compress.compress(tiny_model(), [], **kwargs)


def test_not_a_detector_is_refused():
    with pytest.raises(ValueError, match="model"):
        compress.compress(torch.nn.Linear(2, 2), [])


def test_report_plot_names_the_front_and_survives_outliers(tmp_path):
    from ddetr.compress.api import _pareto
    rows = [{"name": n, "AP": ap, "relative_latency": rl}
            for n, ap, rl in (("original", 0.5, 1.0), ("fast", 0.3, 0.6), ("slow", 0.49, 11.0),
                              ("worse", 0.29, 0.7), ("mid", 0.45, 0.8))]
    assert [r["name"] for r in _pareto(rows)] == ["original", "fast", "mid"]
    report = {"rows": rows, "original": rows[0], "chosen": rows[0], "cpu": "test CPU",
              "max_ap_drop": 0.01}
    _, png = compress.write_report(report, str(tmp_path))
    assert (tmp_path / "report.png").stat().st_size > 1000 and png.endswith("report.png")


def test_pyramid_share_is_a_part_of_the_forward():
    from ddetr.compress.measure import pyramid_share
    from tests.models.detr_cases import tiny_model
    images = [torch.rand(3, 64, 64) for _ in range(3)]
    share = pyramid_share(tiny_model().eval(), images, torch.device("cpu"), warmup=1)
    assert 0 < share <= 1
