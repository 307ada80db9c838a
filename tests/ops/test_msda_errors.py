"""Every bad argument of ms_deform_attn raises an error naming it."""

import pytest
import torch

import ddetr
from ddetr import _native
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


def _raw_call(dtype="float32", kind="cpu", S=4, value=8, levels=((2, 2, 0),)):
    """An MsdaCall for one 2x2 level, N = M = Lq = L = P = 1, D = 4, built field by field
    with no Python check: what the native re-checks see."""
    device = _native.struct("Device", kind=kind, index=0 if kind == "cuda" else -1, stream=0,
                            threads=1)
    return _native.struct(
        "MsdaCall", dtype=dtype, device=device, N=1, S=S, M=1, D=4, Lq=1, L=len(levels), P=1,
        levels=[_native.struct("Level", H=h, W=w, start=start) for h, w, start in levels],
        value=value, sampling_locations=8, attention_weights=8, output=8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cuda_tensor_without_cuda_runtime_is_a_clear_error():
    # Without a GPU a CUDA tensor cannot even be created; what we can check is that the
    # native module refuses "cuda" with an actionable message when CUDA is not compiled in.
    if ddetr.build_info()["cuda"]:
        pytest.skip("this build has CUDA kernels; covered by the CUDA tests on a GPU")
    with pytest.raises(RuntimeError, match="built without CUDA"):
        _native.call_entry("msda_forward", _raw_call(kind="cuda", S=1, levels=((1, 1, 0),)))


def test_native_rechecks_sizes_and_null_pointers():
    with pytest.raises(ValueError, match="value has 5 rows"):
        _native.call_entry("msda_forward", _raw_call(S=5))
    with pytest.raises(ValueError, match="null pointer"):
        _native.call_entry("msda_forward", _raw_call(value=0))
    with pytest.raises(ValueError, match="float16"):
        _native.call_entry("msda_forward", _raw_call(dtype="float16"))


@pytest.mark.cuda
def test_mixed_devices():
    args = inputs()
    args["attention_weights"] = args["attention_weights"].cuda()
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn(**args)
