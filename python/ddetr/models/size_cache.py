"""``SizeCache``: tensors that depend on sizes alone (no parameter, no image), made once
per key instead of on every forward: the sine frequencies, and the position encodings and
two-stage proposals of images without padding. At batch 1 on small images these small
computations were a third of a forward's ops.

The tensors are made outside inference mode (a first call under ``torch.inference_mode``,
as ``ddetr predict``, must not leave tensors that a later training step cannot save for
its backward), only the last ``kept`` keys are kept, and a lock guards the cache, since a
model may run in several threads at once. Callers hand out copies or read-only uses of
them, never the cached tensor to be written.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch
from torch import Tensor


def tracing() -> bool:
    """Whether a graph is being traced (``torch.compile``, ``torch.export``,
    ``torch.jit.trace``): then nothing is cached, and the graph computes it."""
    return (torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or torch.jit.is_tracing())


def known_unpadded(mask: Tensor) -> bool:
    """Whether the (N, ...) bool padding mask ``mask`` is known to hold no padding: asked
    on the CPU only, where asking costs no device sync, and never while tracing (a traced
    graph cannot ask). False means "maybe padded"."""
    return not (tracing() or mask.is_cuda or bool(mask.any()))


class SizeCache:
    """An LRU of ``kept`` entries: ``get(key, make)`` returns the entry of ``key``, made
    by ``make()`` when it is not there."""

    def __init__(self, kept: int):
        self.kept = kept
        self._items: dict = {}
        self._lock = threading.Lock()

    def get(self, key, make: Callable):
        with self._lock:
            value = self._items.pop(key, None)
            if value is None:
                with torch.inference_mode(False):
                    value = make()
            self._items[key] = value  # (re)inserted last: the most recently used
            while len(self._items) > self.kept:
                del self._items[next(iter(self._items))]
            return value

    def keys(self) -> list:
        with self._lock:
            return list(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
