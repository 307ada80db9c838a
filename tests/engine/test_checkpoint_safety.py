"""Checkpoints load as tensors and plain data only (no code in a file runs unless the
user opts in with trust_pickle), and every model tensor must be in them."""

import logging
import pathlib
import random

import numpy as np
import pytest
import torch
from PIL import Image

from ddetr import DeformableDetr, cli
from ddetr.engine import checkpoint as ckpt
from tests.engine.tiny import cli_flags, make_data
from tests.models.detr_cases import TINY


def plant_marker(path):
    """What a malicious pickle calls: any effect on disk shows that code ran."""
    pathlib.Path(path).write_text("code from the checkpoint ran")


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return plant_marker, (self.marker,)


def tiny_parts(seed=0):
    torch.manual_seed(seed)
    model = DeformableDetr(**TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 4)
    return model, optimizer, scheduler


def detector_config(model):
    return {"model": model.config, "train": {"base_size": 64, "max_size": 96},
            "categories": [{"id": 1, "name": "circle"}]}


def save_tiny(path, seed=0):
    model, optimizer, scheduler = tiny_parts(seed)
    ckpt.save_checkpoint(str(path), model, optimizer, scheduler, 3, detector_config(model))
    return model


def malicious_file(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "epoch": 0, "config": Payload(marker)}, path)
    return path, marker


def image_file(tmp_path):
    path = tmp_path / "image.png"
    Image.fromarray(np.full((64, 80, 3), 128, dtype=np.uint8)).save(path)
    return path


def test_malicious_checkpoint_is_refused(tmp_path):
    path, marker = malicious_file(tmp_path)
    with pytest.raises(ValueError, match=r"(?s)evil\.pth.*plant_marker.*trust_pickle=True") as err:
        ckpt.read_checkpoint(str(path))
    assert "run code" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_cli_refuses_a_malicious_checkpoint(tmp_path, capsys, command):
    path, marker = malicious_file(tmp_path)
    extra = [str(image_file(tmp_path)), "--output_dir", str(tmp_path)] if command == "predict" else []
    assert cli.main([command, *extra, "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert "evil.pth" in err and "--trust_pickle" in err
    assert not marker.exists()


def test_train_resume_refuses_a_malicious_checkpoint(tmp_path, capsys):
    make_data(tmp_path / "cache")
    path, marker = malicious_file(tmp_path)
    code = cli.main(["train", *cli_flags(tmp_path), "--epochs", "1", "--output_dir",
                     str(tmp_path / "out"), "--resume", str(path)])
    assert code == 2
    assert "--trust_pickle" in capsys.readouterr().err
    assert not marker.exists()


def test_help_documents_trust_pickle(capsys):
    for command in ("train", "eval", "predict"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--trust_pickle" in text and "runs any code in the file" in text


def draws():
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),
            np.random.standard_normal(), torch.rand(3).tolist())


def test_saved_checkpoint_loads_as_weights_and_resumes_exactly(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    random.gauss(0, 1)  # leaves a cached second normal in each generator
    np.random.standard_normal()
    model, optimizer, scheduler = tiny_parts()
    path = tmp_path / "checkpoint.pth"
    ckpt.save_checkpoint(str(path), model, optimizer, scheduler, 3, detector_config(model))
    expected = draws()
    draws()
    state = torch.load(path, map_location="cpu", weights_only=True)  # no allow-listed class
    assert set(state) >= {"model", "optimizer", "lr_scheduler", "epoch", "config", "rng"}
    assert state["config"]["model"] == DeformableDetr(**TINY).config
    assert ckpt.resume(state, model, optimizer, scheduler) == 4
    assert draws() == expected


def old_format_file(tmp_path):
    """A checkpoint as an older ddetr wrote it: the generators' own (pickled) states."""
    path = tmp_path / "old.pth"
    save_tiny(path, seed=1)
    state = torch.load(path, weights_only=True)
    random.seed(7)
    np.random.seed(8)
    state["rng"] = [{"python": random.getstate(), "numpy": np.random.get_state(),
                     "torch": torch.get_rng_state()}]
    torch.save(state, path)
    return path


def test_old_format_checkpoint_needs_the_opt_in(tmp_path, capsys):
    path = old_format_file(tmp_path)
    expected = draws()
    with pytest.raises(ValueError, match=r"(?s)old\.pth.*numpy.*trust_pickle=True"):
        ckpt.read_checkpoint(str(path))
    state = ckpt.read_checkpoint(str(path), trust_pickle=True)
    model = DeformableDetr(**TINY)
    ckpt.resume(state, model)
    assert draws() == expected
    image = image_file(tmp_path)
    command = ["predict", str(image), "--checkpoint", str(path), "--output_dir", str(tmp_path),
               "--threshold", "0"]
    assert cli.main(command) == 2
    assert cli.main([*command, "--trust_pickle"]) == 0
    assert "image.png: 10 detections" in capsys.readouterr().out


def test_config_is_stored_as_plain_data(tmp_path):
    model, optimizer, scheduler = tiny_parts()
    config = {"train": {"output_dir": tmp_path, "seed": np.int64(3)}}
    path = tmp_path / "checkpoint.pth"
    ckpt.save_checkpoint(str(path), model, optimizer, scheduler, 0, config)
    saved = torch.load(path, weights_only=True)["config"]
    assert saved == {"train": {"output_dir": str(tmp_path), "seed": 3}}
    with pytest.raises(ValueError, match=r"config\['train'\]\['fn'\]: a function"):
        ckpt.save_checkpoint(str(path), model, optimizer, scheduler, 0,
                             {"train": {"fn": plant_marker}})


def test_missing_model_tensors_are_an_error(tmp_path, capsys):
    path = tmp_path / "empty.pth"
    model = save_tiny(path)
    state = torch.load(path, weights_only=True)
    state["model"] = {}
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"checkpoint: \d+ missing keys \[.*backbone"):
        ckpt.resume(ckpt.read_checkpoint(str(path)), model, restore_rng=False)
    assert cli.main(["eval", "--checkpoint", str(path)]) == 2
    assert "missing keys" in capsys.readouterr().err


def test_extra_keys_are_ignored_with_a_warning(tmp_path, caplog):
    path = tmp_path / "extra.pth"
    saved = save_tiny(path, seed=2)
    state = torch.load(path, weights_only=True)
    state["model"]["total_ops"] = torch.zeros(1)
    torch.save(state, path)
    model = DeformableDetr(**TINY)
    with caplog.at_level(logging.WARNING):
        ckpt.resume(ckpt.read_checkpoint(str(path)), model, restore_rng=False)
    assert "total_ops" in caplog.text and "ignored" in caplog.text
    for key, value in saved.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)
