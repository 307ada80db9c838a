"""Whole encoder / decoder layers in one native call per pass (cpp/layers_cpu.cpp,
cuda/layers.cu; the math in cpp/include/ddetr/layers.h). GEMMs on OpenBLAS (CPU) or on
cuBLAS, loaded from where torch loaded it (CUDA)."""

from __future__ import annotations

import ctypes.util
import logging
import re
import threading
from dataclasses import dataclass

import torch
from torch import Tensor

from ddetr._native import loader
from ddetr._native.loader import _C
from ddetr._native.common import DTYPE_NAMES, device_of, ptr, ptrs
from ddetr._native.gemm import load_first

logger = logging.getLogger(__name__)

_cublas_state: bool | None = None
# CPU workspaces are kept between calls, one per thread (two threads may run layers at
# once): a fresh multi-MB buffer costs a page fault per 4 KB on first touch, which the
# layers would otherwise pay on every call. It holds the largest workspace a layer of
# the thread has needed (about 50 MB at 800x1333).
_cpu_workspace = threading.local()


@dataclass(frozen=True)
class LayerCall:
    """What one layer call hands the native side besides tensors."""
    decoder: bool
    batch: int            # N
    queries: int          # Lq (the tokens S for an encoder)
    d_model: int          # C
    dim_feedforward: int  # F
    ref_dim: int          # 2 (points) or 4 (boxes)
    tokens: int           # S, the value rows
    num_heads: int        # M
    num_levels: int       # L
    num_points: int       # P
    levels: tuple         # (H, W, start) per level
    training: bool        # keep what the backward needs
    recompute: bool       # the backward recomputes the FFN activations / attention probs
    dropout: float
    seed: int

    def _head(self, x: Tensor) -> tuple:
        dev = device_of(x)
        dims = (self.batch, self.queries, self.d_model, self.dim_feedforward, self.ref_dim)
        sizes = (self.batch, self.tokens, self.num_heads, self.d_model // self.num_heads,
                 self.queries, self.num_levels, self.num_points)
        options = (self.training, self.recompute, float(self.dropout), self.seed)
        return (DTYPE_NAMES[x.dtype], dev.kind, dev.index, self.decoder, dims, sizes,
                list(self.levels), options)


def cublas_available() -> bool:
    """True once cuBLAS is loaded into the extension (found where torch loaded it)."""
    global _cublas_state
    if _cublas_state is None:
        _cublas_state = _load_cublas()
    return _cublas_state


def _load_cublas() -> bool:
    if not loader.cuda_usable():
        return False
    if _C.cublas_loaded():
        return True
    torch.cuda.current_blas_handle()  # makes torch load its cuBLAS
    candidates = []
    try:
        with open("/proc/self/maps") as maps:
            found = re.finditer(r"/\S*libcublas\.so[.\d]*", maps.read())
            candidates = sorted({m.group(0) for m in found})
    except OSError:
        pass
    found = ctypes.util.find_library("cublas")
    if found:
        candidates.append(found)
    if load_first(_C.load_cublas, candidates, "native layers stay off on CUDA"):
        return True
    logger.info("cuBLAS not found: the native layers stay off on CUDA")
    return False


def saved_sizes(call: LayerCall, x: Tensor) -> list[int]:
    """Elements of each activation the backward keeps (0: not kept)."""
    return list(_C.layer_saved_sizes(*call._head(x)[3:]))


def _workspace(call: LayerCall, x: Tensor, backward: bool) -> tuple[Tensor, bool]:
    """The workspace of a pass (kept per thread on the CPU), and whether it runs the
    deterministic CUDA backward."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    nbytes = _C.layer_workspace_bytes(*call._head(x), backward, deterministic)
    if x.device.type != "cpu":
        return torch.empty(max(nbytes, 1), dtype=torch.uint8, device=x.device), deterministic
    ws = getattr(_cpu_workspace, "buffer", None)
    if ws is None or ws.numel() < nbytes:
        ws = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        _cpu_workspace.buffer = ws
    return ws, deterministic


def forward(call: LayerCall, inputs: list, params: list, saved: list) -> Tensor:
    """The layer's output; ``inputs`` (x, pos, ref, memory, mask as uint8), ``params`` in
    the native order, ``saved`` the activation buffers (None where not kept)."""
    x = inputs[0]
    out = torch.empty_like(x)
    ws, deterministic = _workspace(call, x, backward=False)
    dev = device_of(x)
    _C.layer_forward(*call._head(x), ptrs(params), ptrs(inputs), out.data_ptr(), ptrs(saved),
                     ws.data_ptr(), ws.numel(), deterministic, dev.threads, dev.stream)
    return out


def backward(call: LayerCall, inputs: list, params: list, saved: list, grad_out: Tensor,
             grad_inputs: list, grad_params: list) -> None:
    """Writes the gradients of (x, pos, ref, memory) and of the parameters (None: not
    wanted) from grad_out."""
    x = inputs[0]
    ws, deterministic = _workspace(call, x, backward=True)
    dev = device_of(x)
    _C.layer_backward(*call._head(x), ptrs(params), ptrs(inputs), ptrs(saved),
                      ptr(grad_out), ptrs(grad_inputs), ptrs(grad_params), ws.data_ptr(),
                      ws.numel(), deterministic, dev.threads, dev.stream)
