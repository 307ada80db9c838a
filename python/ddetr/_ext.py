"""Loads the native extension ``ddetr._C`` once; everything else asks here."""

from __future__ import annotations

import functools
import logging
import warnings

logger = logging.getLogger(__name__)

try:
    from ddetr import _C  # noqa: F401  (re-exported)

    IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # a source checkout without a build, or a broken install
    _C = None
    IMPORT_ERROR = exc

_warned = False


def available() -> bool:
    """True when the native extension imported."""
    return _C is not None


def cuda_built() -> bool:
    """True when the extension imported and has its CUDA kernels compiled in."""
    return _C is not None and _cuda_compiled(_C)


@functools.cache
def _cuda_compiled(ext) -> bool:
    # asked once per extension object: the build does not change while it is loaded
    return bool(ext.build_info()["cuda"])


def warn_fallback(what: str) -> None:
    """Warn once per process that `what` runs on the slow pure-PyTorch path."""
    global _warned
    if not _warned:
        warnings.warn(
            f"ddetr's native extension is not available ({IMPORT_ERROR}); {what} falls back "
            "to the pure-PyTorch reference, which is much slower. Reinstall with "
            "`pip install .` to build it.",
            RuntimeWarning,
            stacklevel=3,
        )
        _warned = True
