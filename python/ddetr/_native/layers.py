"""Whole encoder / decoder layers in one native call per pass (cpp/layers_cpu.cpp,
cuda/layers.cu; the math in cpp/include/ddetr/layers.h) through one ``_C.LayerCall``:
sizes and options by name, the parameters (``PARAM_NAMES``), inputs, saved activations
and gradients as structs with one named pointer each, and one ``_C.layer_plan`` per pass
for the saved activations' sizes and the workspace. GEMMs on OpenBLAS (CPU) or on cuBLAS,
loaded from where torch loaded it (CUDA)."""

from __future__ import annotations

import ctypes.util
import logging
import re
import threading
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ddetr._native import loader
from ddetr._native.common import DTYPE_NAMES, device_of, levels as level_structs, pointers, ptr
from ddetr._native.gemm import load_first
from ddetr._native.loader import _C

logger = logging.getLogger(__name__)

_cublas_state: bool | None = None
# CPU workspaces are kept between calls, one per thread (two threads may run layers at
# once): a fresh multi-MB buffer costs a page fault per 4 KB on first touch, which the
# layers would otherwise pay on every call. It holds the largest workspace a layer of
# the thread has needed (about 50 MB at 800x1333).
_cpu_workspace = threading.local()

# The parameters by the names of _C.LayerParams (those of the checkpoint): the decoder's
# dense self-attention and its norm (the checkpoint's norm2) first, which an encoder
# leaves out; norm1 follows the deformable attention in both layers; ffn_norm is the
# encoder's norm2 and the decoder's norm3; the offsets and attention-weight projections
# are stacked into one (3 M L P, C) weight.
PARAM_NAMES = (
    "self_attn_in_proj_weight", "self_attn_in_proj_bias", "self_attn_out_proj_weight",
    "self_attn_out_proj_bias", "self_attn_norm_weight", "self_attn_norm_bias",
    "value_proj_weight", "value_proj_bias", "sampling_offsets_attention_weights_weight",
    "sampling_offsets_attention_weights_bias", "output_proj_weight", "output_proj_bias",
    "norm1_weight", "norm1_bias", "linear1_weight", "linear1_bias", "linear2_weight",
    "linear2_bias", "ffn_norm_weight", "ffn_norm_bias")
# The inputs by the names of _C.LayerInputs (mask: uint8, nonzero on padding; sa_bias: the
# decoder's (Lq, Lq) self-attention score bias); their gradients by those of
# _C.LayerInputGrads (all but the mask and the bias).
INPUT_NAMES = ("x", "pos", "reference_points", "memory", "mask", "sa_bias")


@dataclass(frozen=True)
class LayerCall:
    """The sizes and options of one layer call."""
    decoder: bool
    batch: int            # N
    queries: int          # Lq (an encoder's updated tokens: S without memory)
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

    def native(self, x: Tensor):
        """This call as a ``_C.LayerCall`` on x's dtype and device (no tensors yet), for
        the CUDA backward torch's current determinism setting."""
        return _C.LayerCall(
            dtype=DTYPE_NAMES[x.dtype], device=device_of(x), decoder=self.decoder,
            N=self.batch, Lq=self.queries, C=self.d_model, F=self.dim_feedforward,
            ref_dim=self.ref_dim, S=self.tokens, M=self.num_heads,
            D=self.d_model // self.num_heads, L=self.num_levels, P=self.num_points,
            levels=level_structs(self.levels), training=self.training,
            recompute=self.recompute, dropout=float(self.dropout), seed=self.seed,
            deterministic=torch.are_deterministic_algorithms_enabled())


class LayerPlan(NamedTuple):
    """What a layer call needs allocated (``_C.layer_plan``)."""
    saved_sizes: dict[str, int]   # elements of each saved activation, by _C.LayerSaved's names
    forward_workspace_bytes: int
    backward_workspace_bytes: int


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


def _plan(native) -> LayerPlan:
    planned = _C.layer_plan(native)
    sizes = planned.saved_sizes
    return LayerPlan({name: getattr(sizes, name) for name in type(sizes).fields},
                     planned.forward_workspace_bytes, planned.backward_workspace_bytes)


def plan(call: LayerCall, x: Tensor) -> LayerPlan:
    """The saved activations' sizes (0: not kept) and both passes' workspace bytes of
    ``call`` on x's dtype and device."""
    return _plan(call.native(x))


def _workspace(x: Tensor, nbytes: int) -> Tensor:
    """A workspace of at least nbytes on x's device (kept per thread on the CPU)."""
    if x.device.type != "cpu":
        return torch.empty(max(nbytes, 1), dtype=torch.uint8, device=x.device)
    ws = getattr(_cpu_workspace, "buffer", None)
    if ws is None or ws.numel() < nbytes:
        ws = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        _cpu_workspace.buffer = ws
    return ws


def forward(call: LayerCall, inputs: dict, params: dict) -> tuple[Tensor, dict]:
    """The layer's output, and (training) the activations its backward reads, by name.
    ``inputs`` by ``INPUT_NAMES``, ``params`` by ``PARAM_NAMES`` (None or absent: none)."""
    x = inputs["x"]
    native = call.native(x)
    planned = _plan(native)
    saved = {name: torch.empty(n, dtype=x.dtype, device=x.device)
             for name, n in planned.saved_sizes.items() if call.training and n}
    out = torch.empty_like(x)
    ws = _workspace(x, planned.forward_workspace_bytes)
    native.params = _C.LayerParams(**pointers(params))
    native.inputs = _C.LayerInputs(**pointers(inputs))
    native.saved = _C.LayerSaved(**pointers(saved))
    native.output = ptr(out)
    native.workspace, native.workspace_bytes = ptr(ws), ws.numel()
    _C.layer_forward(native)
    return out, saved


def backward(call: LayerCall, inputs: dict, params: dict, saved: dict, grad_out: Tensor,
             grad_inputs: dict, grad_params: dict) -> None:
    """Writes the gradients of the inputs (``grad_inputs``: x, pos, reference_points,
    memory) and of the parameters (``grad_params`` by ``PARAM_NAMES``; None: not wanted)
    from grad_out, with the activations ``forward`` saved."""
    x = inputs["x"]
    native = call.native(x)
    ws = _workspace(x, _plan(native).backward_workspace_bytes)
    native.params = _C.LayerParams(**pointers(params))
    native.grad_params = _C.LayerParams(**pointers(grad_params))
    native.inputs = _C.LayerInputs(**pointers(inputs))
    native.grad_inputs = _C.LayerInputGrads(**pointers(grad_inputs))
    native.saved = _C.LayerSaved(**pointers(saved))
    native.grad_output = ptr(grad_out)
    native.workspace, native.workspace_bytes = ptr(ws), ws.numel()
    _C.layer_backward(native)
