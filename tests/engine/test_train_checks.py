import pytest

from ddetr.engine.train import check_enough_images, fit
from tests.data.test_coco import write_dataset
from tests.engine.tiny import tiny_config


@pytest.mark.parametrize("n_images", [0, 2])
def test_fewer_images_than_a_batch_stops_before_training(tmp_path, n_images):
    images, annotations = write_dataset(tmp_path, [], n_images=n_images)
    config = tiny_config(tmp_path, train_images=images, train_annotations=annotations,
                         batch_size=4)
    with pytest.raises(ValueError, match=rf"has {n_images} image\(s\), fewer than "
                                         rf"--batch_size 4 .*dropped"):
        fit(config)
    assert not (tmp_path / "out" / "checkpoint.pth").exists()


def test_enough_images_counts_every_process():
    check_enough_images(4, 4, 1, "a.json")
    check_enough_images(7, 4, 2, "a.json")  # the sampler pads 7 to 2 x 4
    with pytest.raises(ValueError, match=r"6 image\(s\) shared by 2 processes"):
        check_enough_images(6, 4, 2, "a.json")
    with pytest.raises(ValueError, match="batch_size: expected at least 1"):
        check_enough_images(6, 0, 1, "a.json")
