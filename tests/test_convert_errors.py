"""Weight files that cannot be loaded (corrupt, truncated, foreign or holding pickled
code) give a ValueError naming the file; nothing in them runs."""

import argparse
import pathlib

import pytest
import torch

from ddetr import DeformableDetr, convert
from ddetr.models.backbone import ResNet, load_backbone_weights
from tests.models.detr_cases import tiny_model


def plant_marker(path):
    pathlib.Path(path).write_text("code from the file ran")


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return plant_marker, (self.marker,)


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model's save_pretrained directories (safetensors and torch) and its
    official checkpoint."""
    root = tmp_path_factory.mktemp("weights")
    model = tiny_model("plain")
    model.save_pretrained(root / "safe")
    model.save_pretrained(root / "bin", safe_serialization=False)
    torch.save({"model": convert.to_official(model), "args": argparse.Namespace(nheads=4)},
               root / "official.pth")
    return root


def copy_dir(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_corrupt_safetensors_names_the_file(saved, tmp_path):
    directory = copy_dir(saved / "safe", tmp_path / "model")
    truncate(directory / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors"):
        DeformableDetr.from_pretrained(directory)
    (directory / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        DeformableDetr.from_pretrained(directory)


def test_truncated_bin_names_the_file(saved, tmp_path):
    directory = copy_dir(saved / "bin", tmp_path / "model")
    truncate(directory / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin cannot be read: truncated"):
        DeformableDetr.from_pretrained(directory)


def test_pickled_code_in_a_bin_does_not_run(saved, tmp_path):
    directory = copy_dir(saved / "bin", tmp_path / "model")
    marker = tmp_path / "pwned"
    torch.save({"weight": Payload(marker)}, directory / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin was refused.*plant_marker"):
        DeformableDetr.from_pretrained(directory)
    assert not marker.exists()


@pytest.mark.parametrize("text, problem", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "is not a ddetr DeformableDetr config"),
    ('{"format": "ddetr.DeformableDetr"}', "has no 'config' object"),
    ('{"format": "ddetr.DeformableDetr", "config": {"num_layers": 3}}',
     r"unknown config entries \['num_layers'\]"),
])
def test_bad_config_json_names_the_file(saved, tmp_path, text, problem):
    directory = copy_dir(saved / "safe", tmp_path / "model")
    (directory / "config.json").write_text(text)
    with pytest.raises(ValueError, match=r"config\.json.*" + problem):
        DeformableDetr.from_pretrained(directory)


def test_from_official_on_a_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("these are not weights\n")
    with pytest.raises(ValueError, match=r"notes\.txt cannot be read: truncated or not a torch"):
        convert.from_official(str(path))


def test_from_official_on_a_truncated_file(saved, tmp_path):
    path = tmp_path / "cut.pth"
    path.write_bytes((saved / "official.pth").read_bytes())
    truncate(path)
    with pytest.raises(ValueError, match=r"cut\.pth cannot be read"):
        convert.from_official(str(path))
    assert convert.from_official(str(saved / "official.pth")).config["num_heads"] == 4


def test_from_official_refuses_pickled_code(saved, tmp_path):
    path = tmp_path / "evil.pth"
    marker = tmp_path / "pwned"
    state = convert.to_official(tiny_model("plain"))
    torch.save({"model": state, "args": Payload(marker)}, path)
    with pytest.raises(ValueError, match=r"(?s)evil\.pth was refused.*weights_only=False"):
        convert.from_official(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("name", ["resnet.safetensors", "resnet.pth"])
def test_corrupt_backbone_weights_name_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match=r"backbone_weights: .*" + name.replace(".", r"\.")):
        load_backbone_weights(ResNet("basic", (1, 1, 1, 1)), str(path))
