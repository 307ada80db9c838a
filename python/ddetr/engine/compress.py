"""``ddetr compress``: a ``ddetr train`` checkpoint in, a faster detector out (a
checkpoint file that ``ddetr eval`` and ``ddetr predict`` load at the sizes the original
was trained at, a ``save_pretrained`` directory, and the search's report)."""

from __future__ import annotations

import os

from ddetr.compress import compress, write_report
from ddetr.compress.techniques import input_scale
from ddetr.data.coco import CocoDetection
from ddetr.data.transforms import val_transforms
from ddetr.engine.checkpoint import read_checkpoint, write_atomic
from ddetr.engine.distributed import pick_device
from ddetr.engine.evaluate import validation_dataset
from ddetr.engine.predict import load_detector


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
                train[key] = max(1, round(train[key] * scale))
        config["train"] = train
    write_atomic({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                  "config": config, "epoch": state.get("epoch", -1)}, path)


def compress_checkpoint(path: str, output_dir: str, max_ap_drop: float = 0.01,
                        coco_path=None, val_images=None, val_annotations=None, cache_dir=None,
                        device: str = "auto", calib_images: int = 16, time_budget: float = 10.0,
                        latency_images: int = 20, progress: bool = True,
                        trust_pickle: bool = False) -> dict:
    """Compresses checkpoint ``path`` on its validation set (see ``evaluate_checkpoint``
    for how the set is found); writes ``output_dir/checkpoint.pth``, ``output_dir/model/``
    (save_pretrained), ``report.json`` and ``report.png``; returns the report."""
    dev = pick_device(device)
    detector = load_detector(path, dev, trust_pickle)
    dataset = validation_dataset(detector, path, coco_path, val_images, val_annotations,
                                 cache_dir)
    def dataset_at(scale: float) -> CocoDetection:
        sizes = (max(1, round(detector.base_size * scale)), max(1, round(detector.max_size * scale)))
        return CocoDetection(dataset.img_folder, dataset.ann_file, val_transforms(*sizes),
                             detector.model.config["num_classes"])

    model, report = compress(detector.model, dataset, max_ap_drop, calib_images, dev,
                             time_budget, latency_images, progress, dataset_at)
    os.makedirs(output_dir, exist_ok=True)
    save_detector(model, read_checkpoint(path, trust_pickle), os.path.join(output_dir,
                                                                           "checkpoint.pth"))
    model.save_pretrained(os.path.join(output_dir, "model"))
    report["files"] = list(write_report(report, output_dir))
    return report
