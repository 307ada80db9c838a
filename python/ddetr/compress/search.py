"""The search of ``ddetr compress``: every technique alone at each of its settings, then
a greedy combination by speed gained per AP lost while the AP drop stays within
``max_ap_drop``. Everything is measured (pycocotools AP on the validation images,
batch-1 latency), nothing assumed."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ddetr.compress import calibrate, sparse, techniques
from ddetr.compress.distill import distill
from ddetr.compress.int8 import int8_ready, to_int8
from ddetr.compress.measure import accuracy, latency
from ddetr.models.deformable_transformer import TooFewTokens

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    """One technique at one setting; ``apply`` returns the new model."""
    technique: str
    setting: str
    apply: Callable = field(compare=False, repr=False)

    @property
    def name(self) -> str:
        """How the report's ``applied`` lists name it."""
        return f"{self.technique} {self.setting}"


SCALES = (0.875, 0.75, 0.625, 0.5)  # input sizes tried, relative to the model's
PRECISION = "precision"  # these steps come last: a model after them cannot be trained


RATIOS = (0.5, 0.3, 0.2)  # encoder token ratios tried (Sparse DETR)
SCORER_SECONDS = 30.0     # training the token scorer on the calibration images


def _steps(model, usage: dict, query_counts, resize: bool, scorer: dict | None) -> list[Step]:
    """Every technique at its settings, milder first within a technique."""
    cfg, steps = model.config, []
    if resize:
        for s in SCALES:
            steps.append(Step("input size", f"x{s}",
                              lambda m, s=s: techniques.resize_inputs(m, s)))
    for k in range(cfg["num_decoder_layers"] - 1, 0, -1):
        steps.append(Step("decoder layers", str(k),
                          lambda m, k=k: techniques.truncate_decoder(m, k)))
    n = model.num_queries
    for k in sorted({max(1, round(n * f)) for f in (0.5, 0.25, 0.1)} - {n}, reverse=True):
        if cfg["two_stage"]:
            steps.append(Step("queries", str(k), lambda m, k=k: techniques.reduce_queries(m, k)))
        else:
            keep = query_counts.topk(k).indices.tolist()
            steps.append(Step("queries", str(k),
                              lambda m, k=k, keep=keep: _fewer_learned(m, k, keep)))
    for part, key in (("encoder", "enc_num_points"), ("decoder", "dec_num_points")):
        for p in range(cfg[key] - 1, 0, -1):
            arg = {f"{part[:3]}_points": p}
            steps.append(Step(f"{part} points", str(p),
                              lambda m, arg=arg: techniques.prune_points(
                                  m, usage=_usage_of(m, usage, model.feature_levels), **arg)))
    for levels in _level_sets(model, usage):
        steps.append(Step("levels", "+".join(map(str, levels)),
                          lambda m, levels=levels: techniques.drop_levels(m, levels)))
    if scorer is not None:
        for r in RATIOS:
            steps.append(Step("encoder tokens", f"rho {r}",
                              lambda m, r=r: sparse.sparsify_encoder(m, r, scorer)))
    steps.append(Step(PRECISION, "bfloat16", techniques.to_bfloat16))
    if int8_ready(model):
        steps.append(Step(PRECISION, "int8", to_int8))
    return steps


def _level_sets(model, usage: dict) -> list[list[int]]:
    """The feature levels to try keeping: the k most attended levels, and the k finest
    (without the coarsest levels the backbone stops early), for k = L-1 down to 1."""
    levels = model.feature_levels
    share = techniques.level_usage(model, usage)
    by_use = sorted(levels, key=lambda lvl: -share[lvl])
    sets = []
    for k in range(len(levels) - 1, 0, -1):
        for kept in (sorted(by_use[:k]), levels[:k]):
            if kept not in sets:
                sets.append(kept)
    return sets


def _usage_of(model, usage: dict, levels: list[int]) -> dict:
    """``point_usage`` measured on a model with feature levels ``levels``, restricted to
    the levels ``model`` kept (after ``drop_levels``)."""
    if model.feature_levels == levels:
        return usage
    positions = [levels.index(lvl) for lvl in model.feature_levels]
    return {name: u[:, positions] for name, u in usage.items()}


def _fewer_learned(model, k: int, keep: list[int]):
    # the kept indices refer to the original queries; a model already reduced keeps its own
    if model.num_queries < max(keep) + 1:
        keep = list(range(k))
    return techniques.reduce_queries(model, k, keep)


@dataclass
class Search:
    """State of one search: the validation set (``dataset_at(scale)``: at the model's
    input size times scale), how many images to time, the budget."""
    dataset_at: Callable
    latency_images: int
    device: torch.device
    max_ap_drop: float
    deadline: float
    resize: bool = True
    rows: list = field(default_factory=list)
    images: dict = field(default_factory=dict)  # scale -> the decoded latency images
    cannot_run: list = field(default_factory=list)  # the ``applied`` lists skipped
    reference: tuple | None = None  # (the original model, its latency images): the first measured

    def measure(self, model, name: str, applied: list[str]) -> dict | None:
        """The candidate's row (measured once per combination of steps), or None for a
        two-stage candidate with fewer encoder tokens than proposals on some image
        (fewer levels, a smaller input), which cannot run there."""
        for row in self.rows:
            if row["applied"] == applied:
                return row
        if applied in self.cannot_run:
            return None
        try:
            return self._measure(model, name, applied)
        except TooFewTokens as e:
            if not applied:  # the original itself
                raise
            logger.warning("compress: skipped %s: %s", name, e)
            self.cannot_run.append(applied)
            return None

    def _measure(self, model, name: str, applied: list[str]) -> dict:
        scale = techniques.input_scale(model)
        dataset = self.dataset_at(scale)
        if scale not in self.images:
            count = min(self.latency_images, len(dataset))
            self.images[scale] = [dataset[i][0] for i in range(count)]
        images = self.images[scale]
        # timed against the original, image by image: the search compares these ratios
        first = self.reference is None
        if first:
            self.reference = (model, images)
        row = {"name": name, "applied": applied, **accuracy(model, dataset, self.device),
               **latency(model, images, self.device,
                         reference=None if first else self.reference)}
        row.setdefault("relative_latency", 1.0)
        self.rows.append(row)
        return row

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline


def _score(row: dict, base: dict) -> float:
    """Speed gained per AP lost (AP gains count as a tiny loss)."""
    return (1.0 - row["relative_latency"]) / max(base["AP"] - row["AP"], 1e-4)


@dataclass
class Finetune:
    """Recovery by distillation (``ddetr.compress.distill``): ``epochs`` on
    ``train_at(scale)``, the training images with the teacher's labels and training
    transforms at the model's input size times scale; ``budgets``: the AP drops allowed
    before recovery, tried most aggressive first."""
    epochs: int
    train_at: Callable
    lr: float = 1e-4
    batch_size: int = 8
    train_config: dict | None = None
    budgets: tuple = (0.2, 0.1, 0.05)


def run_search(model, search: Search, calib: list, progress: bool = True,
               finetune: Finetune | None = None):
    """Returns ``(chosen model, its row, every row measured)``."""
    usage = calibrate.point_usage(model, calib)
    counts = None if model.config["two_stage"] else calibrate.query_usage(model, calib)
    # one scorer (trained for the middle ratio) serves every ratio
    scorer = None
    if model.config.get("encoder_token_ratio", 1.0) == 1.0:
        scorer = sparse.train_token_scorer(model, calib, RATIOS[1],
                                           time_budget=SCORER_SECONDS)
    steps = _steps(model, usage, counts, search.resize, scorer)
    tries = 2 * len(steps) + 1 + (len(finetune.budgets) if finetune else 0)
    bar = tqdm(total=tries, desc="compress", disable=not progress)
    base = search.measure(model, "original", [])
    bar.update()
    alone = []
    for step in steps:
        if search.out_of_time():
            break
        row = search.measure(step.apply(model), step.name, [step.name])
        if row is not None:
            alone.append((step, row))
        bar.update()
    chosen = _combine(model, base, alone, search, search.max_ap_drop, bar)
    if finetune is not None:
        chosen = _recover(model, base, alone, search, finetune, chosen, bar)
    bar.close()
    return chosen[0], chosen[1], search.rows


def _combine(model, base: dict, alone: list, search: Search, budget: float, bar=None,
             start=None):
    """Greedy: the steps within ``budget`` alone, best speed per AP first, each kept if
    the combination stays within ``budget`` and gets faster. ``start``: (model, row) to
    build on (default the original). Returns ``(model, row)``."""
    within = [(s, r) for s, r in alone if base["AP"] - r["AP"] <= budget
              and r["relative_latency"] < 1.0]
    within.sort(key=lambda sr: -_score(sr[1], base))
    current, current_row = start or (model, base)
    used = {s.technique for s, _ in alone if s.name in current_row["applied"]}
    for step, alone_row in within:
        if search.out_of_time():
            break
        if bar is not None:
            bar.update()
        if step.technique in used:
            continue
        trial = step.apply(current)
        applied = current_row["applied"] + [step.name]
        # on the original model a step is what was measured alone
        row = alone_row if current is model else search.measure(trial, " + ".join(applied),
                                                                 applied)
        if row is not None and base["AP"] - row["AP"] <= budget and \
                row["relative_latency"] < current_row["relative_latency"]:
            current, current_row = trial, row
            used.add(step.technique)
    return current, current_row


def _recover(model, base: dict, alone: list, search: Search, finetune: Finetune, chosen,
             bar):
    """The fastest combination found within a relaxed budget whose AP, after
    distillation, is back within ``max_ap_drop``; the precision steps are then tried on
    it. Returns ``(model, row)``: ``chosen`` (the post-hoc choice) if none pays."""
    structural = [(s, r) for s, r in alone if s.technique != PRECISION]
    tried = set()
    for budget in sorted((b for b in finetune.budgets if b > search.max_ap_drop), reverse=True):
        if search.out_of_time():
            break
        bar.update()
        student, row = _combine(model, base, structural, search, budget)
        key = tuple(row["applied"])
        if student is model or key in tried or \
                row["relative_latency"] >= chosen[1]["relative_latency"]:
            continue
        tried.add(key)
        scale = techniques.input_scale(student)
        student = distill(student, finetune.train_at(scale), finetune.epochs, finetune.lr,
                          finetune.batch_size, search.device, progress=False,
                          train_config=finetune.train_config)
        applied = [*row["applied"], f"distill {finetune.epochs} epochs"]
        row = search.measure(student, " + ".join(applied), applied)
        if row is not None and base["AP"] - row["AP"] <= search.max_ap_drop:
            precision = [(s, r) for s, r in alone if s.technique == PRECISION]
            return _combine(model, base, precision, search, search.max_ap_drop,
                            start=(student, row))
    return chosen
