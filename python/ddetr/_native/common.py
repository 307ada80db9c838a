"""What every native call needs besides its tensors: the dtype's name, the device (kind,
index, torch's current stream, the CPU thread count), the level table as ``_C.Level``
structs, and tensors' addresses."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ddetr._native.loader import _C

DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}


def device_of(t: Tensor):
    """``_C.Device`` of t: kind "cpu" or "cuda", the CUDA device index (-1 on the CPU),
    torch's current CUDA stream there (0 on the CPU), the CPU threads (torch's setting)."""
    if t.is_cuda:
        return _C.Device(kind="cuda", index=t.device.index,
                         stream=torch.cuda.current_stream(t.device).cuda_stream,
                         threads=torch.get_num_threads())
    return _C.Device(kind="cpu", index=-1, stream=0, threads=torch.get_num_threads())


@functools.lru_cache(maxsize=256)
def _levels(rows: tuple) -> tuple:
    return tuple(_C.Level(H=h, W=w, start=start) for h, w, start in rows)


def levels(rows) -> list:
    """The level table, (H, W, start) per level, as a list of ``_C.Level`` (built once per
    table: the extension copies them, so they are never changed)."""
    return list(_levels(tuple(map(tuple, rows))))


def ptr(t: Tensor | None) -> int:
    """The address of t's data, 0 for None."""
    return 0 if t is None else t.data_ptr()


def ptrs(tensors) -> list[int]:
    """The addresses of a list of tensors, in its order."""
    return [ptr(t) for t in tensors]


def pointers(tensors: dict) -> dict[str, int]:
    """The addresses of named tensors (None: 0), by the same names."""
    return {name: ptr(t) for name, t in tensors.items()}


def storage_id(t: Tensor) -> int:
    """An identity of the storage behind t (its address): views of one buffer share it,
    e.g. to count the distinct buffers autograd saves."""
    return t.untyped_storage().data_ptr()
