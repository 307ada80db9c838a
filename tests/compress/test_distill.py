"""Recovery by distillation: the teacher's pseudo labels, a short training of the
student on them, and the search trying combinations beyond the budget with it."""

import contextlib
import io
import json

import pytest
import torch

from ddetr import cli, compress
from ddetr.compress.distill import distill, pseudo_labels
from ddetr.compress.search import Finetune
from ddetr.data.coco import CocoDetection
from ddetr.data.transforms import train_transforms, val_transforms
from tests.engine.tiny import cli_flags, make_data
from tests.models.detr_cases import tiny_model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    make_data(root / "cache")
    images = root / "cache" / "train"
    annotations = root / "cache" / "annotations" / "instances_train.json"
    return root, str(images), str(annotations)


def _teacher():
    # confident everywhere: every query scores about sigmoid(3) for class 1
    model = tiny_model("box_refine")
    with torch.no_grad():
        for head in model.class_embed:
            head.bias.fill_(-5.0)
            head.bias[1] = 3.0
    return model


def test_pseudo_labels_are_the_teachers_detections_above_the_threshold(data):
    _, images, annotations = data
    view = CocoDetection(images, annotations, val_transforms(64, 96), 5)
    labels = pseudo_labels(_teacher(), view, score_threshold=0.5, progress=False)
    assert labels["images"] == view.coco.dataset["images"]
    assert labels["annotations"], "a confident teacher labels something"
    assert {a["category_id"] for a in labels["annotations"]} == {1}
    by_image = {}
    for a in labels["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
        assert a["bbox"][2] > 0 and a["bbox"][3] > 0 and a["area"] > 0
    assert set(by_image) == set(view.ids)
    none = pseudo_labels(_teacher(), view, score_threshold=0.99, progress=False)
    assert none["annotations"] == []


def test_distill_trains_a_copy_and_records_it(data, tmp_path):
    _, images, annotations = data
    teacher = _teacher()
    view = CocoDetection(images, annotations, val_transforms(64, 96), 5)
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(pseudo_labels(teacher, view, 0.5, progress=False)))
    student = compress.truncate_decoder(tiny_model("box_refine"), 1)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    train = CocoDetection(images, str(path), train_transforms(64, 96), 5)
    trained = distill(student, train, epochs=1, lr=1e-3, batch_size=4, progress=False)
    assert trained is not student and not trained.training
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, before[k])]
    assert any("transformer" in k for k in changed)
    assert trained.compression[-1]["technique"] == "distill"
    assert trained.compression[:-1] == student.compression


@pytest.mark.parametrize("kwargs, name", [({"epochs": 0}, "epochs"), ({"lr": 0.0}, "lr")])
def test_distill_bad_arguments_named(data, kwargs, name):
    args = {"epochs": 1, "lr": 1e-4, **kwargs}
    with pytest.raises(ValueError, match=name):
        distill(tiny_model(), [], **args)


def test_distill_refuses_an_untrainable_student():
    with pytest.raises(ValueError, match="student"):
        distill(compress.to_bfloat16(tiny_model()), [], epochs=1)
    with pytest.raises(ValueError, match="score_threshold"):
        pseudo_labels(tiny_model(), [], score_threshold=1.5)


def _fake_measures(monkeypatch):
    """AP 0.5 less 0.05 per technique applied, back to 0.5 after distillation; each
    technique saves 1 ms (the search's decisions, without noise)."""
    import ddetr.compress.search as search

    def accuracy(model, dataset, device):
        done = [r for r in model.compression if r["technique"] != "distill"]
        distilled = len(done) < len(model.compression)
        return {"AP": 0.5 if distilled else 0.5 - 0.05 * len(done), "AP50": 0.0, "AP_small": 0.0}

    def latency(model, images, device, reference=None):
        ms = 10.0 - len(model.compression)
        return {"latency_ms": ms, "peak_mem_mb": 0.0, "relative_latency": ms / 10.0}

    monkeypatch.setattr(search, "accuracy", accuracy)
    monkeypatch.setattr(search, "latency", latency)


def test_finetune_search_distills_a_combination_beyond_the_budget(data, monkeypatch):
    root, images, annotations = data
    _fake_measures(monkeypatch)
    teacher = _teacher()
    val = CocoDetection(str(root / "cache" / "val"),
                        str(root / "cache" / "annotations" / "instances_val.json"),
                        val_transforms(64, 96), 5)
    view = CocoDetection(images, annotations, val_transforms(64, 96), 5)
    path = root / "labels.json"
    path.write_text(json.dumps(pseudo_labels(teacher, view, 0.5, progress=False)))
    finetune = Finetune(1, lambda scale: CocoDetection(images, str(path),
                                                       train_transforms(64, 96), 5),
                        lr=1e-4, batch_size=4, budgets=(0.12, 0.06))
    chosen, report = compress.compress(teacher, val, max_ap_drop=0.01, calib_images=1,
                                       latency_images=1, progress=False, finetune=finetune)
    # post hoc nothing fits 0.01; the 0.12 budget combines two techniques, which
    # distillation brings back; bfloat16 then comes on top (it costs 0.05 too: refused)
    assert report["chosen"]["applied"][-1] == "distill 1 epochs"
    assert len(report["chosen"]["applied"]) == 3
    assert [r["technique"] for r in chosen.compression][-1] == "distill"
    names = [r["name"] for r in report["rows"]]
    assert len(names) == len(set(names)), "each combination is measured once"


def test_finetune_argument_checked():
    with pytest.raises(ValueError, match="finetune"):
        compress.compress(tiny_model(), [], finetune=Finetune(0, lambda s: None))


@pytest.mark.slow
def test_cli_finetune_writes_the_pseudo_labels(tmp_path):
    make_data(tmp_path / "cache")
    out = tmp_path / "out"
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["train", *cli_flags(tmp_path), "--epochs", "1", "--output_dir",
                         str(out)]) == 0
        code = cli.main(["compress", "--checkpoint", str(out / "checkpoint.pth"),
                         "--output_dir", str(tmp_path / "small"), "--finetune_epochs", "1",
                         "--calib_images", "1", "--latency_images", "1", "--no-progress",
                         "--time_budget", "2", "--cache_dir", str(tmp_path / "cache")])
    assert code == 0
    labels = json.loads((tmp_path / "small" / "pseudo_labels.json").read_text())
    assert len(labels["images"]) == 16  # the tiny run's training images
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli.main(["compress", "--checkpoint", str(out / "checkpoint.pth"),
                         "--finetune_epochs", "-1"]) == 2
    assert "finetune_epochs" in err.getvalue()


def test_the_teachers_duplicates_are_dropped():
    from ddetr.compress.distill import _deduplicate
    records = [{"image_id": 1, "category_id": 2, "bbox": [10, 10, 20, 20], "score": 0.9},
               {"image_id": 1, "category_id": 2, "bbox": [11, 10, 20, 20], "score": 0.8},
               {"image_id": 1, "category_id": 3, "bbox": [11, 10, 20, 20], "score": 0.7},
               {"image_id": 2, "category_id": 2, "bbox": [11, 10, 20, 20], "score": 0.6},
               {"image_id": 1, "category_id": 2, "bbox": [40, 40, 5, 5], "score": 0.5}]
    kept = _deduplicate(records)
    assert [r["score"] for r in sorted(kept, key=lambda r: -r["score"])] == [0.9, 0.7, 0.6, 0.5]
