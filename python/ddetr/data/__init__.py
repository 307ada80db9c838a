"""COCO-format data: the dataset, the official transforms, batching, and the synthetic
shapes dataset."""

from ddetr.data.coco import CocoDetection, load_coco
from ddetr.data.collate import collate_fn, pad_images
from ddetr.data.transforms import train_transforms, val_transforms

__all__ = ["CocoDetection", "load_coco", "collate_fn", "pad_images", "train_transforms",
           "val_transforms"]
