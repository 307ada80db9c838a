"""Loads the native extension ``ddetr._C`` once; everything else asks here (through
``ddetr._native``, which re-exports what callers need): whether it imported, whether its
CUDA kernels can run here, how it was built, where it is, and, for tests of the native
re-checks, its structs and entry points by name."""

from __future__ import annotations

import functools
import logging
import threading
import warnings

logger = logging.getLogger(__name__)

try:
    from ddetr import _C  # noqa: F401  (re-exported)

    IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # a source checkout without a build, or a broken install
    _C = None
    IMPORT_ERROR = exc

_warned = False
# cuda_usable()'s answer once decided (None before), under its lock so it warns once.
_cuda_state: bool | None = None
_cuda_lock = threading.Lock()


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


def build_info() -> dict:
    """How the extension was built (``_C.build_info()``: version, cuda, cuda_archs,
    cuda_version, openmp, openmp_max_threads, cpu_arch_flags, max_levels); {} when it is
    missing."""
    return {} if _C is None else dict(_C.build_info())


def extension_path() -> str | None:
    """The file the extension was loaded from, or None when it is missing."""
    return getattr(_C, "__file__", None)


def struct(name: str, **fields):
    """The extension's struct ``name`` (``MsdaCall``, ``Device``, ``Level``, ...) with these
    fields set by name. For tests that hand an entry point a struct the Python side would
    never build; everything else builds its structs in its own ``_native`` module."""
    return getattr(_C, name)(**fields)


def call_entry(name: str, call):
    """Calls the extension's entry point ``name`` (``msda_forward``, ``flatten_backward``,
    ...) on ``call`` as given, with no Python check in between: how tests reach the native
    re-checks of sizes and pointers."""
    return getattr(_C, name)(call)


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


def cuda_runtime_status() -> dict | None:
    """What ddetr's own CUDA runtime says about this machine, or None for an extension
    built before it could say.

    Keys: ``built`` (CUDA kernels compiled in), ``driver_version`` and
    ``runtime_version`` (1000 * major + 10 * minor: the CUDA version the NVIDIA driver
    supports, 0 without a driver, and that of the toolkit ddetr was built with),
    ``device_count``, ``error`` (the name of cudaGetDeviceCount's result, e.g.
    ``"cudaSuccess"`` or ``"cudaErrorInsufficientDriver"``), ``insufficient_driver`` and
    ``usable`` (the runtime can run and sees a GPU). Never raises.
    """
    query = getattr(_C, "cuda_runtime_status", None)
    return None if query is None else query()


def cuda_usable() -> bool:
    """True when CUDA tensors may run ddetr's CUDA kernels: they are compiled in, torch
    sees a GPU, and the CUDA runtime ddetr was built with runs on this machine's driver.

    Decided once per process, on the first call (not at import: asking the runtime
    initialises the CUDA driver, which a process that never uses a GPU, or that forks
    workers first, must not pay for). When the kernels are built but cannot run (a
    driver older than ddetr's toolkit: torch, with its own runtime, still works), it
    warns once, naming both versions, and returns False: the ops then run CUDA tensors
    on the pure-PyTorch reference.
    """
    global _cuda_state
    if _cuda_state is None:
        with _cuda_lock:
            if _cuda_state is None:
                _cuda_state = _decide_cuda()
    return _cuda_state


def _decide_cuda() -> bool:
    if not cuda_built():
        return False
    import torch  # (the package needs torch anyway; kept out of this module's import)

    if not torch.cuda.is_available():
        return False  # no GPU for torch either: no CUDA tensor will come
    status = cuda_runtime_status()
    if status is None or status["usable"]:
        return True  # (an extension too old to ask runs as before)
    warnings.warn(_runtime_message(status), RuntimeWarning, stacklevel=4)
    return False


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}" if v > 0 else "none (no NVIDIA driver found)"


def _runtime_message(status: dict) -> str:
    runtime, driver = (_cuda_version(status[k]) for k in ("runtime_version", "driver_version"))
    fallback = ("CUDA tensors run ddetr's pure-PyTorch reference instead, which is much "
                "slower.")
    if status["insufficient_driver"]:
        return (
            f"ddetr's CUDA kernels cannot run on this machine: ddetr was built with the CUDA "
            f"{runtime} toolkit, but the NVIDIA driver supports CUDA {driver} "
            f"({status['error']}). The driver must support at least the CUDA version of the "
            f"toolkit ddetr was built with: update the NVIDIA driver, or rebuild ddetr with "
            f"a CUDA toolkit no newer than the driver (nvcc on PATH, `pip install .`). "
            + fallback)
    return (
        f"ddetr's CUDA kernels cannot use the GPU torch sees: ddetr's CUDA {runtime} runtime "
        f"reports {status['error']} with {status['device_count']} devices (driver supports "
        f"CUDA {driver}). " + fallback)


def runs_natively(t, what: str) -> bool:
    """Whether `what` on tensor `t` takes the native kernels: False (after one warning)
    when the extension is missing, or for a CUDA tensor when CUDA cannot run here (see
    ``cuda_usable``, which warns itself); the caller then takes the reference path."""
    if not available():
        warn_fallback(what)
        return False
    return not t.is_cuda or cuda_usable()
