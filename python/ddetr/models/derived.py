"""Tensors derived from a module's parameters (a convolution weight with its batch norm
folded in, two matrices joined for one GEMM), kept between inference calls.

Derived once per change, not once per call: without autograd the result is held until
one of its sources is replaced or changed in place (its version counter moves), which
covers an optimiser step, ``load_state_dict`` and ``model.to(...)``. With autograd, or
while torch.compile / torch.export trace, it is computed on every call as before. The
cache lives beside the modules, not in them: a copied or pickled model carries none.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn

# module -> {key: (weak references to the sources, their versions, the result)}
_HELD: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def derived(owner: nn.Module, key: str, sources: tuple[Tensor, ...], make: Callable):
    """``make(*sources)``, reused for ``owner`` and ``key`` while the sources are the same
    tensors at the same versions and no gradient has to flow through it."""
    if (torch.is_grad_enabled() and any(t.requires_grad for t in sources)) or \
            torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return make(*sources)
    held = _HELD.setdefault(owner, {})
    versions = tuple(t._version for t in sources)
    entry = held.get(key)
    # a weak reference that still resolves to the source is that very tensor (its id
    # cannot have been reused by a new one)
    if entry is not None and entry[1] == versions and \
            all(ref() is t for ref, t in zip(entry[0], sources)):
        return entry[2]
    result = make(*sources)
    held[key] = (tuple(weakref.ref(t) for t in sources), versions, result)
    return result
