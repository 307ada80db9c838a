"""Every bad argument of ms_deform_attn raises an error naming it."""

import pytest
import torch

import ddetr
from ddetr.ops import ms_deform_attn
from tests.ops.msda_cases import CASES, make_inputs

CASE = CASES[4]  # 4 levels, N=2, M=8, D=32


def inputs():
    value, shapes, start, loc, attn = make_inputs(CASE, torch.float32)
    return dict(value=value, spatial_shapes=shapes, level_start_index=start,
                sampling_locations=loc, attention_weights=attn)


def call(**changes):
    args = inputs()
    args.update(changes)
    return ms_deform_attn(**args)


def shrink(t, dim):
    return t.narrow(dim, 0, t.shape[dim] - 1)


BAD = {
    "value rank": (dict(value=lambda a: a["value"].flatten(2)), "value"),
    "locations rank": (dict(sampling_locations=lambda a: a["sampling_locations"][..., 0]),
                       "sampling_locations"),
    "locations last dim": (dict(sampling_locations=lambda a: a["sampling_locations"]
                                .repeat(1, 1, 1, 1, 1, 2)), "sampling_locations"),
    "batch mismatch": (dict(sampling_locations=lambda a: shrink(a["sampling_locations"], 0)),
                       "sampling_locations"),
    "heads mismatch": (dict(attention_weights=lambda a: shrink(a["attention_weights"], 2)),
                       "attention_weights"),
    "levels mismatch": (dict(spatial_shapes=lambda a: a["spatial_shapes"][:3],
                             level_start_index=lambda a: a["level_start_index"][:3]),
                        "sampling_locations"),
    "points mismatch": (dict(attention_weights=lambda a: shrink(a["attention_weights"], 4)),
                        "attention_weights"),
    "queries mismatch": (dict(attention_weights=lambda a: shrink(a["attention_weights"], 1)),
                         "attention_weights"),
    "value length vs levels": (dict(value=lambda a: shrink(a["value"], 1)), "value has"),
    "level sizes": (dict(spatial_shapes=lambda a: a["spatial_shapes"].flip(0)),
                    "level_start_index"),
    "start index": (dict(level_start_index=lambda a: a["level_start_index"] + 1),
                    "level_start_index"),
    "start index length": (dict(level_start_index=lambda a: a["level_start_index"][:2]),
                           "level_start_index"),
    "zero-sized level": (dict(spatial_shapes=lambda a: a["spatial_shapes"] * 0),
                         "spatial_shapes"),
    "negative level": (dict(spatial_shapes=lambda a: -a["spatial_shapes"]), "spatial_shapes"),
    "float shapes": (dict(spatial_shapes=lambda a: a["spatial_shapes"].float()),
                     "spatial_shapes"),
    "shapes rank": (dict(spatial_shapes=lambda a: a["spatial_shapes"].flatten()),
                    "spatial_shapes"),
    "integer value": (dict(value=lambda a: a["value"].long()), "value"),
    "integer weights": (dict(attention_weights=lambda a: a["attention_weights"].int()),
                        "attention_weights"),
    "bool locations": (dict(sampling_locations=lambda a: a["sampling_locations"] > 0),
                       "sampling_locations"),
    "not a tensor": (dict(value=lambda a: a["value"].tolist()), "value"),
    "meta device": (dict(attention_weights=lambda a: a["attention_weights"].to("meta")),
                    "attention_weights"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_argument_raises_naming_it(name):
    changes, needle = BAD[name]
    args = inputs()
    resolved = {k: f(args) for k, f in changes.items()}
    with pytest.raises(ValueError, match=needle):
        call(**resolved)


def test_too_many_levels():
    limit = ddetr.build_info()["max_levels"]
    shapes = [(1, 1)] * (limit + 1)
    value = torch.zeros(1, limit + 1, 1, 4)
    loc = torch.zeros(1, 1, 1, limit + 1, 1, 2)
    attn = torch.zeros(1, 1, 1, limit + 1, 1)
    with pytest.raises(ValueError, match=f"at most {limit} levels"):
        ms_deform_attn(value, shapes, None, loc, attn)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cuda_tensor_without_cuda_runtime_is_a_clear_error():
    # Without a GPU a CUDA tensor cannot even be created; what we can check is that the
    # native module refuses "cuda" with an actionable message when CUDA is not compiled in.
    if ddetr.build_info()["cuda"]:
        pytest.skip("this build has CUDA kernels; covered by the CUDA tests on a GPU")
    from ddetr._native import loader
    with pytest.raises(RuntimeError, match="built without CUDA"):
        loader._C.msda_forward("float32", "cuda", 0, (1, 1, 1, 4, 1, 1, 1), [(1, 1, 0)],
                             1, 1, 1, 1, 1, 0)


def test_native_rechecks_sizes_and_null_pointers():
    from ddetr._native import loader
    with pytest.raises(ValueError, match="value has 5 rows"):
        loader._C.msda_forward("float32", "cpu", -1, (1, 5, 1, 4, 1, 1, 1), [(2, 2, 0)],
                             8, 8, 8, 8, 1, 0)
    with pytest.raises(ValueError, match="null pointer"):
        loader._C.msda_forward("float32", "cpu", -1, (1, 4, 1, 4, 1, 1, 1), [(2, 2, 0)],
                             0, 8, 8, 8, 1, 0)
    with pytest.raises(ValueError, match="float16"):
        loader._C.msda_forward("float16", "cpu", -1, (1, 4, 1, 4, 1, 1, 1), [(2, 2, 0)],
                             8, 8, 8, 8, 1, 0)


@pytest.mark.cuda
def test_mixed_devices():
    args = inputs()
    args["attention_weights"] = args["attention_weights"].cuda()
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn(**args)
