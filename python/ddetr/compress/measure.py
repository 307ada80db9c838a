"""What the search measures of a candidate: COCO AP on the validation images
(pycocotools, as ``ddetr eval``), batch-1 inference latency and peak memory."""

from __future__ import annotations

import gc
import resource
import statistics
import time

import torch

from ddetr.engine.evaluate import STAT_NAMES, evaluate


def accuracy(model, dataset, device, batch_size: int = 2) -> dict:
    """AP, AP50 and AP_small of ``model`` on ``dataset`` (a ``CocoDetection``)."""
    stats = evaluate(model, dataset, device, batch_size=batch_size, progress=False)["stats"]
    return {name: stats[STAT_NAMES.index(name)] for name in ("AP", "AP50", "AP_small")}


@torch.no_grad()
def latency(model, images: list, device, warmup: int = 2, repeats: int = 1) -> dict:
    """Median batch-1 inference time (ms) over ``images`` (each a (3, H, W) tensor) after
    ``warmup`` calls, and the peak memory of the run (CUDA: the allocator's peak; CPU:
    the process's peak resident size, which only grows)."""
    model.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for image in images[:warmup]:
        model(image[None].to(device))
    times = []
    for _ in range(repeats):
        for image in images:
            x = image[None].to(device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    gc.collect()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"latency_ms": 1000 * statistics.median(times), "peak_mem_mb": peak}
