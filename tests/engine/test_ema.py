import json

import pytest
import torch
from torch import nn

from ddetr.engine import checkpoint
from ddetr.engine.ema import WeightAverage
from ddetr.engine.predict import load_detector
from ddetr.engine.train import fit
from tests.engine.tiny import make_data, tiny_config


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_update_follows_the_formula():
    model = small_model()
    ema = WeightAverage(model, 0.9)
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    expected = {k: v.clone() for k, v in start.items()}
    for step in range(1, 30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(8, 3))  # moves the batch-norm statistics
        d = min(0.9, (1 + step) / (10 + step))
        assert ema.current_decay() == pytest.approx(d)
        ema.update(model)
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                expected[k] = d * expected[k] + (1 - d) * v
            else:
                expected[k] = v.clone()
    assert ema.updates == 29
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-6, msg=k)
    # the counter is copied, the weights averaged (not equal to the model's)
    assert int(ema.module[1].num_batches_tracked) == int(model[1].num_batches_tracked) == 29
    assert not torch.equal(ema.module[0].weight, model[0].weight)
    assert not ema.module.training
    assert not any(p.requires_grad for p in ema.module.parameters())


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 1.5, "0.9"])
def test_bad_decay(decay):
    with pytest.raises(ValueError, match="ema_decay: expected a number in"):
        WeightAverage(small_model(), decay)


def test_a_changed_model_is_refused():
    model = small_model()
    ema = WeightAverage(model, 0.99)
    model.add_module("extra", nn.Linear(2, 2))
    with pytest.raises(ValueError, match="differ from those of the averaged copy"):
        ema.update(model)


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_training_keeps_evaluates_and_resumes_the_average(tmp_path):
    make_data(tmp_path / "cache")
    straight = tiny_config(tmp_path, epochs=2, ema_decay=0.9, output_dir=str(tmp_path / "a"))
    fit(straight, max_steps_per_epoch=3)
    state = checkpoint.read_checkpoint(str(tmp_path / "a" / "checkpoint.pth"))
    assert state["ema"]["updates"] == 6 and state["ema"]["decay"] == 0.9
    assert state["ema"]["model"].keys() == state["model"].keys()
    key = "class_embed.0.weight"
    assert not torch.equal(state["ema"]["model"][key], state["model"][key])
    # inference (eval, predict, compress, export) loads the average
    assert checkpoint.inference_weights(state) is state["ema"]["model"]
    detector = load_detector(str(tmp_path / "a" / "checkpoint.pth"))
    assert torch.equal(detector.model.state_dict()[key], state["ema"]["model"][key])
    # the evaluation of each epoch is the average's: resuming reproduces it exactly
    first = tiny_config(tmp_path, epochs=1, ema_decay=0.9, output_dir=str(tmp_path / "b"))
    fit(first, max_steps_per_epoch=3)
    resumed = tiny_config(tmp_path, epochs=2, ema_decay=0.9, output_dir=str(tmp_path / "b"),
                          resume=str(tmp_path / "b" / "checkpoint.pth"))
    fit(resumed, max_steps_per_epoch=3)
    again = checkpoint.read_checkpoint(str(tmp_path / "b" / "checkpoint.pth"))
    assert again["ema"]["updates"] == 6
    for k, v in state["ema"]["model"].items():
        torch.testing.assert_close(again["ema"]["model"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    a, b = read_log(tmp_path / "a" / "log.jsonl"), read_log(tmp_path / "b" / "log.jsonl")
    assert b[1]["coco_eval_bbox"] == pytest.approx(a[1]["coco_eval_bbox"], abs=1e-6)


def test_without_the_average_nothing_changes(tmp_path):
    make_data(tmp_path / "cache")
    fit(tiny_config(tmp_path, epochs=1), max_steps_per_epoch=2)
    state = checkpoint.read_checkpoint(str(tmp_path / "out" / "checkpoint.pth"))
    assert "ema" not in state
    assert checkpoint.inference_weights(state) is state["model"]


def test_resuming_a_run_without_an_average_starts_one(tmp_path):
    make_data(tmp_path / "cache")
    fit(tiny_config(tmp_path, epochs=1), max_steps_per_epoch=2)
    path = str(tmp_path / "out" / "checkpoint.pth")
    plain = checkpoint.read_checkpoint(path)["model"]
    fit(tiny_config(tmp_path, epochs=2, ema_decay=0.99, resume=path), max_steps_per_epoch=2)
    state = checkpoint.read_checkpoint(path)
    assert state["ema"]["updates"] == 2
    # two steps at d = 2/11 and 3/12 from the resumed weights: near the model, not equal
    key = "class_embed.0.weight"
    assert not torch.equal(state["ema"]["model"][key], plain[key])
    assert not torch.equal(state["ema"]["model"][key], state["model"][key])
