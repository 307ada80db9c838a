"""Training: one epoch (``train_one_epoch``) and a whole run (``fit``) with
checkpoints, a JSON-lines log and COCO evaluation after each epoch."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ddetr.engine import amp as amp_mode
from ddetr.engine import builders, checkpoint, distributed
from ddetr.engine.config import write_config
from ddetr.engine.ema import WeightAverage
from ddetr.engine.evaluate import evaluate
from ddetr.engine.optim import build_optimizer

logger = logging.getLogger(__name__)

def to_device(images, mask, targets, device):
    """Moves a collated batch (and every tensor of its targets) to ``device``."""
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    return images.to(device), mask.to(device), targets


def forward(model, images, mask, targets):
    """``model(images, mask)``, with the targets for a model that takes them in training
    (DINO's denoising queries; ``model`` may be a DDP wrapper)."""
    if getattr(getattr(model, "module", model), "takes_targets", False):
        return model(images, mask, targets)
    return model(images, mask)


def train_step(model, criterion, images, mask, targets, optimizer, clip_max_norm: float,
               amp: str, scaler=None) -> dict[str, float]:
    """One optimisation step; returns the losses as floats (``loss``: the weighted total).
    A non-finite loss raises FloatingPointError (as the official code stops)."""
    with amp_mode.autocast(amp, images.device):
        outputs = forward(model, images, mask, targets)
    losses = criterion(outputs, targets)
    total = criterion.total(losses)
    values = {k: float(v.detach()) for k, v in losses.items()}
    values["loss"] = float(total.detach())
    if not math.isfinite(values["loss"]):
        raise FloatingPointError(f"loss is {values['loss']}: {values}")
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
    else:
        total.backward()
    if clip_max_norm > 0:
        values["grad_norm"] = float(nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return values


def train_one_epoch(model, criterion, loader, optimizer, device, epoch: int,
                    clip_max_norm: float = 0.1, amp: str = "off", scaler=None,
                    progress: bool = True, max_steps: int | None = None,
                    ema: WeightAverage | None = None) -> dict[str, float]:
    """Trains one pass over ``loader``; returns the epoch's mean of every logged value
    (averaged over processes), ``images_per_s`` and ``skipped_images`` (undecodable
    images met, all processes). ``ema``: a weight average of ``model`` (unwrapped from
    DDP), moved after every step."""
    model.train()
    criterion.train()
    sums: dict[str, float] = {}
    skipped: set[int] = set()
    steps, images_seen, start = 0, 0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not (progress and distributed.is_main()),
               total=min(len(loader), max_steps or len(loader)), leave=False)
    for images, mask, targets in bar:
        for t in targets:
            skipped.update(t.pop("skipped_image_ids", torch.empty(0)).tolist())
        images, mask, targets = to_device(images, mask, targets, device)
        values = train_step(model, criterion, images, mask, targets, optimizer, clip_max_norm,
                            amp, scaler)
        if ema is not None:
            ema.update(getattr(model, "module", model))
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        steps += 1
        images_seen += len(targets)
        speed = images_seen / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{values['loss']:.3f}", img_s=f"{speed:.1f}")
        if max_steps is not None and steps >= max_steps:
            break
    bar.close()
    means = {k: v / max(steps, 1) for k, v in sums.items()}
    means["skipped_images"] = float(len(skipped))
    means = distributed.mean_over_processes(means, device)
    means["skipped_images"] = round(means["skipped_images"] * distributed.world_size())
    means["images_per_s"] = images_seen * distributed.world_size() / (time.perf_counter() - start)
    return means


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_enough_images(num_images: int, batch_size: int, world_size: int, source: str) -> None:
    """Raises ``ValueError`` if no process would get one full batch: the training loader
    drops the incomplete last batch, so an epoch would have no step."""
    if batch_size < 1:
        raise ValueError(f"batch_size: expected at least 1, got {batch_size}")
    per_process = math.ceil(num_images / world_size)
    if per_process < batch_size:
        shared = f" shared by {world_size} processes" if world_size > 1 else ""
        raise ValueError(f"batch_size: the training set ({source}) has {num_images} "
                         f"image(s){shared}, fewer than --batch_size {batch_size} per process; "
                         f"incomplete batches are dropped, so no training step would run: "
                         f"lower --batch_size or add images")


def setup(config) -> SimpleNamespace:
    """Process group, seeds, data, model, criterion, optimiser and the resumed state of a
    run, as the attributes of a namespace; writes ``output_dir/config.json``."""
    distributed.init_from_env(distributed.pick_device(config.device).type)
    device = distributed.pick_device(config.device)  # under torchrun: this process's GPU
    os.makedirs(config.output_dir, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed + distributed.rank())
    paths = builders.dataset_paths(config) if distributed.is_main() else None
    paths = distributed.broadcast_object(paths)  # rank 0 generates the synthetic data once
    train_set, val_set = builders.build_datasets(paths, config.num_classes, config.base_size,
                                                 config.max_size)
    check_enough_images(len(train_set), config.batch_size, distributed.world_size(),
                        paths["train_annotations"])
    num_classes = config.num_classes or builders.infer_num_classes(train_set)
    model = builders.build_model(config, num_classes).to(device)
    optimizer, scheduler = build_optimizer(model, config.lr, config.lr_backbone,
                                           config.lr_linear_proj_mult, config.weight_decay,
                                           config.lr_drop)
    mode = amp_mode.resolve(config.amp, device)
    run = SimpleNamespace(config=config, device=device, train_set=train_set, val_set=val_set,
                          model=model, criterion=builders.build_criterion(config, num_classes),
                          optimizer=optimizer, scheduler=scheduler, amp=mode,
                          scaler=amp_mode.grad_scaler(mode, device), start_epoch=0,
                          ema=WeightAverage(model, config.ema_decay) if config.ema_decay else None)
    _resume(run)
    run.ddp_model = model
    if distributed.is_distributed():
        ids = [device.index] if device.type == "cuda" else None
        run.ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    run.train_loader = builders.train_loader(train_set, config.batch_size, config.seed,
                                             config.num_workers, distributed.rank(),
                                             distributed.world_size())
    if distributed.is_main():
        write_config(config, config.output_dir)  # --config on it repeats the run
    return run


def _resume(run: SimpleNamespace) -> None:
    if not run.config.resume:
        return
    state = checkpoint.read_checkpoint(run.config.resume, run.config.trust_pickle)
    run.start_epoch = checkpoint.resume(state, run.model, run.optimizer, run.scheduler,
                                        run.scaler, rank=distributed.rank(), ema=run.ema)
    logger.info("resumed from %s at epoch %d", run.config.resume, run.start_epoch)


def fit(config, on_epoch=None, max_steps_per_epoch: int | None = None) -> dict:
    """Trains as ``config`` (a ``TrainConfig``) says; returns the last epoch's log record
    (with ``coco_eval_bbox``, the 12 COCO numbers, when evaluated). ``on_epoch(record)``
    is called after every epoch; ``max_steps_per_epoch`` shortens epochs (for tests)."""
    run = setup(config)
    record: dict = {}
    for epoch in range(run.start_epoch, config.epochs):
        record = run_epoch(run, epoch, max_steps_per_epoch)
        if on_epoch is not None:
            on_epoch(record)
    return record


def run_epoch(run: SimpleNamespace, epoch: int, max_steps: int | None) -> dict:
    """Train, step the lr, evaluate when due, then log and checkpoint (in that order, so
    the saved generators are those the next epoch starts from)."""
    config, start = run.config, time.perf_counter()
    run.train_loader.sampler.set_epoch(epoch)
    stats = train_one_epoch(run.ddp_model, run.criterion, run.train_loader, run.optimizer,
                            run.device, epoch, config.clip_max_norm, run.amp, run.scaler,
                            config.progress, max_steps, run.ema)
    run.scheduler.step()
    distributed.broadcast_buffers(run.model)  # every process evaluates the same model
    if run.ema is not None:
        distributed.broadcast_buffers(run.ema.module)
    record = {"epoch": epoch, **{f"train_{k}": v for k, v in stats.items()},
              "lr": run.optimizer.param_groups[0]["lr"]}
    due = (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs
    if run.val_set is not None and due:
        evaluated = run.model if run.ema is None else run.ema.module
        result = evaluate(evaluated, run.val_set, run.device, config.batch_size,
                          config.num_workers, run.amp, config.progress)
        record["coco_eval_bbox"] = result["stats"]
        record["bad_val_images"] = result["bad_images"]
    record["epoch_time_s"] = time.perf_counter() - start
    rng_states = distributed.all_gather_objects(checkpoint.rng_state())
    if distributed.is_main():
        _log(config.output_dir, record)
        saved = {"train": config.to_dict(), "model": run.model.config,
                 "categories": run.train_set.coco.dataset["categories"]}
        checkpoint.save_checkpoint(os.path.join(config.output_dir, "checkpoint.pth"), run.model,
                                   run.optimizer, run.scheduler, epoch, saved, run.scaler,
                                   rng_states, run.ema)
    return record


def _log(output_dir: str, record: dict) -> None:
    with open(os.path.join(output_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    logger.info("epoch %d: %s", record["epoch"], record)
