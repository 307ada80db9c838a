"""Native encoder / decoder layers (ddetr.models.native_layers) against the layers' PyTorch
path, which is the reference: outputs and every gradient, dropout masks, gradcheck,
store vs recompute, determinism, fallbacks and bad input."""

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ddetr.models.transformer_layers import (DeformableTransformerDecoderLayer,
                                             DeformableTransformerEncoderLayer)
from ddetr.models import native_layers
from ddetr.models.native_layers import decoder_layer, encoder_layer
from ddetr.ops import philox_keep_mask
from ddetr.ops.native_layers import library_ready
from ddetr._native import layers as ops_layers
from ddetr.ops.levels import as_level_table

pytestmark = pytest.mark.skipif(not library_ready(torch.zeros(1)),
                                reason="native extension or OpenBLAS missing")

SHAPES = {"three": [(5, 7), (3, 4), (1, 1)], "one": [(4, 6)],
          "five": [(6, 5), (4, 3), (2, 2), (1, 2), (1, 1)]}
C, HEADS, POINTS, FFN = 16, 4, 3, 24


def make_layer(kind, levels, dtype=torch.float64, dropout=0.0, device="cpu", seed=0):
    torch.manual_seed(seed)
    cls = {"encoder": DeformableTransformerEncoderLayer,
           "decoder": DeformableTransformerDecoderLayer}[kind]
    layer = cls(C, FFN, dropout, "relu", len(levels), HEADS, POINTS)
    with torch.no_grad():  # away from the initialisation (zero offset weights, unit norms)
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return layer.to(device, dtype).train(dropout > 0)


def make_inputs(kind, levels, n=2, lq=7, ref_dim=2, dtype=torch.float64, mask=True,
                pos=True, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in levels)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_()

    pad = torch.zeros(n, s, dtype=torch.bool)
    if mask and n > 1:
        pad[-1, -3:] = True
    # reference points inside, outside and on the border of the map
    ref = torch.rand(n, s if kind == "encoder" else lq, len(levels), ref_dim, generator=g,
                     dtype=dtype) * 1.2 - 0.1
    ref[0, 0, :, :2] = 0.0
    ref[-1, -1, :, :2] = 1.0
    if ref_dim == 4:
        ref[..., 2:] = ref[..., 2:].abs() + 0.05
    inputs = {"x": rand(n, s if kind == "encoder" else lq, C),
              "pos": rand(n, s if kind == "encoder" else lq, C) if pos else None,
              "ref": ref.to(device).requires_grad_(), "shapes": torch.tensor(levels, device=device),
              "mask": pad.to(device) if mask else None}
    if kind == "decoder":
        inputs["memory"] = rand(n, s, C)
    return inputs


def call(layer, kind, inp, native, recompute=False):
    """The layer on `inp`: natively or on its PyTorch path (the module's own forward)."""
    if native:
        fn = encoder_layer if kind == "encoder" else decoder_layer
        extra = () if kind == "encoder" else (inp["memory"],)
        return fn(layer, inp["x"], inp["pos"], inp["ref"], *extra, inp["shapes"], None,
                  inp["mask"], recompute=recompute)
    layer.native_layers = False
    if kind == "encoder":
        return layer(inp["x"], inp["pos"], inp["ref"], inp["shapes"], None, inp["mask"])
    return layer(inp["x"], inp["pos"], inp["ref"], inp["memory"], inp["shapes"], None,
                 inp["mask"])


def outputs_and_grads(layer, kind, inp, native, recompute=False):
    """The output and the gradients of every input and parameter for a fixed grad_out."""
    leaves = [t for t in (inp["x"], inp["pos"], inp["ref"], inp.get("memory")) if t is not None]
    leaves += list(layer.parameters())
    out = call(layer, kind, inp, native, recompute)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2),
                           dtype=out.dtype).to(out.device)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return [out.detach()] + list(grads)


def assert_close_relative(got, want, tol, names=None, atol=0.0):
    """Each tensor within `tol` of its largest magnitude (plus `atol`)."""
    for i, (a, b) in enumerate(zip(got, want)):
        err = (a - b).abs().max().item()
        scale = max(b.abs().max().item(), 1e-30)
        assert err <= tol * scale + atol, f"{names[i] if names else i}: max error {err:.3e} " \
                                   f"vs max {scale:.3e} (relative {err / scale:.2e} > {tol})"


def _names(layer, kind, inp):
    inputs = [k for k in ("x", "pos", "ref", "memory") if inp.get(k) is not None]
    return ["out"] + inputs + [n for n, _ in layer.named_parameters()]


@pytest.mark.parametrize("levels", list(SHAPES))
@pytest.mark.parametrize("kind,ref_dim", [("encoder", 2), ("decoder", 2), ("decoder", 4)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_matches_pytorch_path(levels, kind, ref_dim, dtype, tol):
    lv = SHAPES[levels]
    layer = make_layer(kind, lv, dtype)
    inp = make_inputs(kind, lv, ref_dim=ref_dim, dtype=dtype)
    want = outputs_and_grads(layer, kind, inp, native=False)
    got = outputs_and_grads(layer, kind, inp, native=True)
    assert_close_relative(got, want, tol, _names(layer, kind, inp))


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
@pytest.mark.parametrize("n,mask,pos", [(1, False, True), (3, True, False), (2, True, True)])
def test_batch_mask_and_no_pos(kind, n, mask, pos):
    lv = SHAPES["three"]
    layer = make_layer(kind, lv)
    inp = make_inputs(kind, lv, n=n, mask=mask, pos=pos)
    assert_close_relative(outputs_and_grads(layer, kind, inp, True),
                          outputs_and_grads(layer, kind, inp, False), 1e-12)


def test_many_blocks_of_rows():
    # an encoder longer than one block of rows (CpuOps::kBlockRows = 2048) per image
    lv = [(48, 50)]
    layer = make_layer("encoder", lv, torch.float32)
    inp = make_inputs("encoder", lv, n=2, dtype=torch.float32)
    assert_close_relative(outputs_and_grads(layer, "encoder", inp, True),
                          outputs_and_grads(layer, "encoder", inp, False), 1e-5,
                          _names(layer, "encoder", inp))


@pytest.fixture
def threads():
    """Sets torch's CPU threads for the test (more than this machine's cores is fine:
    users have 8-64) and puts them back after it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _forward_workspace(kind, lv, n, lq, dtype):
    s = sum(h * w for h, w in lv)
    call = ops_layers.LayerCall(
        decoder=kind == "decoder", batch=n, queries=lq if kind == "decoder" else s,
        d_model=C, dim_feedforward=FFN, ref_dim=2, tokens=s, num_heads=HEADS, num_levels=len(lv),
        num_points=POINTS, levels=as_level_table(torch.tensor(lv), None, "cpu").rows,
        training=True, recompute=False, dropout=0.0, seed=0)
    return ops_layers.plan(call, torch.zeros(1, dtype=dtype)).forward_workspace_bytes


# At least 4 blocks of 2048 rows per thread: the CPU forward runs the blocks side by side,
# one per thread, each on one-thread primitives (CpuOps::run_blocks); fewer, and every
# primitive of a block runs on the whole team. The encoder: 3 images of 8 blocks at 6
# threads; the decoder: 8 images of one block (300 queries) at 2 threads.
@pytest.mark.parametrize("kind,lv,n,lq,nt", [("encoder", [(128, 120), (32, 32)], 3, 0, 6),
                                             ("decoder", [(20, 24), (10, 12)], 8, 300, 2)])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_blocks_side_by_side(kind, lv, n, lq, nt, dropout, threads):
    layer = make_layer(kind, lv, dropout=dropout)
    inp = make_inputs(kind, lv, n=n, lq=lq)
    threads(1)
    one_thread = _forward_workspace(kind, lv, n, lq, torch.float64)
    torch.manual_seed(5)
    serial = outputs_and_grads(layer, kind, inp, True)
    threads(nt)
    # nt block workspaces instead of one: the side-by-side path is the one that ran
    assert _forward_workspace(kind, lv, n, lq, torch.float64) > one_thread
    torch.manual_seed(5)
    parallel = outputs_and_grads(layer, kind, inp, True)
    for a, b, name in zip(parallel, serial, _names(layer, kind, inp)):
        assert torch.equal(a, b), f"{name} differs from the one-thread result"
    if dropout == 0.0:
        assert_close_relative(parallel, outputs_and_grads(layer, kind, inp, False), 1e-12,
                              _names(layer, kind, inp))


@pytest.mark.parametrize("kind,ref_dim", [("encoder", 2), ("decoder", 2), ("decoder", 4)])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradcheck(kind, ref_dim, dropout):
    # with dropout on, the seed is fixed per call: the backward must use the forward's masks
    lv = [(3, 4), (2, 2)]
    layer = make_layer(kind, lv, dropout=dropout)
    inp = make_inputs(kind, lv, n=2, lq=3, ref_dim=ref_dim)
    names = [n for n, _ in layer.named_parameters()]
    tensors = [inp["x"], inp["pos"], inp.get("memory")] + list(layer.parameters())

    def fn(x, pos, memory, *params):
        torch.manual_seed(5)
        state = dict(zip(names, params))
        sub = dict(inp, x=x, pos=pos, memory=memory)
        with torch.nn.utils.stateless._reparametrize_module(layer, state):
            return call(layer, kind, sub, native=True)

    args = [t for t in tensors]
    if kind == "encoder":
        args[2] = None
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_reference_point_gradient():
    # box references (decoder): the gradient of reference_points by finite differences
    lv = [(3, 4), (2, 2)]
    layer = make_layer("decoder", lv)
    inp = make_inputs("decoder", lv, n=1, lq=3, ref_dim=4)
    ref = (torch.rand(1, 3, 2, 4, dtype=torch.float64) * 0.5 + 0.25).requires_grad_()

    def fn(r):
        return call(layer, "decoder", dict(inp, ref=r), native=True)

    assert torch.autograd.gradcheck(fn, (ref,), eps=1e-7, atol=1e-5, rtol=1e-3)


def _philox_mask(shape, p, seed, site, first_row):
    n = 1
    for s in shape:
        n *= s
    keep = philox_keep_mask(n, p, seed, (site << 40) + first_row)
    # the kernels scale by 1 / (1 - p) computed in float32 (ddetr/dropout.h)
    one = torch.tensor(1.0, dtype=torch.float32)
    return keep.view(shape).to(torch.float64) * (one / (one - p)).double()


def test_dropout_masks_are_the_documented_philox_stream():
    # The encoder layer with dropout equals the PyTorch formula with the masks of
    # layers.h: site s of rows starting at r0 uses offset (s << 40) + r0
    lv = [(3, 4), (2, 2)]
    p = 0.4
    layer = make_layer("encoder", lv, dropout=p)
    inp = make_inputs("encoder", lv, n=2, mask=False)
    torch.manual_seed(11)
    got = call(layer, "encoder", inp, native=True)
    torch.manual_seed(11)
    seed = int(torch.empty((), dtype=torch.int64).random_())
    n, s, _ = inp["x"].shape
    attn = layer.self_attn
    outs = []
    for b in range(n):
        x, pos = inp["x"][b:b + 1], inp["pos"][b:b + 1]
        value = attn.project_value(x)
        a = attn.attend(x + pos, inp["ref"][b:b + 1], value, inp["shapes"])
        y1 = layer.norm1(x + a * _philox_mask(a.shape, p, seed, 2, b * s))
        h = F.relu(layer.linear1(y1))
        h = h * _philox_mask(h.shape, p, seed, 3, b * s)
        f = layer.linear2(h)
        outs.append(layer.norm2(y1 + f * _philox_mask(f.shape, p, seed, 4, b * s)))
    want = torch.cat(outs)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # the keep rate and the scaling of what was applied
    kept = (_philox_mask((10000,), p, seed, 3, 0) > 0).double().mean().item()
    assert abs(kept - (1 - p)) < 5 * (p * (1 - p) / 10000) ** 0.5


def test_dropout_reproducible_and_seed_dependent():
    lv = SHAPES["three"]
    layer = make_layer("decoder", lv, dropout=0.2)
    inp = make_inputs("decoder", lv)
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        runs.append(call(layer, "decoder", inp, native=True))
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_recompute_equals_store_and_is_deterministic(kind):
    lv = SHAPES["three"]
    layer = make_layer(kind, lv, torch.float32, dropout=0.2)
    inp = make_inputs(kind, lv, dtype=torch.float32)
    results = []
    for recompute in (False, True, False):
        torch.manual_seed(7)
        results.append(outputs_and_grads(layer, kind, inp, True, recompute))
    for a, b in zip(results[0], results[2]):
        assert torch.equal(a, b)  # bitwise the same on a second run
    assert_close_relative(results[1], results[0], 1e-6)


def _bf16_results(kind, levels, ref_dim, n, lq, recompute=False, autocast=False):
    """Output and gradients of (native bf16, PyTorch bf16, exact float64) on the same
    bf16-representable parameters and inputs; the float64 run is the truth. With
    ``autocast`` the first two are a float32 layer on float32 inputs under bfloat16
    autocast instead of a bf16 layer.

    Bilinear sampling's gradient jumps where a location crosses a pixel, and bf16
    offsets move locations by up to a few tenths of a pixel, so with random offsets
    both bf16 paths differ from the truth by whatever crossings they happen to make.
    Here the sampling offsets are zero (their weights and bias zeroed: exact in every
    precision, their gradients still computed) and every reference point lies a quarter
    pixel from the nearest pixel centre line, so no bf16 rounding crosses one. The FFN's
    ReLU has the same kind of jump at 0, so its bias is raised to keep the hidden units
    away from it."""
    layer_bf = make_layer(kind, levels).to(torch.bfloat16)
    attn = layer_bf.cross_attn if kind == "decoder" else layer_bf.self_attn
    with torch.no_grad():
        attn.sampling_offsets.weight.zero_()
        attn.sampling_offsets.bias.zero_()
        layer_bf.linear1.bias.add_(4.0)
    layer64 = make_layer(kind, levels)
    layer64.load_state_dict({k: v.double() for k, v in layer_bf.state_dict().items()})
    inp64 = make_inputs(kind, levels, n=n, lq=lq, ref_dim=ref_dim)
    g = torch.Generator().manual_seed(3)
    ref = inp64["ref"].detach().clone()
    for i, (h, w) in enumerate(levels):
        for j, size in ((0, w), (1, h)):
            pixel = torch.randint(0, size, ref.shape[:2], generator=g).double()
            quarter = torch.randint(0, 2, ref.shape[:2], generator=g) * 0.5 + 0.25
            ref[:, :, i, j] = (pixel + quarter) / size
    inp64["ref"] = ref.requires_grad_()
    inp_bf = {}
    for k, v in inp64.items():
        if torch.is_tensor(v) and v.is_floating_point():
            inp_bf[k] = v.detach().to(torch.bfloat16).requires_grad_()
            inp64[k] = inp_bf[k].detach().double().requires_grad_()
        else:
            inp_bf[k] = v
    out_shape = (n, sum(h * w for h, w in levels) if kind == "encoder" else lq, C)
    grad_out = torch.randn(out_shape, generator=torch.Generator().manual_seed(2))
    grad_out = grad_out.to(torch.bfloat16)

    if autocast:
        layer_bf = layer_bf.float()
        inp_bf = {k: v.detach().float().requires_grad_() if torch.is_tensor(v)
                  and v.is_floating_point() else v for k, v in inp_bf.items()}

    def run(layer, inp, native, cast=False):
        leaves = [t for t in (inp["x"], inp["pos"], inp["ref"], inp.get("memory"))
                  if t is not None] + list(layer.parameters())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cast):
            out = call(layer, kind, inp, native, recompute)
        grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
        assert all(g.dtype == t.dtype for g, t in zip(grads, leaves))
        return [t.detach().double() for t in (out, *grads)]

    return (run(layer_bf, inp_bf, True, autocast), run(layer_bf, inp_bf, False, autocast),
            run(layer64, inp64, False))


def _relative_errors(got, want):
    """Per tensor ||got - want|| / ||want|| (Frobenius), the denominator floored at 1e-3 of
    the largest norm (some exact gradients are 0: one level, offsets 0, equal samples)."""
    floor = 1e-3 * max(w.norm().item() for w in want)
    return [(a - w).norm().item() / max(w.norm().item(), floor) for a, w in zip(got, want)]


@pytest.mark.parametrize("kind,ref_dim,levels,n", [
    ("encoder", 2, "three", 2), ("encoder", 2, "one", 1), ("decoder", 2, "three", 2),
    ("decoder", 4, "five", 3)])
def test_bfloat16_against_float64(kind, ref_dim, levels, n):
    # Stated tolerance, per output and gradient, in relative Frobenius error against the
    # exact (float64) result on the same bf16 values: at most 2%, and at most twice the
    # error of PyTorch's own bf16 path plus 0.2% (bf16 keeps 8 significant bits, 0.4% per
    # rounding at most; a layer chains a few dozen roundings; averaged over seeds the
    # native errors are 0.2-1.4%, at or below PyTorch's)
    lv = SHAPES[levels]
    native, eager, exact = _bf16_results(kind, lv, ref_dim, n, lq=7)
    layer = make_layer(kind, lv)
    names = ["out"] + [k for k in ("x", "pos", "ref", "memory")
                       if kind == "decoder" or k != "memory"] + \
        [n for n, _ in layer.named_parameters()]
    for name, err, err_eager in zip(names, _relative_errors(native, exact),
                                    _relative_errors(eager, exact)):
        assert err <= 0.02 and err <= 2 * err_eager + 0.002, \
            f"{name}: native bf16 error {err:.2e}, PyTorch bf16 error {err_eager:.2e}"
    assert all(t.isfinite().all() for t in native)


@pytest.mark.parametrize("kind,ref_dim", [("encoder", 2), ("decoder", 4)])
def test_bfloat16_autocast_runs_natively(kind, ref_dim, monkeypatch):
    # a float32 layer under bf16 autocast runs the bf16 native layer (its float32
    # parameters get float32 gradients) with errors like autocast's own PyTorch path;
    # float16 autocast stays on the PyTorch path
    calls = _count_native_calls(monkeypatch)
    lv = SHAPES["three"]
    native, eager, exact = _bf16_results(kind, lv, ref_dim, 2, 7, autocast=True)
    assert len(calls) == 1  # the native run only (call() runs the other one unflagged)
    # (autocast's PyTorch path keeps LayerNorm and softmax in float32, where the bf16
    # layer rounds their outputs: 0.5% more slack than test_bfloat16_against_float64)
    for err, err_eager in zip(_relative_errors(native, exact), _relative_errors(eager, exact)):
        assert err <= 0.02 and err <= 2 * err_eager + 0.007
    layer = make_layer(kind, lv, torch.float32)
    inp = make_inputs(kind, lv, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.float16):
        assert not _uses_native(layer, kind, inp, monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _uses_native(layer, kind, inp, monkeypatch)


def test_bfloat16_many_blocks_recompute_and_dropout():
    # two blocks of rows per image, recompute mode; then dropout: reproducible, and the
    # keep rate of the output's dropout site as in float32 (same Philox stream)
    lv = [(48, 50)]
    native, _, exact = _bf16_results("encoder", lv, 2, 2, 7, recompute=True)
    assert max(_relative_errors(native, exact)) <= 0.02
    layer = make_layer("encoder", SHAPES["three"], torch.bfloat16, dropout=0.3)
    inp = make_inputs("encoder", SHAPES["three"], dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(outputs_and_grads(layer, "encoder", inp, True))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kernel", ["amx", "amx_emulated", "avx512", "widen"])
def test_bfloat16_on_every_gemm_kernel(kernel):
    # the bfloat16 tests above, in a process whose layers run their GEMMs on `kernel`
    # (DDETR_BF16_GEMM, read once per process): each kernel the CPU can run, not only
    # the one it picks
    from ddetr._native import gemm
    runs = {"amx": gemm.bf16_amx_supported(), "amx_emulated": gemm.bf16_avx512_supported(),
            "avx512": gemm.bf16_avx512_supported(), "widen": True}
    if not runs[kernel]:
        pytest.skip(f"this CPU cannot run the {kernel} bfloat16 GEMM")
    env = dict(os.environ, DDETR_BF16_GEMM=kernel)
    check = subprocess.run([sys.executable, "-c", "from ddetr._native import gemm; "
                            "print(gemm.bf16_kernel())"], env=env, capture_output=True, text=True)
    assert check.stdout.strip() == kernel, check.stderr
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          __file__, "-k", "test_bfloat16_against_float64 or "
                          "test_bfloat16_many_blocks_recompute_and_dropout"],
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "5 passed" in out.stdout, out.stdout[-2000:]


def test_bfloat16_saves_half_the_bytes():
    lv = SHAPES["three"]
    sizes = {}
    for dtype in (torch.float32, torch.bfloat16):
        layer = make_layer("decoder", lv, dtype)
        inp = make_inputs("decoder", lv, dtype=dtype)
        nbytes = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: nbytes.append(t.numel() * t.element_size()) or t, lambda t: t):
            call(layer, "decoder", inp, native=True)
        sizes[dtype] = sum(nbytes)
    # everything saved is in the layer's dtype except the one-byte padding mask
    assert sizes[torch.bfloat16] < 0.52 * sizes[torch.float32]


def test_saved_activations_smaller_with_recompute():
    lv = SHAPES["three"]
    layer = make_layer("decoder", lv, torch.float32)
    inp = make_inputs("decoder", lv, dtype=torch.float32)
    sizes = []
    for recompute in (False, True):
        nbytes = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: nbytes.append(t.numel() * t.element_size()) or t, lambda t: t):
            call(layer, "decoder", inp, native=True, recompute=recompute)
        sizes.append(sum(nbytes))
    assert sizes[1] < sizes[0]


def test_inference_without_grad_matches():
    lv = SHAPES["three"]
    layer = make_layer("encoder", lv).eval()
    inp = make_inputs("encoder", lv)
    with torch.no_grad():
        torch.testing.assert_close(call(layer, "encoder", inp, True),
                                   call(layer, "encoder", inp, False), rtol=1e-12, atol=1e-12)


def _count_native_calls(monkeypatch):
    """A list that gets one entry per native layer call from now on."""
    calls = []
    real = native_layers._run
    monkeypatch.setattr(native_layers, "_run", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _uses_native(layer, kind, inp, monkeypatch):
    hit = _count_native_calls(monkeypatch)
    layer.native_layers = True
    if kind == "encoder":
        layer(inp["x"], inp["pos"], inp["ref"], inp["shapes"], None, inp["mask"])
    else:
        layer(inp["x"], inp["pos"], inp["ref"], inp["memory"], inp["shapes"], None, inp["mask"])
    return bool(hit)


def test_module_flag_and_fallbacks(monkeypatch):
    lv = SHAPES["three"]
    layer = make_layer("encoder", lv, torch.float32)
    inp = make_inputs("encoder", lv, dtype=torch.float32)
    assert _uses_native(layer, "encoder", inp, monkeypatch)
    # GELU: not native; hooks on a sub-module: not native (the hook must run)
    layer.activation = F.gelu
    assert not _uses_native(layer, "encoder", inp, monkeypatch)
    layer.activation = F.relu
    seen = []
    handle = layer.linear1.register_forward_hook(lambda *a: seen.append(1))
    assert not _uses_native(layer, "encoder", inp, monkeypatch) and seen
    handle.remove()
    # different dropout probabilities
    layer.dropout2.p = 0.3
    assert not _uses_native(layer, "encoder", inp, monkeypatch)
    layer.dropout2.p = 0.0
    # bfloat16 layers run natively (autocast: test_bfloat16_autocast_runs_natively)
    bf = make_layer("encoder", lv, torch.bfloat16)
    assert _uses_native(bf, "encoder", make_inputs("encoder", lv, dtype=torch.bfloat16),
                        monkeypatch)
    # an empty batch
    empty = {k: v[:0] if torch.is_tensor(v) and k != "shapes" else v for k, v in inp.items()}
    assert not _uses_native(layer, "encoder", empty, monkeypatch)


@pytest.mark.parametrize("kind,field,value,match", [
    ("encoder", "pos", lambda i: i["pos"][:, :-1], "pos: expected shape"),
    ("encoder", "ref", lambda i: i["ref"][..., :1, :], "reference_points"),
    ("encoder", "x", lambda i: i["x"][..., :-1], "query"),
    ("encoder", "ref", lambda i: i["ref"].float(), "reference_points: expected torch.float64"),
    ("encoder", "mask", lambda i: i["mask"].float(), "input_padding_mask"),
    ("encoder", "x", lambda i: i["x"].to(torch.int64), "x: expected a float32, float64 or bf"),
    ("decoder", "memory", lambda i: i["memory"][:, :-2], "input_padding_mask"),
    ("decoder", "memory", lambda i: i["memory"][:1], "input_flatten"),
    ("decoder", "pos", lambda i: i["pos"].float(), "pos: expected torch.float64"),
])
def test_bad_input(kind, field, value, match):
    lv = SHAPES["three"]
    layer = make_layer(kind, lv)
    inp = make_inputs(kind, lv)
    inp[field] = value(inp)
    with pytest.raises(ValueError, match=match):
        call(layer, kind, inp, native=True)


def test_bad_level_table():
    lv = SHAPES["three"]
    layer = make_layer("encoder", lv)
    inp = make_inputs("encoder", lv)
    with pytest.raises(ValueError, match="spatial_shapes"):
        encoder_layer(layer, inp["x"], inp["pos"], inp["ref"],
                      torch.tensor([(5, 7), (3, 4), (2, 1)]), None, inp["mask"])


def test_detector_native_matches_pytorch_path():
    from ddetr import DeformableDetr

    torch.manual_seed(0)
    model = DeformableDetr(num_classes=5, num_queries=6, num_feature_levels=3, backbone="resnet18",
                           d_model=32, num_heads=4, num_encoder_layers=2, num_decoder_layers=2,
                           dim_feedforward=48, with_box_refine=True, dropout=0.0).double()
    images = torch.randn(2, 3, 64, 80, dtype=torch.float64)
    results = []
    for native in (True, False):
        model.set_native_layers(native)
        model.zero_grad()
        out = model(images)
        (out["pred_logits"].sum() + out["pred_boxes"].sum()).backward()
        results.append([out["pred_logits"].detach(), out["pred_boxes"].detach()]
                       + [p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(results[0]) == len(results[1])
    # (a few gradients are rounding noise around zero: the absolute floor)
    assert_close_relative(results[0], results[1], 1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="enabled"):
        model.set_native_layers("yes")


def test_detector_bfloat16_native_runs_and_agrees(monkeypatch):
    # a bf16 detector (float32 reference points) takes the native layers; its outputs
    # agree with its PyTorch path within bf16 noise, and a backward gives finite gradients
    from ddetr import DeformableDetr

    calls = _count_native_calls(monkeypatch)

    torch.manual_seed(0)
    model = DeformableDetr(num_classes=5, num_queries=6, num_feature_levels=3, backbone="resnet18",
                           d_model=32, num_heads=4, num_encoder_layers=2, num_decoder_layers=2,
                           dim_feedforward=48, with_box_refine=True, dropout=0.0).to(torch.bfloat16)
    images = torch.randn(2, 3, 64, 80).to(torch.bfloat16)
    outs = []
    for native in (True, False):
        model.set_native_layers(native)
        out = model(images)
        outs.append([out["pred_logits"].detach().double(), out["pred_boxes"].detach().double()])
    assert len(calls) == 4  # two encoder and two decoder layers, on the first pass only
    for a, b in zip(*outs):
        assert (a - b).norm() <= 0.03 * b.norm()
    model.set_native_layers(True)
    model.zero_grad()
    out = model(images)
    (out["pred_logits"].float().sum() + out["pred_boxes"].float().sum()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.bfloat16 and g.isfinite().all() for g in grads)


@pytest.mark.cuda
@pytest.mark.parametrize("kind,ref_dim", [("encoder", 2), ("decoder", 4)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_matches_cpu(kind, ref_dim, deterministic):
    if not library_ready(torch.zeros(1, device="cuda")):
        pytest.skip("cuBLAS could not be loaded")
    lv = SHAPES["three"]
    layer = make_layer(kind, lv, torch.float64)
    inp = make_inputs(kind, lv, ref_dim=ref_dim)
    want = outputs_and_grads(layer, kind, inp, True)
    layer_cuda = layer.cuda()
    inp_cuda = {k: v.detach().cuda().requires_grad_(v.requires_grad) if torch.is_tensor(v) else v
                for k, v in inp.items()}
    torch.use_deterministic_algorithms(deterministic)
    try:
        got = outputs_and_grads(layer_cuda, kind, inp_cuda, True)
        again = outputs_and_grads(layer_cuda, kind, inp_cuda, True)
    finally:
        torch.use_deterministic_algorithms(False)
    assert_close_relative([g.cpu() for g in got], want, 1e-10)
    if deterministic:
        assert all(torch.equal(a, b) for a, b in zip(got, again))


@pytest.mark.cuda
def test_many_blocks_of_rows_cuda():
    # more rows than one CUDA block (CudaOps::kBlockRows = 32768) and than one inference
    # block of the PyTorch path: natively, on the PyTorch path, and without autograd
    # (float64: no TF32 question between cuBLAS calls)
    lv = [(130, 260)]
    layer = make_layer("encoder", lv, device="cuda")
    inp = make_inputs("encoder", lv, n=1, device="cuda")
    native = outputs_and_grads(layer, "encoder", inp, True)
    assert_close_relative(native, outputs_and_grads(layer, "encoder", inp, False), 1e-10,
                          _names(layer, "encoder", inp))
    with torch.no_grad():
        for flag in (True, False):
            layer.native_layers = flag
            out = layer(inp["x"], inp["pos"], inp["ref"], inp["shapes"], None, inp["mask"])
            assert (out - native[0]).norm() <= 1e-10 * native[0].norm(), flag


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_inference_sees_changed_offset_weights(kind):
    """Without autograd the joined offset / attention-weight matrix is reused between
    calls; an in-place change of either part, or a new parameter, must be seen."""
    levels = SHAPES["three"]
    layer, inp = make_layer(kind, levels).eval(), make_inputs(kind, levels)
    attn = layer.cross_attn if kind == "decoder" else layer.self_attn
    with torch.no_grad():
        first = call(layer, kind, inp, native=True)
        assert torch.equal(call(layer, kind, inp, native=True), first)
        attn.sampling_offsets.weight.mul_(1.5)
        changed = call(layer, kind, inp, native=True)
        assert not torch.allclose(changed, first)
        torch.testing.assert_close(changed, call(layer, kind, inp, native=False),
                                   rtol=1e-10, atol=1e-10)
        layer.native_layers = True
        attn.attention_weights.bias = torch.nn.Parameter(
            attn.attention_weights.bias + torch.randn_like(attn.attention_weights.bias))
        replaced = call(layer, kind, inp, native=True)
        assert not torch.allclose(replaced, changed)
        torch.testing.assert_close(replaced, call(layer, kind, inp, native=False),
                                   rtol=1e-10, atol=1e-10)


def _group_mask(lq: int, seed: int = 5) -> torch.Tensor:
    """(Lq, Lq) bool, True where a query may not look: random, but every query sees itself."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(lq, lq, generator=g) < 0.5
    mask.fill_diagonal_(False)
    return mask


@pytest.mark.parametrize("recompute", [False, True])
def test_decoder_self_attention_mask_against_pytorch(recompute):
    """A decoder layer with a self-attention mask (DINO's denoising groups): the native
    layer's output and every gradient equal the PyTorch path's (float64)."""
    levels = SHAPES["three"]
    layer = make_layer("decoder", levels)
    inp = make_inputs("decoder", levels, lq=9)
    attn_mask = _group_mask(9)
    leaves = [inp["x"], inp["pos"], inp["ref"], inp["memory"], *layer.parameters()]
    grad_out = torch.randn(2, 9, C, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(2))
    results = []
    for native in (True, False):
        layer.native_layers = native
        layer.recompute_activations = recompute
        out = layer(inp["x"], inp["pos"], inp["ref"], inp["memory"], inp["shapes"], None,
                    inp["mask"], self_attn_mask=attn_mask)
        results.append([out.detach(), *torch.autograd.grad(out, leaves, grad_out)])
    assert_close_relative(results[0], results[1], 1e-10)
    # the mask matters: without it the output differs
    layer.native_layers = True
    plain = layer(inp["x"], inp["pos"], inp["ref"], inp["memory"], inp["shapes"], None,
                  inp["mask"])
    assert not torch.allclose(plain, results[0][0])


def test_decoder_self_attention_mask_bfloat16_and_errors():
    """bfloat16 with a mask, against float64 on the same bfloat16 values: the native
    layer's relative error is at most 2% and about that of the PyTorch path in bfloat16
    (the stated tolerance of test_bfloat16_against_float64)."""
    levels = SHAPES["one"]
    low = make_layer("decoder", levels).eval().to(torch.bfloat16)
    exact_layer = copy.deepcopy(low).double()
    inp = make_inputs("decoder", levels, lq=6)
    attn_mask = _group_mask(6)
    low_inp = {k: (v.detach().to(torch.bfloat16) if k in ("x", "pos", "memory") else v)
               for k, v in inp.items()}
    low_inp["ref"] = inp["ref"].detach().float()
    exact_inp = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point()
                     else v) for k, v in low_inp.items()}
    with torch.no_grad():
        exact = call_masked(exact_layer, exact_inp, attn_mask, native=False)
        eager = call_masked(low, low_inp, attn_mask, native=False)
        native = call_masked(low, low_inp, attn_mask, native=True)
    err, err_eager = _relative_errors([native], [exact])[0], _relative_errors([eager], [exact])[0]
    assert err <= 0.02 and err <= 2 * err_eager + 0.002, (err, err_eager)
    with pytest.raises(ValueError, match="self_attn_mask"):
        decoder_layer(low, low_inp["x"], None, low_inp["ref"], low_inp["memory"],
                      inp["shapes"], None, None, self_attn_mask=attn_mask[:5])


def call_masked(layer, inp, attn_mask, native):
    layer.native_layers = native
    return layer(inp["x"], inp["pos"], inp["ref"], inp["memory"], inp["shapes"], None,
                 inp["mask"], self_attn_mask=attn_mask)


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_inference_call_skips_autograd_with_the_same_bits(kind):
    # Without gradients to compute the native forward runs without autograd's Function
    # (no graph, nothing saved); it is the same forward, bit for bit.
    levels = SHAPES["three"]
    layer = make_layer(kind, levels, torch.float32)
    inp = make_inputs(kind, levels, dtype=torch.float32)
    with_graph = call(layer, kind, inp, native=True)
    assert with_graph.grad_fn is not None
    with torch.no_grad():
        plain = call(layer, kind, inp, native=True)
    assert plain.grad_fn is None
    assert torch.equal(with_graph.detach().view(torch.int32), plain.view(torch.int32))
    for t in inp.values():  # and with no input nor parameter needing a gradient
        if isinstance(t, torch.Tensor):
            t.requires_grad_(False)
    layer.requires_grad_(False)
    frozen = call(layer, kind, inp, native=True)
    assert frozen.grad_fn is None and torch.equal(frozen, plain)
