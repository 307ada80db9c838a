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


def _timed(model, image, device) -> float:
    x = image[None].to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    model(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def latency(model, images: list, device, warmup: int = 2, reference=None) -> dict:
    """Median batch-1 inference time (ms) over ``images`` (each a (3, H, W) tensor) after
    ``warmup`` calls, and the peak memory of the run (CUDA: the allocator's peak; CPU:
    the process's peak resident size, which only grows). With ``reference = (model,
    images)`` the two models alternate image by image, so the machine's drift hits both
    alike, and ``relative_latency`` is the ratio of their medians (< 1: faster)."""
    model.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for image in images[:warmup]:
        model(image[None].to(device))
    times, reference_times = [], []
    for i, image in enumerate(images):
        if reference is not None:
            reference_times.append(_timed(reference[0], reference[1][i], device))
        times.append(_timed(model, image, device))
    gc.collect()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row = {"latency_ms": 1000 * statistics.median(times), "peak_mem_mb": peak}
    if reference is not None:
        row["relative_latency"] = statistics.median(times) / statistics.median(reference_times)
    return row


@torch.no_grad()
def pyramid_share(model, images: list, device, warmup: int = 2) -> float:
    """The median batch-1 time of ``model.pyramid`` (backbone, input projections and
    position encodings) over that of the whole forward, the two taking turns image by
    image. No cut of the transformer alone can make the model more than 1 / this
    faster."""
    model.eval()
    dtype = next(model.parameters()).dtype

    def pyramid(x):  # (1, 3, H, W), as the forward takes it
        x = x.to(dtype)
        return model.pyramid(x, torch.zeros(x.shape[0], *x.shape[2:], dtype=torch.bool,
                                            device=x.device))

    for image in images[:warmup]:
        model(image[None].to(device))
        pyramid(image[None].to(device))
    whole, part = [], []
    for image in images:
        whole.append(_timed(model, image, device))
        part.append(_timed(pyramid, image, device))
    # (a part of the forward: above 1 only through the machine's noise)
    return min(1.0, statistics.median(part) / statistics.median(whole))
