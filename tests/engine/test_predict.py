import pytest

from ddetr.engine.predict import read_image
from tests.data.test_coco import bomb_png


def test_a_decompression_bomb_is_an_unreadable_image(tmp_path):
    bomb_png(tmp_path / "bomb.png")
    with pytest.raises(ValueError, match=r"image: .*bomb\.png cannot be read"):
        read_image(str(tmp_path / "bomb.png"))
