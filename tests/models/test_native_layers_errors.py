"""Direct calls of the native layers with a layer that does not fit the input: a clear
ValueError, never a read of a parameter buffer by the wrong dtype or size, and never a
silent ReLU for GELU or eps 1e-5 for another eps."""

import pytest
import torch
from torch import nn

from ddetr.ops.native_layers import library_ready
from tests.models.test_native_layers import call, make_inputs, make_layer

pytestmark = pytest.mark.skipif(not library_ready(torch.zeros(1)),
                                reason="native extension or OpenBLAS missing")
LEVELS = [(5, 7), (3, 4), (1, 1)]


def run(kind, layer, dtype):
    return call(layer, kind, make_inputs(kind, LEVELS, dtype=dtype), native=True)


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
@pytest.mark.parametrize("layer_dtype, input_dtype", [
    (torch.float32, torch.float64), (torch.float64, torch.float32),
    (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_parameters_of_another_dtype(kind, layer_dtype, input_dtype):
    layer = make_layer(kind, LEVELS, dtype=layer_dtype)
    with pytest.raises(ValueError, match="cannot run natively"):
        run(kind, layer, input_dtype)


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
@pytest.mark.parametrize("change", ["linear1", "output_proj", "norm_eps", "gelu",
                                    "two_dropouts"])
def test_layers_the_native_path_cannot_compute(kind, change):
    layer = make_layer(kind, LEVELS)
    attn = layer.cross_attn if kind == "decoder" else layer.self_attn
    if change == "linear1":  # wider than linear2 reads
        layer.linear1 = nn.Linear(layer.linear1.in_features, layer.linear1.out_features + 3,
                                  dtype=torch.float64)
    elif change == "output_proj":
        attn.output_proj = nn.Linear(attn.d_model, attn.d_model + 1, dtype=torch.float64)
    elif change == "norm_eps":
        layer.norm1.eps = 1e-6
    elif change == "gelu":
        layer.activation = torch.nn.functional.gelu
    else:
        layer.dropout3.p = 0.2
        layer.train()
    with pytest.raises(ValueError, match="cannot run natively|layer parameter"):
        run(kind, layer, torch.float64)


def test_a_fitting_layer_still_runs():
    layer = make_layer("encoder", LEVELS)
    out = run("encoder", layer, torch.float64)
    assert torch.isfinite(out).all()
