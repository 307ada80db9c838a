"""SizeCache: an LRU of size-only constants, safe across threads and inference mode; the
sine position encoding of unpadded masks served from it."""

import concurrent.futures

import torch

from ddetr.models import position_encoding
from ddetr.models.position_encoding import PositionEmbeddingSine
from ddetr.models.size_cache import SizeCache


def test_least_recently_used_goes_first():
    cache = SizeCache(2)
    made = []

    def maker(k):
        return lambda: made.append(k) or torch.tensor(k)

    for k in (1, 2, 1, 3):  # 1 used again after 2, so 2 is the one dropped for 3
        assert cache.get(k, maker(k)).item() == k
    assert made == [1, 2, 3] and cache.keys() == [1, 3]


def test_made_under_inference_mode_is_a_normal_tensor():
    cache = SizeCache(1)
    with torch.inference_mode():
        value = cache.get("k", lambda: torch.ones(3))
    assert not value.is_inference()
    x = torch.ones(3, requires_grad=True)
    (x * cache.get("k", None)).sum().backward()  # saves it for the backward
    assert torch.equal(x.grad, torch.ones(3))


def test_many_threads_get_what_they_asked_for():
    cache = SizeCache(4)

    def work(seed):
        for i in range(200):
            k = (seed * 7 + i) % 11  # more keys than the cache keeps
            assert cache.get(k, lambda k=k: torch.full((2,), float(k)))[0].item() == k

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(work, range(4)))
    assert len(cache.keys()) == 4


def test_unpadded_sine_encoding_is_cached_and_handed_out_as_a_copy():
    position_encoding.UNPADDED.clear()
    sine = PositionEmbeddingSine(8)
    mask = torch.zeros(2, 5, 7, dtype=torch.bool)
    out = sine(mask)
    torch.testing.assert_close(out, sine._encode(mask), rtol=0, atol=0)
    assert len(position_encoding.UNPADDED.keys()) == 1
    out.zero_()  # a caller writing into its result does not reach the cache
    torch.testing.assert_close(sine(mask[:1]), sine._encode(mask[:1]), rtol=0, atol=0)
    # another size, another offset: other entries; a padded mask: computed, not cached
    sine(torch.zeros(1, 4, 7, dtype=torch.bool))
    PositionEmbeddingSine(8, offset=0.0)(mask)
    assert len(position_encoding.UNPADDED.keys()) == 3
    padded = mask.clone()
    padded[1, :, 5:] = True
    torch.testing.assert_close(sine(padded), sine._encode(padded), rtol=0, atol=0)
    assert len(position_encoding.UNPADDED.keys()) == 3


def test_a_traced_graph_computes_the_encoding(monkeypatch):
    position_encoding.UNPADDED.clear()
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    torch.testing.assert_close(PositionEmbeddingSine(8)(mask),
                               PositionEmbeddingSine(8)._encode(mask), rtol=0, atol=0)
    assert position_encoding.UNPADDED.keys() == []


def test_known_unpadded(monkeypatch):
    from ddetr.models.size_cache import known_unpadded
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    assert known_unpadded(mask)
    mask[1, 2, 3] = True
    assert not known_unpadded(mask)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert not known_unpadded(torch.zeros(1, 3, 4, dtype=torch.bool))  # a graph cannot ask
