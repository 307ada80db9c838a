"""Deformable DETR building blocks and the detector."""

from ddetr.models.deformable_detr import DeformableDetr
from ddetr.models.ms_deform_attn import MSDeformAttn
from ddetr.models.postprocess import PostProcess

__all__ = ["DeformableDetr", "MSDeformAttn", "PostProcess"]
