"""Every bad argument of flatten_multiscale / encoder_reference_points raises an error
naming it (and the level)."""

import re

import pytest
import torch

import ddetr
from ddetr import _native
from ddetr.ops import encoder_reference_points, flatten_multiscale
from tests.ops.flatten_cases import Pyramid, make_pyramid

CASE = Pyramid(((5, 7), (3, 4), (2, 2)), c=8, padding=("none", "pad"))


def inputs():
    features, masks, pos_embeds, level_embed = make_pyramid(CASE)
    return dict(features=features, masks=masks, pos_embeds=pos_embeds, level_embed=level_embed)


def replace(lst, i, t):
    return lst[:i] + [t] + lst[i + 1:]


BAD = {
    "features not a list": (lambda a: dict(features=a["features"][0]), "features"),
    "no levels": (lambda a: dict(features=[], masks=[], pos_embeds=[]), "features"),
    "masks too short": (lambda a: dict(masks=a["masks"][:2]), "masks: expected 3 tensors"),
    "pos_embeds too long": (lambda a: dict(pos_embeds=a["pos_embeds"] + a["pos_embeds"][:1]),
                            "pos_embeds: expected 3 tensors"),
    "batch mismatch": (lambda a: dict(features=replace(a["features"], 1, a["features"][1][:1])),
                       r"features\[1\]: expected shape \(N, C, H, W\) with N = 2"),
    "channel mismatch": (lambda a: dict(features=replace(a["features"], 2,
                                                         a["features"][2][:, :4])),
                         r"features\[2\].*C = 8"),
    "feature rank": (lambda a: dict(features=replace(a["features"], 0, a["features"][0][0])),
                     r"features\[0\]: expected 4 dims"),
    "integer feature": (lambda a: dict(features=replace(a["features"], 1,
                                                        a["features"][1].long())),
                        r"features\[1\]: expected a floating-point"),
    "pos shape": (lambda a: dict(pos_embeds=replace(a["pos_embeds"], 1,
                                                    a["pos_embeds"][1][..., :3])),
                  r"pos_embeds\[1\]: expected shape \(2, 8, 3, 4\) to match features\[1\]"),
    "mask shape": (lambda a: dict(masks=replace(a["masks"], 2, a["masks"][2][:, :1])),
                   re.escape("masks[2]: expected shape (2, 2, 2) to match features[2], "
                             "got (2, 1, 2)")),
    "mask with channels": (lambda a: dict(masks=replace(a["masks"], 0,
                                                        a["masks"][0][:, None])),
                           r"masks\[0\]: expected shape"),
    "non-bool mask": (lambda a: dict(masks=replace(a["masks"], 1, a["masks"][1].float())),
                      r"masks\[1\]: expected a bool tensor"),
    "uint8 mask": (lambda a: dict(masks=replace(a["masks"], 1, a["masks"][1].byte())),
                   r"masks\[1\]: expected a bool tensor"),
    "level_embed rows": (lambda a: dict(level_embed=a["level_embed"][:2]),
                         re.escape("level_embed: expected shape (L, C) = (3, 8)")),
    "level_embed channels": (lambda a: dict(level_embed=a["level_embed"][:, :7]),
                             "level_embed"),
    "level_embed not a tensor": (lambda a: dict(level_embed=1.0), "level_embed"),
    "mask not a tensor": (lambda a: dict(masks=replace(a["masks"], 0, None)), r"masks\[0\]"),
    "meta device": (lambda a: dict(pos_embeds=replace(a["pos_embeds"], 2,
                                                      a["pos_embeds"][2].to("meta"))),
                    r"pos_embeds\[2\]: expected a tensor on cpu"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_argument_raises_naming_it(name):
    change, needle = BAD[name]
    args = inputs()
    args.update(change(args))
    with pytest.raises(ValueError, match=needle):
        flatten_multiscale(**args)


def test_zero_sized_level():
    args = inputs()
    args["features"][1] = args["features"][1][:, :, :0]
    args["pos_embeds"][1] = args["pos_embeds"][1][:, :, :0]
    args["masks"][1] = args["masks"][1][:, :0]
    with pytest.raises(ValueError, match=r"features\[1\]: expected H and W >= 1"):
        flatten_multiscale(**args)


def test_too_many_levels():
    limit = ddetr.build_info()["max_levels"]
    features = [torch.zeros(1, 2, 1, 1)] * (limit + 1)
    with pytest.raises(ValueError, match=f"at most {limit} levels"):
        flatten_multiscale(features, None, features)


REFERENCE_BAD = {
    "ratios rank": (lambda s, r: (s, r[0]), "valid_ratios: expected shape"),
    "ratios levels": (lambda s, r: (s, r[:, :2]), "valid_ratios: expected shape"),
    "ratios integer": (lambda s, r: (s, r.long()), "valid_ratios: expected a floating"),
    "shapes float": (lambda s, r: (s.float(), r), "spatial_shapes: expected an integer"),
    "shapes rank": (lambda s, r: (s.flatten(), r), "spatial_shapes"),
    "shapes zero": (lambda s, r: (s * 0, r), "spatial_shapes: expected every H and W >= 1"),
    "shapes type": (lambda s, r: (3, r), "spatial_shapes"),
}


@pytest.mark.parametrize("name", list(REFERENCE_BAD))
def test_reference_points_bad_argument(name):
    out = flatten_multiscale(**inputs())
    change, needle = REFERENCE_BAD[name]
    with pytest.raises(ValueError, match=needle):
        encoder_reference_points(*change(out.spatial_shapes, out.valid_ratios))


def _raw_call(dtype="float32", kind="cpu", levels=((2, 2), (1, 1)), **fields):
    """A FlattenCall of N = 1, C = 4 on these levels with the given pointer fields, built
    field by field with no Python check: what the native re-checks see."""
    device = _native.struct("Device", kind=kind, index=0 if kind == "cuda" else -1, stream=0,
                            threads=1)
    return _native.struct("FlattenCall", dtype=dtype, device=device, N=1, C=4,
                          levels=[_native.struct("LevelSize", H=h, W=w) for h, w in levels],
                          **fields)


def _forward(features=(8, 8), pos_embeds=(8, 8), **call):
    return _raw_call(features=list(features), masks=[], pos_embeds=list(pos_embeds),
                     level_embed=0, src=8, pos=8, mask=8, valid_ratios=8, **call)


def test_native_rechecks_pointers_and_sizes():
    with pytest.raises(ValueError, match="features: 1 pointers for a pyramid of 2 levels"):
        _native.call_entry("flatten_forward", _forward(features=[8]))
    with pytest.raises(ValueError, match=r"pos_embeds\[1\] is a null pointer"):
        _native.call_entry("flatten_forward", _forward(pos_embeds=[8, 0]))
    with pytest.raises(ValueError, match="level 1 has size"):
        _native.call_entry("flatten_forward", _forward(levels=[(2, 2), (0, 1)]))
    with pytest.raises(ValueError, match="float16"):
        _native.call_entry("flatten_forward", _forward(dtype="float16"))
    with pytest.raises(ValueError, match="workspace: 8 bytes"):
        _native.call_entry("flatten_backward", _raw_call(
            grad_src=8, grad_pos=8, grad_features=[], grad_pos_embeds=[], grad_level_embed=8,
            workspace=8, workspace_bytes=8))
    with pytest.raises(ValueError, match="grad_pos is a null pointer"):
        _native.call_entry("flatten_backward", _raw_call(
            grad_src=8, grad_pos=0, grad_features=[], grad_pos_embeds=[8, 8],
            grad_level_embed=0, workspace=0, workspace_bytes=0))
    with pytest.raises(ValueError, match="float32 or float64"):
        _native.call_entry("encoder_reference_points", _raw_call(
            dtype="bfloat16", valid_ratios=8, reference_points=8))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cuda_without_cuda_build_is_a_clear_error():
    if ddetr.build_info()["cuda"]:
        pytest.skip("this build has CUDA kernels; covered by the CUDA tests on a GPU")
    with pytest.raises(RuntimeError, match="built without CUDA"):
        _native.call_entry("flatten_forward", _forward(kind="cuda", levels=[(1, 1)],
                                                       features=[8], pos_embeds=[8]))


@pytest.mark.cuda
def test_mixed_devices():
    args = inputs()
    args["masks"] = replace(args["masks"], 1, args["masks"][1].cuda())
    with pytest.raises(ValueError, match=r"masks\[1\]: expected a tensor on cpu"):
        flatten_multiscale(**args)
