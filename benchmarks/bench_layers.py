"""Native encoder / decoder layers against the same layers in eager PyTorch.

One ``DeformableTransformerEncoderLayer`` at the standard encoder shape (an 800x1333
image: levels (100,167), (50,84), (25,42), (13,21), 22,223 tokens, all of them queries)
at batch 1 and 2, and one ``DeformableTransformerDecoderLayer`` (300 queries into that
memory), d_model 256, 8 heads, 4 points, FFN 1024, in train mode (dropout 0.1), run

* ``eager``: the same layer written in plain eager PyTorch (``F.linear``,
  ``F.dropout``, ``nn.LayerNorm``, ``nn.MultiheadAttention``) around ddetr's native MSDA
  op: the baseline the native layers' targets are set against;
* ``pytorch``: the layer's own PyTorch path in ddetr, itself on the native MSDA,
  OpenBLAS linear layers and Philox dropout (what ddetr ran before native layers);
* ``native``: the whole layer in one native call per pass, activations stored;
* ``native-recompute``: the same, recomputing the FFN activations and attention
  probabilities in the backward;

forward (with autograd recording, as in training) and forward + backward, side by side
in one process on the same inputs and parameters. Time is the median of ``--repeats``
calls after ``--warmup``; "saved" is the bytes of the distinct tensors autograd keeps for
the backward (``saved_tensors_hooks``; parameters not counted, the layer's inputs
counted). Prints a table and writes JSON under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _common beside us

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import ddetr  # noqa: E402
from ddetr._native import storage_id  # noqa: E402
from ddetr.models.transformer_layers import (DeformableTransformerDecoderLayer,  # noqa: E402
                                             DeformableTransformerEncoderLayer)
from ddetr.ops import encoder_reference_points, ms_deform_attn  # noqa: E402
from _common import (blas_note, device_name, extension_built, git,  # noqa: E402
                     image_levels, time_step, write_result)

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ("eager", "pytorch", "native", "native-recompute")
D_MODEL, HEADS, POINTS, FFN = 256, 8, 4, 1024


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "float64", "bfloat16"), default="float32",
                   help="layer dtype (bfloat16: reference points float32, as in the detector)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2],
                   help="encoder batch sizes (the decoder runs at the first)")
    p.add_argument("--queries", type=int, default=300, help="decoder queries")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    p.add_argument("--quick", action="store_true", help="a 96x128 image: a smoke run")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="JSON directory")
    return p.parse_args(argv)


def _perturbed(layer, gen: torch.Generator):
    # away from the initialisation (zero offset weights), like a trained layer
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return layer


def make_case(kind: str, batch: int, levels, args, device, dtype) -> dict:
    gen = torch.Generator().manual_seed(0)
    shapes = torch.tensor(levels, device=device)
    s = sum(h * w for h, w in levels)
    ref_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    ratios = torch.ones(batch, len(levels), 2, dtype=ref_dtype, device=device)
    make = {"encoder": DeformableTransformerEncoderLayer,
            "decoder": DeformableTransformerDecoderLayer}[kind]
    layer = _perturbed(make(D_MODEL, FFN, args.dropout, "relu", len(levels), HEADS, POINTS), gen)
    layer = layer.to(device, dtype).train()

    def rand(*shape, grad=True):
        return torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_(grad)

    if kind == "encoder":
        ref = encoder_reference_points(shapes, ratios)
        inputs = (rand(batch, s, D_MODEL), rand(batch, s, D_MODEL), ref, shapes, None)
    else:
        lq = args.queries
        ref = torch.rand(batch, lq, 1, 2, generator=gen).to(device, ref_dtype)
        ref = ref.expand(-1, -1, len(levels), -1)
        inputs = (rand(batch, lq, D_MODEL), rand(batch, lq, D_MODEL), ref.contiguous(),
                  rand(batch, s, D_MODEL), shapes, None)
    return {"layer": layer, "inputs": inputs}


def _eager_deformable(attn, query, ref, memory, shapes, training):
    """MSDeformAttn in plain torch ops around the native MSDA (2-d references)."""
    n, lq, c = query.shape
    m, lv, p = attn.n_heads, attn.n_levels, attn.n_points
    value = F.linear(memory, attn.value_proj.weight, attn.value_proj.bias)
    value = value.view(n, -1, m, c // m)
    off = F.linear(query, attn.sampling_offsets.weight, attn.sampling_offsets.bias)
    logits = F.linear(query, attn.attention_weights.weight, attn.attention_weights.bias)
    weights = F.softmax(logits.view(n, lq, m, lv * p), -1).view(n, lq, m, lv, p)
    normalizer = shapes.flip(-1).to(off.dtype)[None, None, None, :, None, :]
    loc = ref[:, :, None, :, None, :] + off.view(n, lq, m, lv, p, 2) / normalizer
    out = ms_deform_attn(value, shapes, None, loc, weights)
    return F.linear(out, attn.output_proj.weight, attn.output_proj.bias)


def _eager_ffn(layer, x, drop_hidden, drop_out, norm):
    h = F.dropout(F.relu(F.linear(x, layer.linear1.weight, layer.linear1.bias)), drop_hidden.p,
                  layer.training)
    f = F.linear(h, layer.linear2.weight, layer.linear2.bias)
    return norm(x + F.dropout(f, drop_out.p, layer.training))


def eager_layer(layer, *inputs):
    """The layer's math in plain eager PyTorch (see the module docstring)."""
    if isinstance(layer, DeformableTransformerEncoderLayer):
        src, pos, ref, shapes, _ = inputs
        a = _eager_deformable(layer.self_attn, src + pos, ref, src, shapes, layer.training)
        src = layer.norm1(src + F.dropout(a, layer.dropout1.p, layer.training))
        return _eager_ffn(layer, src, layer.dropout2, layer.dropout3, layer.norm2)
    tgt, pos, ref, memory, shapes, _ = inputs
    q = tgt + pos
    a = layer.self_attn(q, q, tgt, need_weights=False)[0]
    tgt = layer.norm2(tgt + F.dropout(a, layer.dropout2.p, layer.training))
    a = _eager_deformable(layer.cross_attn, tgt + pos, ref, memory, shapes, layer.training)
    tgt = layer.norm1(tgt + F.dropout(a, layer.dropout1.p, layer.training))
    return _eager_ffn(layer, tgt, layer.dropout3, layer.dropout4, layer.norm3)


def saved_bytes(fn, params) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves while ``fn`` runs."""
    skip = {storage_id(p) for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        if storage_id(t) not in skip:
            seen[storage_id(t)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def measure(case: dict, mode: str, args, device) -> dict:
    layer, inputs = case["layer"], case["inputs"]
    layer.native_layers = mode != "pytorch"
    layer.recompute_activations = mode == "native-recompute"
    grad_out = torch.randn(inputs[0].shape, dtype=inputs[0].dtype, device=device)

    def fwd():
        return eager_layer(layer, *inputs) if mode == "eager" else layer(*inputs)

    def fwd_bwd():
        layer.zero_grad(set_to_none=True)
        fwd().backward(grad_out)

    params = list(layer.parameters())
    return {"fwd_ms": statistics.median(time_step(fwd, device, args.warmup, args.repeats)),
            "fwd+bwd_ms": statistics.median(time_step(fwd_bwd, device, args.warmup,
                                                      args.repeats)),
            "saved_bytes": saved_bytes(fwd, params)}


def run(args) -> dict:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    levels = image_levels(*((96, 128) if args.quick else (800, 1333)))
    cases = [("encoder", b) for b in args.batches] + [("decoder", args.batches[0])]
    rows = []
    for kind, batch in cases:
        case = make_case(kind, batch, levels, args, device, dtype)
        row = {"layer": kind, "batch": batch, "levels": levels,
               "queries": args.queries if kind == "decoder" else sum(h * w for h, w in levels)}
        for mode in MODES:
            row[mode] = measure(case, mode, args, device)
        rows.append(row)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": args.device, "device_name": device_name(args.device),
            "torch": torch.__version__, "build_info": ddetr.build_info(),
            "git_commit": git("rev-parse", "HEAD"), "extension_built": extension_built(),
            "threads": torch.get_num_threads(), "loadavg": os.getloadavg(), "dtype": args.dtype,
            "dropout": args.dropout, "repeats": args.repeats, "warmup": args.warmup,
            "d_model": D_MODEL, "heads": HEADS, "points": POINTS, "dim_feedforward": FFN,
            "blas": blas_note(), "argv": sys.argv[1:]}
    return {"meta": meta, "results": rows}


def print_table(result: dict) -> None:
    meta = result["meta"]
    print(f"# native layers vs PyTorch layers, {meta['device_name']}, {meta['dtype']}, "
          f"{meta['threads']} threads, dropout {meta['dropout']}")
    print(f"# {meta['blas']}")
    head = (f"{'layer':8} {'N':>2} {'queries':>7} {'pass':8} " +
            " ".join(f"{m + ' ms':>18}" for m in MODES) +
            f" {'vs eager':>8} {'recomp.':>8} {'vs path':>8}")
    print(head)
    print("# vs eager: eager / native; recomp.: eager / native-recompute; vs path: pytorch / "
          "native (saved MB rows: the inverse ratios, native / baseline)")
    for row in result["results"]:
        for pass_ in ("fwd", "fwd+bwd"):
            ms = [row[m][pass_ + "_ms"] for m in MODES]
            print(f"{row['layer']:8} {row['batch']:>2} {row['queries']:>7} {pass_:8} " +
                  " ".join(f"{t:>18.1f}" for t in ms) +
                  f" {ms[0] / ms[2]:>7.2f}x {ms[0] / ms[3]:>7.2f}x {ms[1] / ms[2]:>7.2f}x")
        mb = [row[m]["saved_bytes"] / 2**20 for m in MODES]
        print(f"{'':8} {'':>2} {'':>7} {'saved MB':8} " + " ".join(f"{v:>18.1f}" for v in mb) +
              f" {mb[2] / mb[0]:>7.2f}x {mb[3] / mb[0]:>7.2f}x {mb[2] / mb[1]:>7.2f}x")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible to torch")
    result = run(args)
    print_table(result)
    write_result(args.out, f"layers_{args.device}", result)


if __name__ == "__main__":
    main()
