"""End-to-end benchmark: ddetr's DeformableDetr against transformers' with the same weights.

A randomly initialised ``transformers.DeformableDetrForObjectDetection`` (ResNet-50
backbone, the default Deformable DETR config: 6 + 6 layers, d_model 256, 300 queries,
91 classes) is converted with ``ddetr.convert.from_hf``; the outputs of both are checked
to agree (logits and boxes within ``--tolerance``, and the training losses in eval mode),
then both run side by side in this one process on the same inputs:

* inference: batch 1 at each ``--sizes`` image size, eval mode, ``torch.no_grad``;
* a training step: forward, criterion (Hungarian matching and the losses of every
  decoder layer, transformers' weights 1 / 5 / 2 for class / L1 / GIoU in both) and
  backward, at ``--train-batch`` images of ``--train-size`` with ``--targets`` random
  boxes each, train mode, gradients dropped between steps. The same parameters train
  in both (transformers freezes every parameter of its own, non-timm, ResNet backbone,
  so ddetr's backbone is frozen too), and the same dropouts apply (0.1 everywhere, the
  official recipe: transformers' activation and attention dropout are set to 0.1);
* peak memory of each measurement (after all timing): on CPU the growth of the resident
  set's high-water mark over the call (glibc told to unmap freed memory, see
  ``_common.PeakMemory``), on CUDA ``torch.cuda.max_memory_allocated`` over the inputs;
* ddetr's time by part (backbone, input projection, flattening, encoder, decoder, heads,
  criterion, matching, backward) from one ``torch.profiler`` run of each measurement.

ddetr runs twice: ``ddetr`` with its native encoder / decoder layers (the default when
the extension is built) and ``ddetr-pytorch-layers`` with the layers' PyTorch path
(``--no-layers-off`` skips the second).

With ``--dtype bfloat16`` both models and the images are cast with
``.to(torch.bfloat16)`` after the float32 parity check, and only inference is timed:
transformers in bfloat16, transformers in float32 (a copy kept for that row), ddetr in
bfloat16 with and without native layers; the JSON also holds ddetr's largest output change
against its own float32 outputs.

With ``--busy N`` the inference measurements run once more, for transformers and ddetr,
while N other processes each keep a core busy (the benchmark starts and stops them):
how much each implementation slows down when it does not have the machine to itself.

Time is the median of ``--repeats`` calls after ``--warmup`` untimed ones. Prints tables
and writes JSON under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _common beside us

import torch  # noqa: E402

import ddetr  # noqa: E402
from ddetr import convert  # noqa: E402
from ddetr.models import SetCriterion, HungarianMatcher  # noqa: E402
from ddetr.models import deformable_transformer  # noqa: E402
from _common import (BusyProcesses, PeakMemory, blas_note, device_name, extension_built, git,  # noqa: E402
                     time_step)

HERE = os.path.dirname(os.path.abspath(__file__))
IMPLS = ("transformers", "ddetr", "ddetr-pytorch-layers")
PARTS = ("backbone", "input projection", "flattening", "encoder", "decoder", "heads",
         "criterion", "matching", "backward")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where both models run")
    p.add_argument("--sizes", nargs="+", default=["800x1333", "512x512"],
                   help="inference image sizes, HxW, batch 1")
    p.add_argument("--train-size", default="512x512", help="training-step image size, HxW")
    p.add_argument("--train-batch", type=int, default=2, help="training-step batch size")
    p.add_argument("--targets", type=int, default=6, help="random target boxes per image")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16: both models and the images cast with .to(torch.bfloat16) "
                        "for inference (no training step), transformers also timed in float32; "
                        "the parity check runs in float32 first")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest |difference| of logits and boxes accepted in the parity check")
    p.add_argument("--busy", type=int, default=0, metavar="N",
                   help="also time inference with N other processes keeping a core busy "
                        "each (started by the benchmark), for transformers and ddetr side "
                        "by side: each one's slowdown against the idle machine")
    p.add_argument("--no-train", action="store_true", help="skip the training step")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--no-profile", action="store_true", help="skip the per-part breakdown")
    p.add_argument("--no-layers-off", action="store_true",
                   help="skip ddetr with native layers off (the layers' PyTorch path)")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="directory for the JSON")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 128x128 images, 1 repeat, no warm-up (seconds, not minutes)")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.train_size, args.repeats, args.warmup = ["128x128"], "128x128", 1, 0
    for name in ("repeats", "train_batch", "targets"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected a positive int")
    if args.busy < 0:
        p.error("--busy: expected a count >= 0")
    if args.dtype == "bfloat16":
        args.no_train = True  # bfloat16 training is autocast (ddetr train --amp bf16)
    args.sizes = [_size(p, s) for s in args.sizes]
    args.train_size = _size(p, args.train_size)
    return args


def _size(parser, text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        if h >= 32 and w >= 32:
            return h, w
    except ValueError:
        pass
    parser.error(f"image size: expected HxW with both sides at least 32, got {text!r}")


# ---------------------------------------------------------------- models and inputs

def build_models(device: torch.device):
    """(transformers model, ddetr model), the same random weights, on ``device``."""
    import transformers
    torch.manual_seed(0)
    backbone = transformers.ResNetConfig(out_features=["stage2", "stage3", "stage4"])
    config = transformers.DeformableDetrConfig(
        use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False,
        num_labels=91, auxiliary_loss=True, activation_dropout=0.1, attention_dropout=0.1,
        class_cost=1, bbox_cost=5, giou_cost=2, bbox_loss_coefficient=5,
        giou_loss_coefficient=2)
    hf = transformers.DeformableDetrForObjectDetection(config)
    ours = convert.from_hf(hf)
    # transformers freezes every parameter of its own (non-timm) ResNet: train the same
    # parameters in both, whatever transformers decides
    frozen = all(not p.requires_grad for p in hf.model.backbone.parameters())
    ours.backbone.requires_grad_(not frozen)
    return hf.to(device), ours.to(device)


def our_criterion(hf_model) -> SetCriterion:
    """ddetr's criterion with the costs and loss weights the transformers model uses."""
    c = hf_model.config
    matcher = HungarianMatcher(c.class_cost, c.bbox_cost, c.giou_cost, focal_alpha=c.focal_alpha)
    weights = {"loss_ce": 1.0, "loss_bbox": c.bbox_loss_coefficient,
               "loss_giou": c.giou_loss_coefficient}
    return SetCriterion(c.num_labels, matcher, weights, focal_alpha=c.focal_alpha)


def make_targets(batch: int, count: int, num_classes: int, gen: torch.Generator, device):
    targets = []
    for _ in range(batch):
        centre = torch.rand(count, 2, generator=gen) * 0.6 + 0.2
        size = torch.rand(count, 2, generator=gen) * 0.3 + 0.05
        targets.append({"labels": torch.randint(num_classes, (count,), generator=gen).to(device),
                        "boxes": torch.cat([centre, size], 1).to(device)})
    return targets


def hf_labels(targets: list[dict]) -> list[dict]:
    return [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]


class Workload:
    """The callables measured, over one set of inputs."""

    def __init__(self, hf, ours, criterion, args, device):
        self.hf, self.ours, self.criterion, self.device = hf, ours, criterion, device
        # transformers and the images kept in float32 beside bfloat16 models (to_bfloat16)
        self.hf_float32, self.images_float32 = None, None
        gen = torch.Generator().manual_seed(1)
        self.images = {size: torch.randn(1, 3, *size, generator=gen).to(device)
                       for size in args.sizes}
        self.train_images = torch.randn(args.train_batch, 3, *args.train_size,
                                        generator=gen).to(device)
        self.targets = make_targets(args.train_batch, args.targets, hf.config.num_labels, gen,
                                    device)

    def to_bfloat16(self) -> dict:
        """Casts both models and the images to bfloat16 (a float32 copy of transformers
        kept for its own row); returns ddetr's largest output change against float32."""
        self.hf_float32 = copy.deepcopy(self.hf)
        with torch.no_grad():
            before = {size: self.ours.eval()(x) for size, x in self.images.items()}
        self.hf.to(torch.bfloat16)
        self.ours.to(torch.bfloat16)
        self.images_float32 = self.images
        self.images = {size: x.bfloat16() for size, x in self.images.items()}
        with torch.no_grad():
            return {f"{size[0]}x{size[1]}": _largest_differences(
                        before[size]["pred_logits"], before[size]["pred_boxes"],
                        self.ours.eval()(x)) for size, x in self.images.items()}

    def inference(self, impl: str, size):
        x = self.images[size]
        mask = torch.ones(x.shape[0], *x.shape[-2:], dtype=torch.long, device=x.device)

        def step():
            with torch.no_grad():
                if impl == "transformers":
                    self.hf.eval()(pixel_values=x, pixel_mask=mask)
                elif impl == "transformers-float32":
                    self.hf_float32.eval()(pixel_values=self.images_float32[size],
                                           pixel_mask=mask)
                else:
                    self._ours(impl).eval()(x)
        return step

    def train_step(self, impl: str):
        x = self.train_images
        mask = torch.ones(x.shape[0], *x.shape[-2:], dtype=torch.long, device=x.device)
        labels = hf_labels(self.targets)

        def step():
            if impl == "transformers":
                self.hf.train()
                loss = self.hf(pixel_values=x, pixel_mask=mask, labels=labels).loss
                model = self.hf
            else:
                self._ours(impl).train()
                outputs = self.ours(x)
                with _part("criterion"):
                    loss = self.criterion.total(self.criterion(outputs, self.targets))
                model = self.ours
            with _part("backward"):
                loss.backward()
            model.zero_grad(set_to_none=True)
        return step

    def _ours(self, impl: str):
        self.ours.set_native_layers(impl == "ddetr")
        return self.ours

    def check_parity(self, tolerance: float) -> dict:
        """Largest output differences (eval, every inference size) and the losses of both
        (eval mode: no dropout) on the training inputs; raises if they disagree."""
        report = {}
        with torch.no_grad():
            for size, x in self.images.items():
                mask = torch.ones(x.shape[0], *x.shape[-2:], dtype=torch.long, device=x.device)
                a = self.hf.eval()(pixel_values=x, pixel_mask=mask)
                b = self.ours.eval()(x)
                diff = _largest_differences(a.logits, a.pred_boxes, b)
                report[f"{size[0]}x{size[1]}"] = diff
                if max(diff.values()) > tolerance:
                    raise SystemExit(f"parity check failed at {size}: {diff} > {tolerance}")
            x = self.train_images
            mask = torch.ones(x.shape[0], *x.shape[-2:], dtype=torch.long, device=x.device)
            hf_loss = self.hf.eval()(pixel_values=x, pixel_mask=mask,
                                     labels=hf_labels(self.targets)).loss.item()
            ours = self.criterion.total(self.criterion(self.ours.eval()(x), self.targets)).item()
        report["loss"] = {"transformers": hf_loss, "ddetr": ours,
                          "relative_difference": abs(hf_loss - ours) / max(abs(hf_loss), 1e-12)}
        return report


def _largest_differences(logits: torch.Tensor, boxes: torch.Tensor, ours: dict) -> dict:
    """Largest |difference| of ddetr's outputs ``ours`` (any dtype) from logits / boxes."""
    return {"logits": (ours["pred_logits"].float() - logits).abs().max().item(),
            "boxes": (ours["pred_boxes"].float() - boxes).abs().max().item()}


# ---------------------------------------------------------------- the per-part profile

@contextlib.contextmanager
def _part(name: str):
    """A profiler range; on CUDA synchronised at both ends so its CPU time is the GPU's."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.synchronize()
    with torch.profiler.record_function(f"part::{name}"):
        yield
        if cuda:
            torch.cuda.synchronize()


def _labelled(name: str, fn):
    def call(*args, **kwargs):
        with _part(name):
            return fn(*args, **kwargs)
    return call


@contextlib.contextmanager
def part_labels(model, criterion):
    """Wraps ddetr's parts in profiler ranges for the duration of the block."""
    patched = [(model.backbone[0], "forward", "backbone"),
               (model.backbone[1], "forward", "backbone"),
               (model.transformer.encoder, "forward", "encoder"),
               (model.transformer.decoder, "forward", "decoder"),
               (criterion.matcher, "forward", "matching"),
               (deformable_transformer, "flatten_multiscale", "flattening"),
               (deformable_transformer, "encoder_reference_points", "flattening")]
    patched += [(proj, "forward", "input projection") for proj in model.input_proj]
    saved = []
    for owner, attr, name in patched:
        had = attr in vars(owner)
        saved.append((owner, attr, had, getattr(owner, attr)))
        setattr(owner, attr, _labelled(name, getattr(owner, attr)))
    model_forward = model.forward
    model.forward = _labelled("model", model_forward)
    try:
        yield
    finally:
        del model.forward
        for owner, attr, had, original in reversed(saved):
            if had:
                setattr(owner, attr, original)
            else:
                delattr(owner, attr)


def breakdown(step, model, criterion, device) -> dict:
    """Milliseconds per part of one call of ``step`` under torch.profiler."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with part_labels(model, criterion), torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        total = (time.perf_counter() - t0) * 1e3
    ms = {}
    for event in prof.key_averages():
        if event.key.startswith("part::"):
            # on CUDA a range is also listed as a GPU annotation with no CPU time
            ms[event.key[6:]] = max(ms.get(event.key[6:], 0.0), event.cpu_time_total / 1e3)
    inside = sum(ms.get(p, 0.0) for p in ("backbone", "input projection", "flattening",
                                          "encoder", "decoder"))
    if "model" in ms:
        ms["heads"] = max(0.0, ms.pop("model") - inside)
    if "criterion" in ms and "matching" in ms:
        ms["criterion"] = max(0.0, ms["criterion"] - ms["matching"])
    out = {p: ms[p] for p in PARTS if p in ms}
    out["total (profiled)"] = total
    return out


# ---------------------------------------------------------------- running and reporting

def run(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    hf, ours = build_models(device)
    work = Workload(hf, ours, our_criterion(hf), args, device)
    print("checking that both models agree ...", flush=True)
    parity = work.check_parity(args.tolerance)
    print(f"  {parity}", flush=True)
    impls = IMPLS[:2] if args.no_layers_off else IMPLS
    if args.dtype == "bfloat16":
        parity["ddetr_bfloat16_vs_float32"] = work.to_bfloat16()
        print(f"  ddetr in bfloat16 against float32: {parity['ddetr_bfloat16_vs_float32']}",
              flush=True)
        impls = ("transformers-float32",) + impls

    jobs = [(f"inference {h}x{w} b1", lambda impl, s=(h, w): work.inference(impl, s))
            for h, w in args.sizes]
    th, tw = args.train_size
    if not args.no_train:
        jobs.append((f"train step {th}x{tw} b{args.train_batch}", work.train_step))
    rows = []
    for name, make in jobs:
        row = {"measurement": name, "median_ms": {}, "times_ms": {}}
        for impl in impls:
            times = time_step(make(impl), device, args.warmup, args.repeats)
            row["times_ms"][impl], row["median_ms"][impl] = times, statistics.median(times)
            print(f"  {name:<28} {impl:<12} {row['median_ms'][impl]:10.1f} ms", flush=True)
        rows.append(row)
    if args.busy:
        _time_busy(rows[:len(args.sizes)], jobs, args, device)
    if not args.no_profile:
        for row, (name, make) in zip(rows, jobs):
            row["ddetr_parts_ms"] = breakdown(make("ddetr"), ours, work.criterion, device)
    if not args.no_memory:
        for row, (name, make) in zip(rows, jobs):
            row["peak_mb"] = {}
            for impl in impls:
                if impl == "transformers" and args.dtype == "bfloat16" and \
                        device.type == "cpu":
                    # torch's CPU grid_sample reads past the end of a bfloat16 input
                    # (seen with torch 2.13.0): harmless while the next page is mapped,
                    # a segfault under PeakMemory, which unmaps freed memory at once
                    row["memory_skipped"] = {impl: "torch's bfloat16 CPU grid_sample reads "
                                                   "out of bounds (segfault here)"}
                    continue
                step = make(impl)
                with PeakMemory(device, fixed_mmap=True) as mem:
                    step()
                row["peak_mb"][impl] = mem.peak_bytes / 2**20
                row["memory_method"] = mem.method
    return {"rows": rows, "parity": parity, "blas": blas_note()}


def _time_busy(rows: list, jobs: list, args, device) -> None:
    """Inference again with ``args.busy`` busy processes beside it: ``busy_median_ms`` of
    transformers and ddetr in each inference row."""
    with BusyProcesses(args.busy):
        for row, (name, make) in zip(rows, jobs):
            row["busy_median_ms"] = {}
            for impl in IMPLS[:2]:
                times = time_step(make(impl), device, args.warmup, args.repeats)
                row["busy_median_ms"][impl] = statistics.median(times)
                print(f"  {name:<28} {impl:<12} {row['busy_median_ms'][impl]:10.1f} ms "
                      f"with {args.busy} busy", flush=True)


def print_busy(rows: list, busy: int) -> None:
    rows = [r for r in rows if "busy_median_ms" in r]
    if not rows:
        return
    print(f"\nwith {busy} busy process(es) beside it (slowdown: busy / idle time; "
          f"speed-up: transformers / ddetr under the same load)")
    print(f"{'measurement':<28} {'implementation':<14} {'idle':>11} {'busy':>11} "
          f"{'slowdown':>9} {'speed-up':>9}")
    for r in rows:
        base = r["busy_median_ms"]["transformers"]
        for impl, t in r["busy_median_ms"].items():
            idle = r["median_ms"][impl]
            print(f"{r['measurement']:<28} {impl:<14} {idle:8.1f} ms {t:8.1f} ms "
                  f"{t / idle:8.2f}x {base / t:8.2f}x")


def print_tables(result: dict) -> None:
    rows = result["rows"]
    print()
    print(f"# ddetr's linear layers: {result['blas']}")
    impls = [i for i in ("transformers-float32",) + IMPLS if i in rows[0]["median_ms"]]
    print("(speed-up: transformers / that ddetr; mem ratio: that ddetr / transformers; "
          "ddetr-pytorch-layers: native layers off)")
    if "transformers-float32" in impls:
        print("(bfloat16 run: every row but transformers-float32 in bfloat16; speed-up against "
              "transformers in bfloat16, and in float32 after the slash; memory of "
              "transformers in bfloat16 not measured on the CPU: torch's grid_sample reads out "
              "of bounds there, so mem ratio is against transformers-float32)")
    print(f"{'measurement':<28} {'implementation':<21} {'time':>12} {'speed-up':>9}"
          f" {'peak mem':>11} {'mem ratio':>10}")
    for r in rows:
        a = r["median_ms"]["transformers"]
        a32 = r["median_ms"].get("transformers-float32")
        for impl in impls:
            b = r["median_ms"][impl]
            line = f"{r['measurement']:<28} {impl:<21} {b:9.1f} ms {a / b:8.2f}x"
            if a32 is not None:
                line += f" / {a32 / b:.2f}x"
            if impl in r.get("peak_mb", {}):
                mb = r["peak_mb"][impl]
                ma = r["peak_mb"].get("transformers", r["peak_mb"].get("transformers-float32"))
                line += f" {mb:8.0f} MB {mb / max(ma, 1e-9):10.2f}"
            print(line)
    if any("ddetr_parts_ms" in r for r in rows):
        print("\nddetr time by part (ms, one profiled call)")
        names = [r["measurement"] for r in rows]
        print(f"{'part':<18}" + "".join(f" {n:>28}" for n in names))
        for part in PARTS + ("total (profiled)",):
            vals = [r.get("ddetr_parts_ms", {}).get(part) for r in rows]
            if any(v is not None for v in vals):
                print(f"{part:<18}" + "".join(f" {'' if v is None else f'{v:.1f}':>28}"
                                              for v in vals))


def main(argv=None) -> None:
    args = parse_args(argv)
    started = datetime.datetime.now()
    result = run(args)
    print_tables(result)
    print_busy(result["rows"], args.busy)
    record = {
        "benchmark": "bench_model", "started": started.isoformat(timespec="seconds"),
        "device": device_name(args.device), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "threads": torch.get_num_threads(), "build_info": ddetr.build_info(),
        "extension_built": extension_built(),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain")),
        "args": {k: v for k, v in vars(args).items() if k != "out"}, **result}
    os.makedirs(args.out, exist_ok=True)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    tag = ("_bf16" if args.dtype == "bfloat16" else "") + ("_quick" if args.quick else "")
    path = os.path.join(args.out, f"model_{args.device}_{stamp}{tag}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
