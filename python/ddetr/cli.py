"""The ``ddetr`` command: ``train``, ``eval``, ``predict``, ``plot``, ``compress`` and
``export``.

``ddetr train`` with no dataset generates the synthetic shapes dataset in a cache
directory and trains the small CPU configuration on it (see ``engine/config.py``);
``--preset`` and ``--config`` set many flags at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from tqdm import tqdm

from ddetr.engine.config import (ARCH_RECIPES, PRESET_HELP, PRESETS, config_fields,
                                 make_config, read_config_file, synthetic_preset, value_type)
from ddetr.engine.evaluate import STAT_NAMES

HEADLINE = ("AP", "AP50", "AP_small")


# the first field of each group of TrainConfig fields, and the group's --help title
FLAG_GROUPS = {"coco_path": "data", "num_classes": "model",
               "set_cost_class": "matching and losses", "lr": "optimisation",
               "output_dir": "run"}


def _default_text(name: str, default, arch: str | None = None) -> str:
    """The defaults a flag's help states: the field's (or, with ``--arch``, that arch's
    recipe's) and the synthetic demo's."""
    default = ARCH_RECIPES.get(arch, {}).get(name, default)
    parts = [] if default is None else [f"default {default}"]
    demo = synthetic_preset(arch)
    if name in demo:
        parts.append(f"synthetic demo {demo[name]}")
    return f" ({'; '.join(parts)})" if parts else ""


def _add_config_flags(parser: argparse.ArgumentParser, arch: str | None = None) -> None:
    """One flag per ``TrainConfig`` field; unset flags stay out of the namespace. The help
    states the defaults of ``arch`` (the ``--arch`` given on the command line)."""
    group = parser
    for name, annotation, default, help_text in config_fields():
        if name in FLAG_GROUPS:
            group = parser.add_argument_group(FLAG_GROUPS[name])
        kind = value_type(annotation)
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        text = help_text + _default_text(name, default, arch)
        if kind is bool:
            group.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=text)
        else:
            group.add_argument(*flags, dest=name, type=kind, default=argparse.SUPPRESS,
                               metavar=name.upper(), help=text)


def _add_recipe_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "recipes", "settings come from the defaults (the paper's recipe), overridden by "
                   "--preset, overridden by --config, overridden by the flags given")
    presets = "; ".join(f"{name}: {text}" for name, text in PRESET_HELP.items())
    group.add_argument("--preset", choices=list(PRESETS), default=None, metavar="PRESET",
                       help=f"a named recipe. {presets}. Without a preset and without a "
                            f"dataset: cpu-small with --output_dir output-synthetic")
    group.add_argument("--config", default=None, metavar="FILE",
                       help="a .json (or, with PyYAML installed, .yaml) file of settings, "
                            "each flag's name as a key (and optionally \"preset\"); every "
                            "run writes its resolved settings to OUTPUT_DIR/config.json, "
                            "so --config OUTPUT_DIR/config.json repeats it")


def _arch_in(argv) -> str | None:
    """The value of ``--arch`` in ``argv`` (None without one), read before parsing so that
    ``train --arch dino --help`` states DINO's defaults."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(argv):
        if arg == "--arch" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--arch="):
            return arg.split("=", 1)[1]
    return None


def build_parser(arch: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddetr", description="Deformable DETR: train, evaluate and run detectors.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train", help="train a detector (no dataset given: the synthetic demo)",
        description="Train Deformable DETR on a COCO-format dataset. With no dataset flag, "
                    "generate the synthetic shapes dataset and train a small configuration "
                    "on it. Launch with torchrun for several processes.")
    _add_recipe_flags(train)
    _add_config_flags(train, arch)
    ev = sub.add_parser("eval", help="COCO AP of a checkpoint on a dataset")
    ev.add_argument("--checkpoint", required=True, help="a ddetr train checkpoint.pth")
    for name in ("coco_path", "val_images", "val_annotations", "cache_dir"):
        ev.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name, default=None,
                        help="dataset (default: the one the checkpoint was trained with)")
    for name, default, help_text in (("batch_size", 2, "images per step"),
                                     ("num_workers", 2, "data loading processes")):
        ev.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name, type=int,
                        default=default, help=help_text)
    _add_run_flags(ev)
    pred = sub.add_parser("predict", help="detect objects in images and draw them")
    pred.add_argument("images", nargs="+", help="image files")
    pred.add_argument("--checkpoint", required=True,
                      help="a ddetr train checkpoint.pth or a save_pretrained directory")
    pred.add_argument("--threshold", type=float, default=0.5, help="minimum score (default 0.5)")
    pred.add_argument("--output_dir", "--output-dir", dest="output_dir", default="predictions",
                      help="where the drawn PNGs go (default predictions/)")
    pred.add_argument("--show_sampling_points", "--show-sampling-points",
                      dest="show_sampling_points", action="store_true",
                      help="also draw the last decoder layer's sampling points of the top "
                           "queries on every feature level (<image>_sampling.png)")
    pred.add_argument("--top_queries", "--top-queries", dest="top_queries", type=int, default=3,
                      help="queries shown with --show-sampling-points (default 3)")
    _add_run_flags(pred, for_eval=False)
    _add_plot_parser(sub)
    _add_compress_parser(sub)
    _add_tune_parser(sub)
    _add_export_parser(sub)
    return parser


def _add_export_parser(sub) -> None:
    exp = sub.add_parser(
        "export", help="write the detector as an ONNX file (ONNX Runtime, TensorRT)",
        description="Trace the detector into an ONNX file. Inputs: images (N, 3, H, W) "
                    "float32 normalised as in training, mask (N, H, W) bool (True on "
                    "padding) and, with --with_postprocess, target_sizes (N, 2) int64. "
                    "Needs the export extra: pip install \"ddetr[export]\".")
    exp.add_argument("--checkpoint", required=True,
                     help="a ddetr train / compress checkpoint.pth or a save_pretrained directory")
    exp.add_argument("--output", required=True, help="the ONNX file to write")
    exp.add_argument("--opset", type=int, default=18, help="ONNX opset, 17 to 23 (default 18)")
    exp.add_argument("--height", type=int, default=None,
                     help="input height (default: the checkpoint's training size, 800 for a "
                          "save_pretrained directory); with --dynamic only the traced size")
    exp.add_argument("--width", type=int, default=None,
                     help="input width (default: the checkpoint's maximum size, 1333 for a "
                          "save_pretrained directory)")
    exp.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, default=1,
                     help="input batch size of a fixed-size graph (default 1)")
    exp.add_argument("--dynamic", action="store_true",
                     help="batch, height and width as dynamic axes: one file for every input "
                          "size (sides above the coarsest feature stride, 65 for 4 levels)")
    exp.add_argument("--with_postprocess", "--with-postprocess", dest="with_postprocess",
                     action="store_true",
                     help="top-K scores, labels and xyxy pixel boxes (of target_sizes) in the "
                          "graph instead of pred_logits and pred_boxes")
    exp.add_argument("--num_select", "--num-select", dest="num_select", type=int, default=100,
                     help="K, the detections per image with --with_postprocess (default 100)")
    exp.add_argument("--msda", default="standard", choices=("standard", "trt"),
                     help="standard (default): deformable attention as ONNX gathers, any "
                          "runtime; trt: TensorRT's MultiscaleDeformableAttnPlugin_TRT node "
                          "(TensorRT with that plugin only; ONNX Runtime cannot run it)")
    _add_trust_pickle(exp)


def _add_compress_parser(sub) -> None:
    comp = sub.add_parser(
        "compress", help="a faster detector at (nearly) the same AP, post hoc",
        description="Measure every compression technique (smaller inputs, decoder "
                    "truncation, fewer queries, fewer sampling points or feature levels, encoder "
                    "token sparsification, bfloat16, int8) alone on the validation images, then "
                    "combine them greedily by speed gained per AP lost while the AP drop "
                    "stays within --max_ap_drop. Writes OUTPUT_DIR/checkpoint.pth (for ddetr "
                    "eval / predict), OUTPUT_DIR/model/ (save_pretrained) and report.json / "
                    "report.png (AP against batch-1 latency).")
    comp.add_argument("--checkpoint", required=True, help="a ddetr train checkpoint.pth")
    trained = " (default: the validation set the checkpoint was trained with)"
    for name, text in (("coco_path", "a COCO root whose val2017 is the validation set" + trained),
                       ("val_images", "the validation image folder" + trained),
                       ("val_annotations", "the validation COCO annotation file" + trained),
                       ("cache_dir", "where the synthetic dataset of the checkpoint's run is "
                                     "kept (regenerated if missing; default: where ddetr train "
                                     "kept it)")):
        comp.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name, default=None,
                          help=text)
    comp.add_argument("--max_ap_drop", "--max-ap-drop", dest="max_ap_drop", type=float,
                      default=0.01, help="largest COCO AP loss accepted (default 0.01)")
    comp.add_argument("--output_dir", "--output-dir", dest="output_dir", default="compressed",
                      help="where the model and the report go (default compressed/)")
    comp.add_argument("--calib_images", "--calib-images", dest="calib_images", type=int,
                      default=16, help="validation images for the attention and query "
                                       "statistics and the token scorer (default 16)")
    comp.add_argument("--latency_images", "--latency-images", dest="latency_images", type=int,
                      default=20, help="validation images timed at batch 1 (default 20)")
    comp.add_argument("--time_budget", "--time-budget", dest="time_budget", type=float,
                      default=10.0, help="minutes after which the search starts no new "
                                         "candidate, distillations included (default 10)")
    comp.add_argument("--finetune_epochs", "--finetune-epochs", dest="finetune_epochs",
                      type=int, default=0,
                      help="recovery: also try combinations beyond --max_ap_drop after this "
                           "many epochs of distillation from the original model (its "
                           "detections on the training images as the targets; default 0: "
                           "post hoc only)")
    comp.add_argument("--finetune_lr", "--finetune-lr", dest="finetune_lr", type=float,
                      default=None, help="learning rate of the distillation (default: a "
                                         "tenth of the checkpoint's training lr)")
    for name, text in (("train_images", "the folder of the images to distill on"),
                       ("train_annotations", "a COCO file listing them (only its image list "
                                             "is read: the original model labels them)")):
        comp.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name, default=None,
                          help=f"{text}, with --finetune_epochs (default: the checkpoint's "
                               f"training set)")
    comp.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                      help="a tqdm bar over the search (default on)")
    _add_run_flags(comp, for_eval=False)


def _add_plot_parser(sub) -> None:
    plot = sub.add_parser("plot", help="draw the loss and AP curves of a training log",
                          description="Draw the training loss and the COCO AP, AP50 and "
                                      "AP_small per epoch of a ddetr train log as a PNG.")
    plot.add_argument("log", help="a training log (OUTPUT_DIR/log.jsonl)")
    plot.add_argument("--output", default="curves.png", help="the PNG (default curves.png)")
    plot.add_argument("--width", type=int, default=960, help="pixels (default 960)")
    plot.add_argument("--height", type=int, default=400, help="pixels (default 400)")


def _add_tune_parser(sub) -> None:
    tune = sub.add_parser(
        "tune", help="measure the CPU kernels' prefetch distances on this machine",
        description="Time the CPU multi-scale deformable attention kernels at an encoder-"
                    "sized call with several prefetch distances (a candidate must be 3% "
                    "faster to replace the default), and save the best for this CPU and "
                    "build in $DDETR_CACHE/msda_tuning.json (~/.cache/ddetr), where every "
                    "later 'import ddetr' on this machine applies them. No setting "
                    "changes a result. DDETR_MSDA_TUNING=off ignores the saved settings.")
    tune.add_argument("--image", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"),
                      help="the image size whose encoder call is timed (default 800 1333)")
    tune.add_argument("--repeats", type=int, default=7,
                      help="timed calls per candidate (median; default 7)")
    tune.add_argument("--threads", type=int, default=None,
                      help="CPU threads while timing (default: torch's, i.e. the cores)")
    tune.add_argument("--save", action=argparse.BooleanOptionalAction, default=True,
                      help="write the result to the cache (default on)")
    tune.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                      help="a tqdm bar (default on)")


def _add_trust_pickle(parser) -> None:
    parser.add_argument("--trust_pickle", "--trust-pickle", dest="trust_pickle",
                        action="store_true",
                        help="also load a checkpoint holding pickled Python objects (an "
                             "older ddetr's): this runs any code in the file, so only for "
                             "files you trust (default: tensors and plain data only)")


def _add_run_flags(parser, for_eval: bool = True) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    _add_trust_pickle(parser)
    if for_eval:
        parser.add_argument("--amp", default="off",
                            help="mixed precision: off (default), bf16 (autocast; the native "
                                 "layers then run in bfloat16), fp16 (CUDA, with a gradient "
                                 "scaler) or auto")
        parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                            help="tqdm progress bars (default on)")


def main(argv=None) -> int:
    args = build_parser(_arch_in(argv)).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    command = {"train": run_train, "eval": run_eval, "predict": run_predict,
               "plot": run_plot, "compress": run_compress,
               "export": run_export, "tune": run_tune}[args.command]
    try:
        return command(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        if args.verbose:
            raise
        print(f"ddetr {args.command}: error: {e}", file=sys.stderr)
        return 2


def _headline(stats) -> str:
    return ", ".join(f"{n} {stats[STAT_NAMES.index(n)]:.3f}" for n in HEADLINE)


def train_config(args):
    """The run's ``TrainConfig``: defaults < ``--preset`` < ``--config`` < the flags given."""
    explicit = {k: v for k, v in vars(args).items()
                if k not in ("command", "verbose", "preset", "config")}
    from_file = read_config_file(args.config) if args.config else None
    return make_config(explicit, args.preset, from_file)


def run_train(args) -> int:
    from ddetr.engine import distributed
    from ddetr.engine.train import fit
    config = train_config(args)
    start = time.perf_counter()

    def report(record: dict) -> None:
        if not distributed.is_main():
            return
        line = f"epoch {record['epoch']}: loss {record['train_loss']:.3f}"
        if "coco_eval_bbox" in record:
            line += ", " + _headline(record["coco_eval_bbox"])
        tqdm.write(line + f" ({record['epoch_time_s']:.0f} s)")

    if config.uses_synthetic():
        print("no dataset given: training the synthetic demo configuration")
    record = fit(config, on_epoch=report)
    if distributed.is_main():
        print(f"done in {time.perf_counter() - start:.0f} s; checkpoint, config.json and "
              f"log.jsonl in {os.path.abspath(config.output_dir)}")
        if "coco_eval_bbox" in record:
            print("final " + _headline(record["coco_eval_bbox"]))
    distributed.cleanup()
    return 0


def run_eval(args) -> int:
    from ddetr.engine.evaluate import evaluate_checkpoint
    result = evaluate_checkpoint(args.checkpoint, coco_path=args.coco_path,
                                 val_images=args.val_images, val_annotations=args.val_annotations,
                                 cache_dir=args.cache_dir, batch_size=args.batch_size,
                                 num_workers=args.num_workers, device=args.device,
                                 amp=args.amp, progress=args.progress,
                                 trust_pickle=args.trust_pickle)
    print(result["summary"].rstrip())
    for name, value in zip(STAT_NAMES, result["stats"]):
        print(f"{name:10s} {value:.4f}")
    if result["bad_images"]:
        print(f"{result['bad_images']} image(s) could not be read and were left out")
    if result["non_finite_detections"]:
        print(f"{result['non_finite_detections']} detection(s) with a non-finite score or box "
              f"were left out")
    return 0


def run_tune(args) -> int:
    import torch

    from ddetr.ops import msda_tuning
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads: expected a positive int, got {args.threads}")
        torch.set_num_threads(args.threads)
    result = msda_tuning.tune_msda(tuple(args.image), args.repeats, save=args.save,
                                   progress=args.progress)
    print(f"{result['machine']}, {result['threads']} threads, "
          f"{args.image[0]}x{args.image[1]} encoder call, median ms:")
    for name, times in result["times_ms"].items():
        row = "  ".join(f"{v}: {t:.1f}" for v, t in times.items())
        print(f"  {name:24s} {row}  -> {result['settings'][name]}")
    if args.save:
        print(f"saved to {msda_tuning.cache_path()}")
    return 0


def run_predict(args) -> int:
    from ddetr.engine.predict import detect, load_detector, read_image, save_drawings
    from ddetr.engine.distributed import pick_device
    detector = load_detector(args.checkpoint, pick_device(args.device), args.trust_pickle)
    os.makedirs(args.output_dir, exist_ok=True)
    unreadable = 0
    for path in args.images:
        try:
            image = read_image(path)
        except ValueError as e:  # undecodable, or too large to decode: go on with the rest
            print(f"ddetr predict: warning: {e} (skipped)", file=sys.stderr)
            unreadable += 1
            continue
        result = detect(detector, image, args.threshold, args.show_sampling_points)
        print(f"{path}: {len(result['scores'])} detections")
        for score, label, box in zip(result["scores"], result["labels"], result["boxes"]):
            name = detector.names.get(int(label), str(int(label)))
            coords = " ".join(f"{v:.1f}" for v in box.tolist())
            print(f"  {name:12s} {float(score):.3f}  [{coords}]")
        stem = os.path.splitext(os.path.basename(path))[0]
        for written in save_drawings(detector, image, result,
                                     os.path.join(args.output_dir, f"{stem}_pred.png"),
                                     args.top_queries):
            print(f"  wrote {written}")
    return 2 if unreadable else 0


def run_compress(args) -> int:
    from dataclasses import fields
    from ddetr.engine.compress import CompressRun, compress_checkpoint
    report = compress_checkpoint(CompressRun(**{f.name: getattr(args, f.name)
                                                for f in fields(CompressRun)}))
    o, c = report["original"], report["chosen"]
    print(f"{'candidate':42s} {'AP':>6s} {'AP50':>6s} {'AP_s':>6s} {'ms':>8s} {'speed-up':>8s}")
    for r in report["rows"]:
        print(f"{r['name'][:42]:42s} {r['AP']:6.3f} {r['AP50']:6.3f} {r['AP_small']:6.3f} "
              f"{r['latency_ms']:8.2f} {1 / r['relative_latency']:7.2f}x")
    print(f"chosen: {c['name']}: {report['speedup']:.2f}x faster at batch 1 (timed side by "
          f"side with the original), AP {o['AP']:.3f} -> {c['AP']:.3f}; wrote "
          f"{os.path.abspath(args.output_dir)}")
    print(f"the backbone, input projections and position encodings take "
          f"{100 * report['pyramid_share']:.0f}% of a forward: cuts of the transformer alone "
          f"can give at most {report['transformer_bound']:.2f}x here")
    return 0


def run_export(args) -> int:
    from ddetr.engine.predict import load_detector, require_deformable
    detector = load_detector(args.checkpoint, "cpu", args.trust_pickle)
    require_deformable(detector, args.checkpoint, "ddetr export")
    from ddetr.export import to_onnx
    height = args.height if args.height is not None else detector.base_size
    width = args.width if args.width is not None else detector.max_size
    print(f"exporting {height}x{width}{' (dynamic)' if args.dynamic else ''} with the "
          f"{args.msda} deformable attention: this takes a minute or more")
    path = to_onnx(detector.model, args.output, opset=args.opset, height=height, width=width,
                   batch_size=args.batch_size, dynamic=args.dynamic,
                   with_postprocess=args.with_postprocess, num_select=args.num_select,
                   msda=args.msda)
    print(f"wrote {os.path.abspath(path)} ({os.path.getsize(path) / 1e6:.1f} MB)")
    return 0


def run_plot(args) -> int:
    from ddetr.engine.plot import plot_log
    print(f"wrote {plot_log(args.log, args.output, args.width, args.height)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
