import json

import pytest

from ddetr.engine.train import fit
from tests.engine.tiny import make_data, tiny_config


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    make_data(tmp_path / "cache")
    straight = tiny_config(tmp_path, epochs=2, output_dir=str(tmp_path / "a"))
    fit(straight, max_steps_per_epoch=2)
    first = tiny_config(tmp_path, epochs=1, output_dir=str(tmp_path / "b"))
    fit(first, max_steps_per_epoch=2)
    resumed = tiny_config(tmp_path, epochs=2, output_dir=str(tmp_path / "b"),
                          resume=str(tmp_path / "b" / "checkpoint.pth"))
    fit(resumed, max_steps_per_epoch=2)
    a = read_log(tmp_path / "a" / "log.jsonl")
    b = read_log(tmp_path / "b" / "log.jsonl")
    assert [r["epoch"] for r in b] == [0, 1]
    assert b[0]["train_loss"] == pytest.approx(a[0]["train_loss"], rel=1e-6)
    # the step after the checkpoint: same data, augmentation, dropout and optimiser state
    assert b[1]["train_loss"] == pytest.approx(a[1]["train_loss"], rel=1e-6)
    assert b[1]["coco_eval_bbox"] == pytest.approx(a[1]["coco_eval_bbox"], abs=1e-9)


def test_resume_from_a_missing_checkpoint(tmp_path):
    make_data(tmp_path / "cache")
    config = tiny_config(tmp_path, epochs=1, resume=str(tmp_path / "none.pth"))
    with pytest.raises(ValueError, match="checkpoint: .*none.pth.* does not exist"):
        fit(config)
