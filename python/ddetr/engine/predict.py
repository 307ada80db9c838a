"""Inference on image files: load a trained detector, detect, and draw the results
(optionally with the decoder's sampling points)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from PIL import Image

from ddetr.data.coco import UNREADABLE_IMAGE_ERRORS
from ddetr.data.transforms import val_transforms
from ddetr.engine import checkpoint as ckpt
from ddetr.engine.draw import draw_detections, draw_sampling_points
from ddetr.engine.sampling_points import SamplingPointRecorder
from ddetr.models import DeformableDetr, Detr, weights
from ddetr.models.box_ops import box_cxcywh_to_xyxy
from ddetr.models.postprocess import classification_of, query_scores


@dataclass
class Detector:
    model: DeformableDetr | Detr
    names: dict          # category id -> name
    base_size: int
    max_size: int
    train: dict          # the TrainConfig fields it was trained with ({} if unknown)


def load_detector(path: str, device="cpu", trust_pickle: bool = False) -> Detector:
    """A ``ddetr train`` checkpoint file, or a ``save_pretrained`` directory (then the
    official 800/1333 sizes and numeric class names). ``trust_pickle``: see
    ``checkpoint.read_checkpoint``."""
    if os.path.isdir(path):
        model = DeformableDetr.from_pretrained(path)
        return Detector(model.to(device).eval(), {}, 800, 1333, {})
    state = ckpt.read_checkpoint(path, trust_pickle)
    config = state.get("config") or {}
    if "model" not in config:
        raise ValueError(f"checkpoint: {path} has no model config (not written by ddetr train)")
    if config.get("train", {}).get("arch") == "detr":
        model = Detr(**config["model"])
    else:
        model = DeformableDetr(**config["model"])
        model.restore_compression(config.get("compression", []))  # (ddetr compress)
    weights.load_weights(model, ckpt.inference_weights(state), source="checkpoint",
                         unexpected_ok=True)
    train = config.get("train", {})
    names = {c["id"]: c["name"] for c in config.get("categories", [])}
    return Detector(model.to(device).eval(), names, train.get("base_size", 800),
                    train.get("max_size", 1333), dict(train))


def require_deformable(detector: Detector, path: str, command: str) -> None:
    """ValueError naming ``path`` when its model is not a ``DeformableDetr`` (the DETR
    baseline trains, evaluates and predicts, but ``command`` is Deformable DETR's only)."""
    if not isinstance(detector.model, DeformableDetr):
        raise ValueError(f"checkpoint: {path} holds a {type(detector.model).__name__}; "
                         f"{command} takes Deformable DETR models only")


def read_image(path: str) -> Image.Image:
    """The image as RGB; ``ValueError`` naming ``path`` if it cannot be decoded
    (including a decompression bomb)."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except UNREADABLE_IMAGE_ERRORS as e:
        raise ValueError(f"image: {path} cannot be read: {e}") from None


def empty_target(image: Image.Image) -> dict:
    size = torch.tensor([image.height, image.width])
    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
            "area": torch.zeros(0), "iscrowd": torch.zeros(0, dtype=torch.int64), "size": size}


@torch.no_grad()
def detect(detector: Detector, image: Image.Image, threshold: float = 0.5,
           record_sampling: bool = False) -> dict:
    """Detections on one image, one per query scoring at least ``threshold`` (its best
    class), best first: ``scores``, ``labels``, ``boxes`` (boxes_xyxy in the image's
    pixels) and ``queries`` (each detection's query). With ``record_sampling``, also
    ``sampling``: the last decoder layer's ``locations`` (Lq, M, L, P, 2) normalised to
    the image and ``weights`` (Lq, M, L, P)."""
    model = detector.model
    classification = classification_of(model)
    if record_sampling and classification == "softmax":
        raise ValueError("record_sampling: DETR has no sampling points (dense attention)")
    device = next(model.parameters()).device
    tensor, _ = val_transforms(detector.base_size, detector.max_size)(image, empty_target(image))
    recorder = SamplingPointRecorder(model) if record_sampling else None
    with recorder if recorder is not None else contextlib.nullcontext():
        outputs = model(tensor[None].to(device))
    scores, labels = query_scores(outputs["pred_logits"][0].float(), classification)
    keep = torch.nonzero(scores >= threshold).flatten()
    keep = keep[scores[keep].argsort(descending=True)]
    scale = torch.tensor([image.width, image.height] * 2, dtype=torch.float32)
    boxes_xyxy = box_cxcywh_to_xyxy(outputs["pred_boxes"][0, keep].float().cpu()) * scale
    result = {"scores": scores[keep].cpu(), "labels": labels[keep].cpu(),
              "boxes": boxes_xyxy, "queries": keep.cpu()}
    if record_sampling:
        result["sampling"] = {k: v[0].cpu() for k, v in recorder.records[-1].items()}
    return result


def save_drawings(detector: Detector, image: Image.Image, result: dict, out_path: str,
                  top_queries: int = 3) -> list[str]:
    """Writes ``out_path`` (boxes, labels, scores) and, when ``result`` has sampling
    points, ``<out_path stem>_sampling.png`` for the ``top_queries`` best queries."""
    written = [out_path]
    draw_detections(image, result["boxes"], result["labels"], result["scores"],
                    detector.names).save(out_path)
    if "sampling" in result and len(result["queries"]):
        q = result["queries"][:top_queries]
        loc, w = result["sampling"]["locations"][q], result["sampling"]["weights"][q]
        levels = [f"level {i}, stride {s}" for i, s in enumerate(detector.model.level_strides())]
        path = os.path.splitext(out_path)[0] + "_sampling.png"
        draw_sampling_points(image, loc, w, result["boxes"][:top_queries], levels).save(path)
        written.append(path)
    return written
