"""GEMMs on the CPU (cpp/blas.cpp, cpp/gemm_bf16*.cpp): float32 / float64 through
OpenBLAS from the scipy-openblas32 wheel, loaded into the extension at run time, and
bfloat16 through ddetr's own kernels."""

from __future__ import annotations

import glob
import logging
import os

import torch
from torch import Tensor

from ddetr._native import loader
from ddetr._native.loader import _C
from ddetr._native.common import DTYPE_NAMES, ptr

logger = logging.getLogger(__name__)

_blas_state: bool | None = None  # None: not tried yet


def blas_available() -> bool:
    """True once OpenBLAS from scipy-openblas32 is loaded into the extension."""
    global _blas_state
    if _blas_state is None:
        _blas_state = _load_blas()
    return _blas_state


def blas_core() -> str:
    """OpenBLAS's name for the kernels it runs ("SkylakeX", "Haswell", ...), or "" when
    OpenBLAS is not available."""
    return _C.blas_core() if blas_available() else ""


def _load_blas() -> bool:
    if not loader.available():
        return False
    if _C.blas_loaded():
        return True
    try:
        import scipy_openblas32
    except ImportError:
        logger.info("scipy-openblas32 is not installed: linear layers use torch's matmul")
        return False
    libs = sorted(glob.glob(os.path.join(scipy_openblas32.get_lib_dir(),
                                         f"lib{scipy_openblas32.get_library()}.*")))
    return load_first(_C.load_blas, libs, "linear layers use torch's matmul")


def load_first(load, paths, fallback: str) -> bool:
    """Calls ``load(path)`` on each path until one does not raise RuntimeError; logs each
    failure with what happens instead (``fallback``). False when none loads."""
    for path in paths:
        try:
            load(path)
            return True
        except RuntimeError as exc:
            logger.info("could not load %s (%s): %s", path, exc, fallback)
    return False


def gemm(a: Tensor, b: Tensor, trans_a: bool, trans_b: bool, out: Tensor,
         bias: Tensor | None = None, relu: bool = False, threads: int = 0) -> None:
    """out (M, N) = act(op(a) op(b) + bias) for contiguous float32 / float64 tensors of one
    dtype; ``threads`` 0: torch's setting."""
    m, n = out.shape
    k = a.shape[0] if trans_a else a.shape[1]
    _C.gemm(DTYPE_NAMES[a.dtype], trans_a, trans_b, m, n, k, a.data_ptr(), a.shape[1],
            b.data_ptr(), b.shape[1], 0.0, out.data_ptr(), n, ptr(bias), relu,
            threads or torch.get_num_threads())
