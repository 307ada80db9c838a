"""``TrainConfig``: every setting of a training run, with the paper's recipe as
defaults; ``PRESETS``: named recipes (``cpu-small``, the synthetic demo's, and the
paper's configurations); config files (JSON, or YAML when PyYAML is installed) holding
fields by name; ``SYNTHETIC_PRESET``: what ``ddetr train`` uses on the built-in
synthetic dataset (when no dataset and no preset is given).

Each field's ``metadata["help"]`` is its ``--help`` text; the command line has one flag
per field, spelled like the field (``--lr_backbone``, also ``--lr-backbone``).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields


def _f(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    # data
    coco_path: str | None = _f(None, "COCO root holding train2017/, val2017/ and "
                                     "annotations/instances_{train,val}2017.json")
    train_images: str | None = _f(None, "training image folder (overrides --coco_path)")
    train_annotations: str | None = _f(None, "training COCO annotation file")
    val_images: str | None = _f(None, "validation image folder")
    val_annotations: str | None = _f(None, "validation COCO annotation file")
    cache_dir: str | None = _f(None, "where the synthetic dataset is generated (by default "
                                     "$DDETR_CACHE/synthetic-<version>-<seed>, DDETR_CACHE "
                                     "defaulting to ~/.cache/ddetr)")
    synthetic_train: int = _f(2000, "synthetic dataset: training images")
    synthetic_val: int = _f(200, "synthetic dataset: validation images")
    synthetic_size: int = _f(128, "synthetic dataset: image side in pixels")
    synthetic_classes: int = _f(4, "synthetic dataset: shape classes (circle, square, "
                                   "triangle, star, cross, hexagon)")
    base_size: int = _f(800, "shorter image side for validation; training scales are the "
                             "official 480..800 multiples scaled by base_size/800")
    max_size: int = _f(1333, "longer image side cap")
    num_workers: int = _f(2, "data loading processes per training process")
    # model
    arch: str = _f("deformable-detr", "the detector: deformable-detr; dino (DINO on the "
                                      "same deformable core: denoising queries, mixed query "
                                      "selection, look forward twice; --arch dino also "
                                      "brings DINO's recipe, see --help with it); or detr "
                                      "(the DETR baseline: one C5 level, dense attention, "
                                      "softmax classes; the deformable-only fields are "
                                      "unused)")
    num_classes: int | None = _f(None, "classification outputs (default: largest category id + 1)")
    backbone: str = _f("resnet50", "resnet18, resnet34, resnet50, resnet101, resnet18-tiny "
                                   "(narrow widths, for the CPU demo) or resnet26-tiny (the "
                                   "same with bottleneck blocks, which DC5 needs)")
    backbone_weights: str | None = _f(None, "torchvision ImageNet ResNet weights file")
    backbone_norm: str = _f("frozen", "backbone batch norm: frozen (official, for pretrained "
                                      "weights) or batch (trained; for training from scratch)")
    dilation: bool = _f(False, "dilated last backbone stage (DC5: stride 16 instead of 32; "
                               "needs a bottleneck ResNet: resnet50 or resnet101)")
    num_feature_levels: int = _f(4, "feature levels (1 = single scale)")
    num_queries: int = _f(300, "object queries")
    d_model: int = _f(256, "transformer width (multiple of 32)")
    num_heads: int = _f(8, "attention heads")
    enc_layers: int = _f(6, "encoder layers")
    dec_layers: int = _f(6, "decoder layers")
    dim_feedforward: int = _f(1024, "feed-forward width")
    dropout: float = _f(0.1, "dropout in the transformer")
    enc_n_points: int = _f(4, "sampling points per head and level in the encoder")
    dec_n_points: int = _f(4, "sampling points per head and level in the decoder")
    with_box_refine: bool = _f(False, "iterative bounding box refinement")
    two_stage: bool = _f(False, "two-stage Deformable DETR (implies --with_box_refine)")
    aux_loss: bool = _f(True, "losses on every decoder layer (--no-aux_loss to disable)")
    dn_number: int = _f(100, "dino: denoising queries per batch, as positive/negative pairs "
                             "(groups of every target; 0: none)")
    dn_label_noise_ratio: float = _f(0.5, "dino: denoising label noise (half of it flips "
                                          "a label to a random class)")
    dn_box_noise_scale: float = _f(1.0, "dino: denoising box noise, in box sizes")
    native_layers: bool = _f(True, "run the encoder and decoder layers in one native call per "
                                   "pass when the extension is built (--no-native_layers: the "
                                   "PyTorch path)")
    recompute_activations: bool = _f(False, "native layers recompute the FFN activations and "
                                            "attention probabilities in the backward (less "
                                            "memory, a little slower)")
    # loss and matching
    set_cost_class: float = _f(2.0, "matching cost weight of the class cost (focal; detr: "
                                    "minus the softmax probability; DETR's weight is 1)")
    set_cost_bbox: float = _f(5.0, "matching cost weight of the L1 box distance")
    set_cost_giou: float = _f(2.0, "matching cost weight of the generalised IoU")
    cls_loss_coef: float = _f(2.0, "weight of the classification loss (focal; detr: "
                                   "cross-entropy, DETR's weight is 1)")
    bbox_loss_coef: float = _f(5.0, "weight of the L1 box loss")
    giou_loss_coef: float = _f(2.0, "weight of the GIoU box loss")
    focal_alpha: float = _f(0.25, "focal loss alpha")
    eos_coef: float = _f(0.1, "detr: cross-entropy weight of the no-object class")
    # optimisation
    lr: float = _f(2e-4, "learning rate of the transformer and heads")
    lr_backbone: float = _f(2e-5, "backbone learning rate (0 freezes the backbone)")
    lr_linear_proj_mult: float = _f(0.1, "lr multiplier of sampling_offsets and reference_points")
    weight_decay: float = _f(1e-4, "AdamW weight decay")
    batch_size: int = _f(2, "images per process and step")
    epochs: int = _f(50, "training epochs")
    lr_drop: int = _f(40, "epochs between lr drops (x0.1)")
    clip_max_norm: float = _f(0.1, "gradient clipping max norm (0 disables)")
    ema_decay: float = _f(0.0, "keep an exponential moving average of the weights, moved "
                               "after every step with this decay (e.g. 0.999; 0 disables): "
                               "evaluation and the checkpoint's inference weights (ddetr "
                               "eval, predict, compress, export) use the average")
    amp: str = _f("off", "mixed precision: off, bf16, fp16 (CUDA only) or auto "
                         "(bf16 on the CPU, fp16 on CUDA)")
    # run
    output_dir: str = _f("output", "checkpoints, log.jsonl and evaluation results go here")
    device: str = _f("auto", "cpu, cuda, or auto (cuda when available)")
    seed: int = _f(42, "random seed (each process adds its rank)")
    resume: str | None = _f(None, "checkpoint to resume from (model, optimiser, lr scheduler, "
                                  "epoch, random generators)")
    trust_pickle: bool = _f(False, "let --resume load a checkpoint holding pickled Python "
                                   "objects (an older ddetr's): this runs any code in the "
                                   "file, so only for files you trust")
    eval_every: int = _f(1, "evaluate every this many epochs (and after the last)")
    threads: int | None = _f(None, "CPU threads for torch (default: torch's choice)")
    progress: bool = _f(True, "tqdm progress bars (--no-progress to disable)")

    def uses_synthetic(self) -> bool:
        return not (self.coco_path or self.train_annotations)

    def to_dict(self) -> dict:
        return asdict(self)


# The synthetic demo's recipe (used when no dataset is given), and ``--preset
# cpu-small``: the same recipe for one's own small dataset on a CPU.
CPU_SMALL = dict(
    backbone="resnet18-tiny", backbone_norm="batch", num_feature_levels=4, two_stage=True,
    with_box_refine=True, num_queries=60, d_model=64, num_heads=4, enc_layers=2, dec_layers=3,
    dim_feedforward=256, dropout=0.0, base_size=128, max_size=256, lr=1e-3, lr_backbone=1e-3,
    lr_linear_proj_mult=0.1, weight_decay=1e-4, batch_size=8, epochs=10, lr_drop=8,
    clip_max_norm=0.1, num_workers=1, threads=1)
SYNTHETIC_PRESET = dict(CPU_SMALL, output_dir="output-synthetic")

# The paper's configurations (the official configs/r50_deformable_detr*.sh): the
# defaults plus these fields.
_PAPER = dict(backbone="resnet50", num_feature_levels=4, num_queries=300)
# DETR's recipe (facebookresearch/detr's defaults, the 500-epoch schedule)
_DETR = dict(arch="detr", backbone="resnet50", num_queries=100,
             dim_feedforward=2048, set_cost_class=1.0, cls_loss_coef=1.0, eos_coef=0.1,
             lr=1e-4, lr_backbone=1e-5, epochs=500, lr_drop=400)
# DINO's recipe (IDEA-Research/DINO config/DINO/DINO_4scale.py, 12 epochs): what --arch dino
# sets beneath the preset, the config file and the flags
_DINO = dict(arch="dino", backbone="resnet50", num_feature_levels=4, num_queries=900,
             with_box_refine=True, two_stage=True, dim_feedforward=2048, dropout=0.0,
             set_cost_class=2.0, set_cost_bbox=5.0, set_cost_giou=2.0, cls_loss_coef=1.0,
             bbox_loss_coef=5.0, giou_loss_coef=2.0, dn_number=100, dn_label_noise_ratio=0.5,
             dn_box_noise_scale=1.0, lr=1e-4, lr_backbone=1e-5, epochs=12, lr_drop=11)
ARCH_RECIPES = {"dino": _DINO}
# the synthetic demo with --arch dino: the demo's sizes (SYNTHETIC_PRESET), the recipe's
# 100 denoising queries, twice the main job's queries (the recipe has 3x Deformable
# DETR's, 900 against 300; 180 would exceed the 170 encoder tokens of the demo's smallest
# training scale), the main job's class loss weight (2), and the schedule measured best
# within the main job's wall-clock budget (README, DINO): batch 2, a weight average
# (0.999) instead of an lr drop, 6 epochs
SYNTHETIC_ARCH = {"dino": dict(num_queries=120, dn_number=100, cls_loss_coef=2.0,
                               batch_size=2, ema_decay=0.999, epochs=6, lr_drop=6)}
PRESETS = {
    "cpu-small": CPU_SMALL,
    "deformable-detr": _PAPER,
    "+refine": dict(_PAPER, with_box_refine=True),
    "++two-stage": dict(_PAPER, with_box_refine=True, two_stage=True),
    "single-scale": dict(_PAPER, num_feature_levels=1),
    "dc5": dict(_PAPER, num_feature_levels=1, dilation=True),
    "detr": _DETR,
    "detr-dc5": dict(_DETR, dilation=True),
    "dino": _DINO,
}
PRESET_HELP = {
    "cpu-small": "the synthetic demo's recipe (resnet18-tiny trained from scratch, two-stage "
                 "with refinement, d_model 64, 128-pixel images, batch 8, 10 epochs)",
    "deformable-detr": "the paper's Deformable DETR: ResNet-50, 4 levels, 300 queries, the "
                       "official defaults",
    "+refine": "deformable-detr with iterative box refinement",
    "++two-stage": "deformable-detr with box refinement and two stages",
    "single-scale": "deformable-detr on ResNet C5 only (1 level)",
    "dc5": "single-scale with a dilated last stage (stride 16)",
    "detr": "the DETR baseline (Carion et al. 2020): ResNet-50 C5, 100 queries, FFN 2048, "
            "class cost and loss weight 1, lr 1e-4 (backbone 1e-5), 500 epochs, drop at 400",
    "detr-dc5": "detr with a dilated last stage (stride 16)",
    "dino": "DINO-4scale (Zhang et al. 2023) on the deformable core: ResNet-50, 900 "
            "queries, FFN 2048, no dropout, 100 denoising queries, class loss weight 1, "
            "lr 1e-4 (backbone 1e-5), 12 epochs, drop at 11",
}


def value_type(annotation):
    """The scalar type of a field annotation such as ``int``, ``float | None``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def config_fields():
    """``(name, type annotation, default, help)`` for every field."""
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else None
        yield f.name, hints[f.name], default, f.metadata["help"]


def preset_values(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"preset: unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def make_config(explicit: dict, preset: str | None = None,
                from_file: dict | None = None) -> TrainConfig:
    """The official defaults, overridden by the arch's recipe (``ARCH_RECIPES``: --arch
    dino), overridden by the preset, overridden by ``from_file`` (a ``read_config_file``
    result), overridden by ``explicit`` (the flags the user set). The preset is
    ``preset``, else the file's ``"preset"``, else ``synthetic_preset(arch)`` when no
    dataset is given."""
    from_file = dict(from_file or {})
    file_preset = from_file.pop("preset", None)
    preset = preset or file_preset
    chosen = {**from_file, **explicit}
    if preset is not None:
        base = preset_values(preset)
    else:
        synthetic = TrainConfig(**chosen).uses_synthetic()
        base = synthetic_preset(chosen.get("arch")) if synthetic else {}
    recipe = ARCH_RECIPES.get(chosen.get("arch", base.get("arch")), {})
    config = TrainConfig(**{**recipe, **base, **chosen})
    if config.two_stage:
        config.with_box_refine = True
    return config


def synthetic_preset(arch: str | None = None) -> dict:
    """What ``ddetr train`` uses without a dataset: ``SYNTHETIC_PRESET``, and for ``arch``
    its demo settings (``SYNTHETIC_ARCH``)."""
    return {**SYNTHETIC_PRESET, **SYNTHETIC_ARCH.get(arch, {})}


def read_config_file(path: str) -> dict:
    """The settings of a ``.json`` or ``.yaml``/``.yml`` file (an object of field names,
    plus optionally ``"preset"``), checked against the fields' types. YAML needs PyYAML."""
    if not os.path.isfile(path):
        raise ValueError(f"config: {path!r} does not exist")
    with open(path) as f:
        text = f.read()
    ext = os.path.splitext(path)[1].lower()
    if ext == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config: {path} is not valid JSON ({e})") from None
    elif ext in (".yaml", ".yml"):
        data = _parse_yaml(text, path)
    else:
        raise ValueError(f"config: {path}: expected a .json, .yaml or .yml file")
    if not isinstance(data, dict):
        raise ValueError(f"config: {path} must hold an object of settings by name")
    annotations = {name: annotation for name, annotation, *_ in config_fields()}
    return {key: _checked(key, value, annotations, path) for key, value in data.items()}


def _parse_yaml(text: str, path: str):
    try:
        import yaml
    except ImportError:
        raise ValueError(f"config: {path} is YAML, which needs PyYAML (pip install pyyaml); "
                         f"or write the settings as JSON") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"config: {path} is not valid YAML ({e})") from None


def _checked(key: str, value, annotations: dict, path: str):
    """``value`` for field ``key`` (an int where a float is expected becomes a float;
    so does a string such as ``1e-3``, which YAML reads as a string)."""
    if key == "preset":
        if not isinstance(value, str) or value not in PRESETS:
            raise ValueError(f"config: {path}: preset {value!r} is not one of "
                             f"{', '.join(PRESETS)}")
        return value
    if key not in annotations:
        close = difflib.get_close_matches(key, [*annotations, "preset"], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"config: {path}: unknown key {key!r}{hint}")
    kind = value_type(annotations[key])
    if value is None and type(None) in typing.get_args(annotations[key]):
        return None
    if kind is float and isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    raise ValueError(f"config: {path}: {key} must be {kind.__name__}, got {value!r}")


def write_config(config: TrainConfig, output_dir: str) -> str:
    """Writes ``output_dir/config.json``: every field, so that ``--config`` on it repeats
    the run."""
    path = os.path.join(output_dir, "config.json")
    with open(path, "w") as f:
        json.dump(config.to_dict(), f, indent=2)
        f.write("\n")
    return path
