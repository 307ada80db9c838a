"""What every native call needs besides its tensors: the dtype's name, the device
(kind, index, torch's current stream) and the CPU thread count."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}


class Device(NamedTuple):
    kind: str     # "cpu" or "cuda"
    index: int    # CUDA device index, -1 on the CPU
    stream: int   # torch's current CUDA stream on that device, 0 on the CPU
    threads: int  # CPU threads the kernels use (torch's setting)


def device_of(t: Tensor) -> Device:
    if t.is_cuda:
        return Device("cuda", t.device.index, torch.cuda.current_stream(t.device).cuda_stream,
                      torch.get_num_threads())
    return Device("cpu", -1, 0, torch.get_num_threads())


def ptr(t: Tensor | None) -> int:
    """The address of t's data, 0 for None."""
    return 0 if t is None else t.data_ptr()


def ptrs(tensors) -> list[int]:
    return [ptr(t) for t in tensors]
