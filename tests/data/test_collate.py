import torch

from ddetr.data.collate import collate_fn, pad_images


def test_pad_and_mask():
    a = torch.ones(3, 4, 6)
    b = torch.full((3, 5, 3), 2.0)
    batch, mask = pad_images([a, b])
    assert batch.shape == (2, 3, 5, 6) and mask.shape == (2, 5, 6)
    assert mask.dtype == torch.bool
    assert not mask[0, :4, :].any() and mask[0, 4, :].all()
    assert not mask[1, :, :3].any() and mask[1, :, 3:].all()
    assert (batch[0, :, :4] == 1).all() and (batch[0, :, 4] == 0).all()
    assert (batch[1, :, :, :3] == 2).all() and (batch[1, :, :, 3:] == 0).all()


def test_collate_fn_keeps_targets():
    samples = [(torch.zeros(3, 2, 2), {"labels": torch.tensor([1])}),
               (torch.zeros(3, 3, 1), {"labels": torch.tensor([], dtype=torch.int64)})]
    images, mask, targets = collate_fn(samples)
    assert images.shape == (2, 3, 3, 2)
    assert mask.sum().item() == (6 - 4) + (6 - 3)
    assert [len(t["labels"]) for t in targets] == [1, 0]
