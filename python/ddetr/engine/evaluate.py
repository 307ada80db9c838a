"""COCO evaluation of a detector on a ``CocoDetection`` dataset (pycocotools
``COCOeval``, bbox): detections of every process are gathered on the first, scored
there, and the 12 numbers shared with all processes."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math

import numpy as np
import torch
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from ddetr.engine import amp as amp_mode
from ddetr.data.coco import CocoDetection
from ddetr.data.transforms import val_transforms
from ddetr.engine import builders, distributed

logger = logging.getLogger(__name__)

STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
              "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")


def to_coco_results(detections: list[dict], image_ids) -> list[dict]:
    """Post-processed outputs (boxes_xyxy in original pixels) -> COCO result records
    ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``."""
    records = []
    for det, image_id in zip(detections, image_ids):
        boxes_xyxy = det["boxes"].float().cpu()
        xywh = torch.cat([boxes_xyxy[:, :2], boxes_xyxy[:, 2:] - boxes_xyxy[:, :2]], 1)
        for box, label, score in zip(xywh.tolist(), det["labels"].tolist(), det["scores"].tolist()):
            records.append({"image_id": int(image_id), "category_id": int(label),
                            "bbox": box, "score": float(score)})
    return records


@torch.no_grad()
def predict_dataset(model, loader, device, amp: str = "off",
                    progress: bool = True) -> tuple[list[dict], set[int]]:
    """COCO result records for every image ``loader`` yields, and the ids of the images
    scored."""
    model.eval()
    postprocess = builders.build_postprocess(model)
    records, seen = [], set()
    bar = tqdm(loader, desc="eval", disable=not (progress and distributed.is_main()), leave=False)
    for images, mask, targets in bar:
        with amp_mode.autocast(amp, device):
            outputs = model(images.to(device), mask.to(device))
        outputs = {k: outputs[k].float() for k in ("pred_logits", "pred_boxes")}
        sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        detections = postprocess(outputs, sizes)
        # an undecodable image is replaced by the next one: score each image once
        fresh = [(d, int(t["image_id"])) for d, t in zip(detections, targets)
                 if int(t["image_id"]) not in seen]
        seen.update(i for _, i in fresh)
        records += to_coco_results([d for d, _ in fresh], [i for _, i in fresh])
    return records, seen


def finite_records(records: list[dict]) -> list[dict]:
    """``records`` without those whose score or box is not finite (pycocotools would
    match a NaN box to anything), with a warning giving how many were dropped."""
    kept = [r for r in records
            if math.isfinite(r["score"]) and all(math.isfinite(v) for v in r["bbox"])]
    if len(kept) < len(records):
        logger.warning("dropped %d of %d detections with a non-finite score or box",
                       len(records) - len(kept), len(records))
    return kept


def coco_stats(coco_gt, records: list[dict], image_ids) -> tuple[list[float], str]:
    """``(12 COCOeval bbox numbers, the printed summary)`` for ``records`` on ``image_ids``;
    detections with a non-finite score or box are left out (``finite_records``)."""
    records = finite_records(records)
    if not records:
        return [0.0] * 12, "no detections"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # pycocotools reports by printing
        coco_dt = coco_gt.loadRes(copy.deepcopy(records))
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in np.asarray(evaluator.stats)], out.getvalue()


def evaluate(model, dataset, device, batch_size: int = 2, num_workers: int = 0,
             amp: str = "off", progress: bool = True) -> dict:
    """Evaluates ``model`` on every image of ``dataset`` (a ``CocoDetection``), sharded
    across processes. Returns ``{"stats": 12 floats (STAT_NAMES order), "summary": the
    COCOeval table, "bad_images": images skipped as undecodable, "non_finite_detections":
    detections left out for a non-finite score or box}``; images that could not be read
    are left out of the evaluation."""
    loader = builders.eval_loader(dataset, batch_size, num_workers, distributed.rank(),
                                  distributed.world_size())
    records, seen = predict_dataset(model, loader, device, amp, progress)
    gathered = distributed.all_gather_objects((records, sorted(seen)))
    result = None
    if distributed.is_main():
        all_records = [r for part, _ in gathered for r in part]
        kept = finite_records(all_records)
        image_ids = sorted({i for _, part in gathered for i in part})
        stats, summary = coco_stats(dataset.coco, kept, image_ids)
        result = {"stats": stats, "summary": summary,
                  "bad_images": len(dataset.ids) - len(image_ids),
                  "non_finite_detections": len(all_records) - len(kept)}
    return distributed.broadcast_object(result)


def evaluate_checkpoint(path: str, coco_path: str | None = None, val_images: str | None = None,
                        val_annotations: str | None = None, cache_dir: str | None = None,
                        batch_size: int = 2, num_workers: int = 0, device: str = "auto",
                        amp: str = "off", progress: bool = True,
                        trust_pickle: bool = False) -> dict:
    """``evaluate`` for a ``ddetr train`` checkpoint on a validation set: the given one
    (``val_images`` + ``val_annotations``, or ``coco_path``), or else the one the
    checkpoint was trained with (the synthetic data is regenerated if its cache is gone).
    ``trust_pickle``: see ``checkpoint.read_checkpoint``."""
    from ddetr.engine.predict import load_detector
    from ddetr.engine.distributed import pick_device
    dev = pick_device(device)
    detector = load_detector(path, dev, trust_pickle)
    dataset = validation_dataset(detector, path, coco_path, val_images, val_annotations,
                                 cache_dir)
    return evaluate(detector.model, dataset, dev, batch_size, num_workers,
                    amp_mode.resolve(amp, dev), progress)


def validation_dataset(detector, path: str, coco_path: str | None = None,
                       val_images: str | None = None, val_annotations: str | None = None,
                       cache_dir: str | None = None) -> CocoDetection:
    """The validation set for a loaded checkpoint (``predict.load_detector``): the given
    one, or else the one it was trained with, at the sizes it was trained at."""
    from ddetr.engine.config import TrainConfig
    if val_annotations:
        if not val_images:
            raise ValueError("val_images: required with val_annotations")
        paths = {"val_images": val_images, "val_annotations": val_annotations}
    elif coco_path:
        paths = builders.dataset_paths(TrainConfig(coco_path=coco_path))
    elif detector.train:
        trained = {**detector.train, **({"cache_dir": cache_dir} if cache_dir else {})}
        paths = builders.dataset_paths(TrainConfig(**trained))
    else:
        raise ValueError(f"checkpoint: {path} records no training dataset; pass --coco_path "
                         f"or --val_images and --val_annotations")
    if not paths.get("val_annotations"):
        raise ValueError("val_annotations: the checkpoint's training run had no validation set")
    return CocoDetection(paths["val_images"], paths["val_annotations"],
                         val_transforms(detector.base_size, detector.max_size),
                         detector.model.config["num_classes"])
