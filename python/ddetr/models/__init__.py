"""Deformable DETR building blocks."""

from ddetr.models.ms_deform_attn import MSDeformAttn

__all__ = ["MSDeformAttn"]
