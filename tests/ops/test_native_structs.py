"""The structs of the native boundary: built by field name only, a clear TypeError for
anything else, field names that match the Python side's, and the native re-checks of a
layer call naming the field that does not fit."""

import pytest
import torch

from ddetr import _native
from ddetr._native import layers as native_layers

pytestmark = pytest.mark.skipif(not _native.available(), reason="native extension not built")


def test_fields_by_name_only():
    device = _native.struct("Device", kind="cpu", index=-1, stream=0, threads=1)
    assert (device.kind, device.index, device.stream, device.threads) == ("cpu", -1, 0, 1)
    assert type(device).fields == ("kind", "index", "stream", "threads")
    assert repr(device) == "Device(kind='cpu', index=-1, stream=0, threads=1)"
    level = _native.struct("Level", H=2, W=3)
    assert (level.H, level.W, level.start) == (2, 3, 0)  # unset fields keep their default
    with pytest.raises(TypeError, match="Level has no field h"):
        _native.struct("Level", h=2)
    with pytest.raises(TypeError, match=r"Device\.kind: cannot take a int"):
        _native.struct("Device", kind=1)
    with pytest.raises(TypeError):
        type(level)(2, 3, 0)  # no positional construction


def test_python_names_are_the_structs_fields():
    params = type(_native.struct("LayerParams")).fields
    assert params == native_layers.PARAM_NAMES
    assert type(_native.struct("LayerInputs")).fields == native_layers.INPUT_NAMES
    assert type(_native.struct("LayerInputGrads")).fields == native_layers.INPUT_NAMES[:4]
    assert (type(_native.struct("LayerSaved")).fields
            == type(_native.struct("LayerSavedSizes")).fields)


def _layer_call(decoder=False, **fields):
    """A training encoder (or decoder) layer call of C = 8, 2 heads, one 2x2 level,
    N = 1, 4 queries, with every pointer set to 64 unless given."""
    device = _native.struct("Device", kind="cpu", index=-1, stream=0, threads=1)
    params = _native.struct("LayerParams", **{name: 64 for name in native_layers.PARAM_NAMES})
    inputs = _native.struct("LayerInputs", x=64, pos=64, reference_points=64,
                            memory=64 if decoder else 0)
    args = dict(dtype="float32", device=device, decoder=decoder, N=1, Lq=4, C=8, F=16,
                ref_dim=2, S=4, M=2, D=4, L=1, P=1,
                levels=[_native.struct("Level", H=2, W=2, start=0)], training=True,
                params=params, inputs=inputs, output=64, workspace=64, workspace_bytes=64)
    args.update(fields)
    return _native.struct("LayerCall", **args)


def test_layer_plan_names_every_saved_activation():
    plan = native_layers.plan(
        native_layers.LayerCall(decoder=False, batch=1, queries=4, d_model=8,
                                dim_feedforward=16, ref_dim=2, tokens=4, num_heads=2,
                                num_levels=1, num_points=1, levels=((2, 2, 0),),
                                training=True, recompute=False, dropout=0.0, seed=0),
        torch.zeros(1, 4, 8))
    assert tuple(plan.saved_sizes) == type(_native.struct("LayerSaved")).fields
    assert plan.saved_sizes["qkv"] == 0 and plan.saved_sizes["value"] > 0  # encoder
    assert plan.forward_workspace_bytes > 0 and plan.backward_workspace_bytes > 0
    raw = _native.call_entry("layer_plan", _layer_call())
    assert raw.saved_sizes.value == plan.saved_sizes["value"]


def test_native_rechecks_a_layer_call():
    params = _native.struct("LayerParams", **{name: 64 for name in native_layers.PARAM_NAMES})
    params.norm1_bias = 0
    with pytest.raises(ValueError, match=r"params\.norm1_bias is a null pointer"):
        _native.call_entry("layer_forward", _layer_call(params=params))
    with pytest.raises(ValueError, match=r"inputs\.memory is a null pointer"):
        _native.call_entry("layer_forward", _layer_call(decoder=True, inputs=_native.struct(
            "LayerInputs", x=64, reference_points=64)))
    with pytest.raises(ValueError, match="level table has 0 entries but L = 1"):
        _native.call_entry("layer_plan", _layer_call(levels=[]))
    with pytest.raises(ValueError, match="dropout"):
        _native.call_entry("layer_plan", _layer_call(dropout=1.5))
    with pytest.raises(ValueError, match="float16"):
        _native.call_entry("layer_plan", _layer_call(dtype="float16"))
    with pytest.raises(ValueError, match=r"grad_params\.value_proj_weight is a null pointer"):
        _native.call_entry("layer_backward", _layer_call(grad_output=64))
    grads = _native.struct("LayerParams", **{name: 64 for name in native_layers.PARAM_NAMES})
    with pytest.raises(ValueError, match=r"grad_inputs\.x is a null pointer"):
        _native.call_entry("layer_backward", _layer_call(grad_output=64, grad_params=grads))
