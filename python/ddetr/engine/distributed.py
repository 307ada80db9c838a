"""Process groups for ``torchrun``: initialisation from its environment variables
(gloo on the CPU, nccl on CUDA), rank queries, and gathering Python objects."""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def init_from_env(device: str) -> bool:
    """Joins the process group described by ``torchrun``'s ``RANK``/``WORLD_SIZE``/
    ``LOCAL_RANK``/``MASTER_*`` variables; returns False (single process) without them.
    On CUDA each process takes the GPU of its local rank."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if dist.is_initialized():
        return True
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    logger.info("process %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def local_device(device: str) -> torch.device:
    """``cuda`` becomes this process's GPU (``cuda:<LOCAL_RANK>``) under torchrun."""
    if device == "cuda" and is_distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(device)


def all_gather_objects(obj) -> list:
    """Every process's ``obj`` in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj, src: int = 0):
    """``obj`` from process ``src`` on every process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def mean_over_processes(values: dict[str, float], device) -> dict[str, float]:
    """Averages a dict of floats across processes (same keys on every process)."""
    if not is_distributed() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= world_size()
    return dict(zip(keys, t.tolist()))


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copies every buffer (batch-norm statistics) of process ``src`` to all processes:
    DDP syncs them at the start of each forward, so after the last step they differ."""
    if not is_distributed():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=src)


def pick_device(name: str) -> torch.device:
    """The device a ``--device`` name means: "auto" is CUDA when available; under torchrun
    "cuda" is this process's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but CUDA is not available")
    return local_device(name)
