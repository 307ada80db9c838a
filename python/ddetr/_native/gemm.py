"""GEMMs on the CPU (cpp/blas.cpp, cpp/gemm_bf16*.cpp, cpp/gemm_int8.cpp) through one
``_C.GemmCall`` each: float32 / float64 through OpenBLAS from the scipy-openblas32 wheel,
loaded into the extension at run time, and bfloat16 through ddetr's own kernels
(``gemm_sizes``, with a ``Workspace``; the native layers call them inside the
extension). The int8 GEMM: ``pack_int8`` packs int8 weights once (``PackedInt8``),
``gemm_int8`` runs on float32 (or int8) activations, ``quantize_rows_int8`` quantises
rows alone."""

from __future__ import annotations

import glob
import logging
import os

import torch
from torch import Tensor

from ddetr._native import loader
from ddetr._native.common import DTYPE_NAMES, ptr
from ddetr._native.loader import _C

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
    _C.gemm(_C.GemmCall(dtype=DTYPE_NAMES[a.dtype], trans_a=trans_a, trans_b=trans_b, M=m, N=n,
                        K=k, A=ptr(a), lda=a.shape[1], B=ptr(b), ldb=b.shape[1], beta=0.0,
                        C=ptr(out), ldc=n, bias=ptr(bias), relu=relu,
                        threads=threads or torch.get_num_threads()))


def workspace_bytes(dtype: torch.dtype) -> int:
    """Scratch bytes a GEMM of ``dtype`` operands needs (bfloat16: a few MB, else 0)."""
    return _C.gemm_workspace_bytes(DTYPE_NAMES[dtype])


class Workspace:
    """A 64-byte aligned scratch buffer of ``nbytes`` for ``gemm_sizes`` (default: what a
    bfloat16 GEMM needs)."""

    def __init__(self, nbytes: int | None = None):
        self.nbytes = workspace_bytes(torch.bfloat16) if nbytes is None else nbytes
        self._buffer = torch.empty(self.nbytes + 64, dtype=torch.uint8)
        self.address = (self._buffer.data_ptr() + 63) // 64 * 64


def gemm_sizes(a: Tensor | None, b: Tensor | None, c: Tensor, *, m: int, n: int, k: int,
               lda: int, ldb: int, ldc: int, trans_a: bool = False, trans_b: bool = False,
               beta: float = 0.0, bias: Tensor | None = None, relu: bool = False,
               threads: int = 0, dtype: torch.dtype | None = None,
               c_dtype: torch.dtype | None = None, kernel: str = "auto",
               workspace: Workspace | None = None) -> None:
    """C[:m, :n] = act(op(A) op(B) + beta C + bias) in place, with every size and leading
    dimension given (not read from the tensors, which may be larger, or None for an
    empty operand): for the GEMM's own tests and benchmarks, which reach its edge cases
    and argument checks this way.

    ``dtype`` is that of A, B and bias (default a's), ``c_dtype`` that of C (default c's);
    bfloat16 operands take ``kernel`` "auto", "amx", "amx_emulated" (the AMX kernel's
    packing, blocking and epilogue with its tile instructions done in C++: slow, for
    tests on CPUs without AMX), "avx512" or "widen" and a ``workspace``
    (None: a null pointer, which the extension refuses). ``threads`` 0: torch's setting.
    """
    dtype = a.dtype if dtype is None else dtype
    c_dtype = c.dtype if c_dtype is None else c_dtype
    _C.gemm(_C.GemmCall(dtype=DTYPE_NAMES[dtype], c_dtype=DTYPE_NAMES[c_dtype], kernel=kernel,
                        trans_a=trans_a, trans_b=trans_b, M=m, N=n, K=k, A=ptr(a), lda=lda,
                        B=ptr(b), ldb=ldb, beta=beta, C=ptr(c), ldc=ldc, bias=ptr(bias),
                        relu=relu, threads=threads or torch.get_num_threads(),
                        workspace=0 if workspace is None else workspace.address,
                        workspace_bytes=0 if workspace is None else workspace.nbytes))


def bf16_kernel() -> str:
    """The bfloat16 kernel "auto" runs: "amx", "avx512" or "widen" (the first this CPU
    runs), or the one the environment variable DDETR_BF16_GEMM names (those three or
    "amx_emulated"; ValueError for another value there)."""
    return _C.gemm_bf16_kernel()


def bf16_avx512_supported() -> bool:
    """Whether this CPU runs the AVX512-BF16 kernel (and so the "amx_emulated" one)."""
    return bool(_C.gemm_bf16_avx512_supported())


def bf16_kernel_agrees(kernel: str) -> bool:
    """Whether bfloat16 ``kernel`` gives the AVX512-BF16 kernel's result (within float
    rounding) on the small GEMM that "auto" checks AMX with before choosing it (needs
    AVX512-BF16: RuntimeError otherwise)."""
    return bool(_C.gemm_bf16_agrees(kernel))


def int8_kernel_agrees(kernel: str) -> bool:
    """Whether int8 ``kernel`` gives the scalar kernel's bits on the small GEMM that "auto"
    checks AMX with before choosing it."""
    return bool(_C.gemm_int8_agrees(kernel))


def bf16_amx_supported() -> bool:
    """Whether this CPU has AMX-BF16 tiles (and AVX512-BF16) and the operating system lets
    this process use them: the "amx" kernel runs."""
    return bool(_C.gemm_bf16_amx_supported())


# "amx_emulated": the amx kernel with its tile instructions done in C++ (slow; tests its
# layout on CPUs with AVX512-VNNI but no AMX); "auto" never picks it
INT8_KERNELS = ("auto", "scalar", "avx2", "avx512_vnni", "amx", "amx_emulated")


class PackedInt8:
    """Int8 weights (N, K) packed for one int8 kernel (``kernel``, never "auto"): a uint8
    buffer starting with a header the extension checks on every GEMM."""

    def __init__(self, buffer: Tensor, n: int, k: int, kernel: str):
        self.buffer, self.n, self.k, self.kernel = buffer, n, k, kernel


def int8_kernel() -> str:
    """The int8 kernel "auto" runs on this CPU: "amx", "avx512_vnni", "avx2" or "scalar"."""
    return _C.gemm_int8_kernel()


def int8_kernel_supported(kernel: str) -> bool:
    """Whether this CPU runs int8 ``kernel`` (one of INT8_KERNELS)."""
    return bool(_C.gemm_int8_kernel_supported(kernel))


def pack_int8(weight: Tensor, kernel: str = "auto", threads: int = 0) -> PackedInt8:
    """``weight`` (N, K) int8, contiguous, on the CPU, packed for ``kernel``."""
    n, k = weight.shape
    nbytes = _C.gemm_int8_packed_bytes(kernel, n, k)
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    _C.gemm_int8_pack(_C.Int8PackCall(kernel=kernel, N=n, K=k, W=ptr(weight), ldw=k,
                                      packed=ptr(buffer), packed_bytes=nbytes,
                                      threads=threads or torch.get_num_threads()))
    return PackedInt8(buffer, n, k, _C.gemm_int8_packed_kernel(ptr(buffer), nbytes))


def gemm_int8(a: Tensor, packed: PackedInt8, w_scale: Tensor, out: Tensor,
              bias: Tensor | None = None, relu: bool = False, a_scale: Tensor | None = None,
              threads: int = 0) -> None:
    """out (M, N) float32 = act(int32(a_q w_q^T) a_scale w_scale + bias): ``a`` (M, K)
    float32 (quantised per row inside) or int8 with its (M,) float32 ``a_scale``; every
    tensor contiguous on the CPU (checked by the caller, re-checked by the extension)."""
    m, k = a.shape
    _C.gemm_int8(_C.Int8GemmCall(
        a_dtype="int8" if a.dtype == torch.int8 else DTYPE_NAMES.get(a.dtype, str(a.dtype)),
        M=m, N=packed.n, K=k, A=ptr(a), lda=k, a_scale=ptr(a_scale), packed=ptr(packed.buffer),
        packed_bytes=packed.buffer.numel(), w_scale=ptr(w_scale), bias=ptr(bias), relu=relu,
        C=ptr(out), ldc=out.shape[1], threads=threads or torch.get_num_threads()))


def quantize_rows_int8(x: Tensor, q: Tensor, scale: Tensor, threads: int = 0) -> None:
    """q (R, C) int8 and scale (R,) float32 from x (R, C) float32, all contiguous:
    scale = max |x| / 127 per row, q = round-to-nearest-even(clamp(x / scale, +-127))."""
    rows, cols = x.shape
    _C.quantize_rows_int8(_C.Int8QuantizeCall(rows=rows, cols=cols, x=ptr(x), ldx=cols,
                                              q=ptr(q), ldq=cols, scale=ptr(scale),
                                              threads=threads or torch.get_num_threads()))
