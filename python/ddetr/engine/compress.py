"""``ddetr compress``: a ``ddetr train`` checkpoint in, a faster detector out (a
checkpoint file that ``ddetr eval`` and ``ddetr predict`` load at the sizes the original
was trained at, a ``save_pretrained`` directory, and the search's report)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ddetr.compress import compress, write_report
from ddetr.compress.distill import pseudo_labels, write_labels
from ddetr.compress.search import Finetune
from ddetr.compress.techniques import input_scale
from ddetr.data.coco import CocoDetection
from ddetr.data.transforms import train_transforms, val_transforms
from ddetr.engine import builders
from ddetr.engine.config import TrainConfig
from ddetr.engine.checkpoint import read_checkpoint, write_atomic
from ddetr.engine.distributed import pick_device
from ddetr.engine.evaluate import validation_dataset
from ddetr.engine.predict import load_detector, require_deformable


def save_detector(model, state: dict, path: str) -> None:
    """A checkpoint holding ``model`` with the config entries of the checkpoint it came
    from (``state['config']``: training settings, categories), and what was applied; the
    image sizes scaled as ``resize_inputs`` recorded, so eval and predict use them."""
    config = dict(state.get("config") or {})
    config["model"] = model.config
    config["compression"] = list(model.compression)
    scale = input_scale(model)
    if scale != 1.0 and config.get("train"):
        train = dict(config["train"])
        for key in ("base_size", "max_size"):
            if key in train:
                train[key] = _scaled(train[key], scale)
        config["train"] = train
    write_atomic({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                  "config": config, "epoch": state.get("epoch", -1)}, path)


@dataclass
class CompressRun:
    """The settings of one ``ddetr compress`` run (the command's flags, by name)."""
    checkpoint: str
    output_dir: str = "compressed"
    max_ap_drop: float = 0.01
    coco_path: str | None = None
    val_images: str | None = None
    val_annotations: str | None = None
    train_images: str | None = None       # for --finetune_epochs (default: the run's)
    train_annotations: str | None = None
    cache_dir: str | None = None
    device: str = "auto"
    calib_images: int = 16
    latency_images: int = 20
    time_budget: float = 10.0
    finetune_epochs: int = 0
    finetune_lr: float | None = None      # default: a tenth of the run's lr
    progress: bool = True
    trust_pickle: bool = False


def compress_checkpoint(run: CompressRun) -> dict:
    """Compresses ``run.checkpoint`` on its validation set (see ``evaluate_checkpoint``
    for how the set is found); writes ``output_dir/checkpoint.pth``, ``output_dir/model/``
    (save_pretrained), ``report.json`` and ``report.png``; returns the report."""
    if not isinstance(run.finetune_epochs, int) or run.finetune_epochs < 0:
        raise ValueError(f"finetune_epochs: expected an int >= 0, got {run.finetune_epochs!r}")
    dev = pick_device(run.device)
    detector = load_detector(run.checkpoint, dev, run.trust_pickle)
    require_deformable(detector, run.checkpoint, "ddetr compress")
    dataset = validation_dataset(detector, run.checkpoint, run.coco_path, run.val_images,
                                 run.val_annotations, run.cache_dir)
    classes = detector.model.config["num_classes"]

    def dataset_at(scale: float) -> CocoDetection:
        return CocoDetection(dataset.img_folder, dataset.ann_file,
                             val_transforms(*_sizes(detector, scale)), classes)

    finetune = _finetune(detector, run, dev) if run.finetune_epochs else None
    model, report = compress(detector.model, dataset, run.max_ap_drop, run.calib_images, dev,
                             run.time_budget, run.latency_images, run.progress, dataset_at,
                             finetune)
    os.makedirs(run.output_dir, exist_ok=True)
    save_detector(model, read_checkpoint(run.checkpoint, run.trust_pickle),
                  os.path.join(run.output_dir, "checkpoint.pth"))
    model.save_pretrained(os.path.join(run.output_dir, "model"))
    report["files"] = list(write_report(report, run.output_dir))
    return report


def _scaled(size: int, scale: float) -> int:
    """An image size (shorter or longer side) at ``scale`` times, as resize_inputs means."""
    return max(1, round(size * scale))


def _sizes(detector, scale: float) -> tuple[int, int]:
    return _scaled(detector.base_size, scale), _scaled(detector.max_size, scale)


def _finetune(detector, run: CompressRun, device) -> Finetune:
    """The recovery settings: the training images labelled by the original model
    (``output_dir/pseudo_labels.json``), at any input scale."""
    images, annotations = _training_images(detector, run)
    classes = detector.model.config["num_classes"]
    teacher_view = CocoDetection(images, annotations,
                                 val_transforms(detector.base_size, detector.max_size), classes)
    labels = pseudo_labels(detector.model, teacher_view, device=device, progress=run.progress)
    labelled = write_labels(labels, os.path.join(run.output_dir, "pseudo_labels.json"))

    def train_at(scale: float) -> CocoDetection:
        return CocoDetection(images, labelled, train_transforms(*_sizes(detector, scale)),
                             classes)

    lr = run.finetune_lr or 0.1 * detector.train.get("lr", 2e-4)
    return Finetune(run.finetune_epochs, train_at, lr, detector.train.get("batch_size", 8),
                    detector.train)


def _training_images(detector, run: CompressRun) -> tuple[str, str]:
    """(image folder, an annotation file listing them) of the images to distill on:
    ``run.train_images`` / ``train_annotations``, else the checkpoint's training set."""
    if run.train_annotations:
        if not run.train_images:
            raise ValueError("train_images: required with train_annotations")
        return run.train_images, run.train_annotations
    if not detector.train:
        raise ValueError(f"checkpoint: {run.checkpoint} records no training dataset; pass "
                         f"--train_images and --train_annotations for --finetune_epochs")
    trained = {**detector.train, **({"cache_dir": run.cache_dir} if run.cache_dir else {})}
    paths = builders.dataset_paths(TrainConfig(**trained))
    return paths["train_images"], paths["train_annotations"]
