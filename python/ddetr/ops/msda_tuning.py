"""Per-machine settings of the CPU MSDA kernels: how far ahead they prefetch.

The kernels gather (and in the backward scatter) rows of the value map around every
sampling point, a window larger than L2, so they prefetch by hand: the corners a few
samples on, and in the backward the next queries' inputs. How far ahead pays depends on
the CPU (its memory latency, its out-of-order window, its hardware prefetchers), so the
distances are run-time settings, never a constant one CPU liked:

* ``tune_msda()`` measures them on this machine (a short search at an encoder-sized
  call; ``ddetr tune`` from the shell) and saves them per CPU in
  ``$DDETR_CACHE/msda_tuning.json`` (``DDETR_CACHE`` defaulting to ``~/.cache/ddetr``);
* ``import ddetr`` applies the saved settings of this CPU and build, if there are any,
  else the kernels' defaults (measured on a Zen 5);
* ``DDETR_MSDA_TUNING`` overrides both: ``off`` (the defaults, nothing read), or
  ``name=value,...`` with the names of ``msda_tuning()``; ``vector_pass=generic`` /
  ``avx2`` / ``avx512`` forces the per-sample channel loops of the forward and the
  backward (for tests: the passes add the corners in different orders).

A prefetch changes no result: every setting gives the same bits. The vector pass
does (in the last bits), so tuning never changes it.
"""

from __future__ import annotations

import json
import os
import statistics
import time
import warnings
from datetime import datetime, timezone

import torch

from ddetr import _cpu, _native

ENV = "DDETR_MSDA_TUNING"
DISTANCES = ("corners_ahead_forward", "corners_ahead_backward", "queries_ahead")
# what tune_msda tries for each distance (0: no prefetch)
CANDIDATES = {"corners_ahead_forward": (0, 8, 16, 32, 64),
              "corners_ahead_backward": (0, 4, 8, 16, 32),
              "queries_ahead": (0, 2, 4, 8, 16)}
# a candidate replaces the current value only when its median is this much faster: on a
# shared machine smaller differences are noise, and the defaults stay put
MIN_GAIN = 0.03

_source = "default"  # where the settings in force came from (msda_tuning()["source"])


def _native_msda():
    if not _native.available():
        raise RuntimeError(f"the native extension is not available: {_native.IMPORT_ERROR}")
    from ddetr._native import msda
    return msda


def machine_key() -> str:
    """This CPU and build: saved settings are applied only where both match."""
    flags = _native.build_info().get("cpu_arch_flags", "")
    return f"{_cpu.describe()} | {flags or 'portable'}"


def cache_path() -> str:
    base = os.environ.get("DDETR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                         "ddetr")
    return os.path.join(base, "msda_tuning.json")


def msda_tuning() -> dict:
    """The settings in force: ``corners_ahead_forward``, ``corners_ahead_backward``,
    ``queries_ahead`` (samples / queries; 0 = no prefetch), ``vector_pass`` (``auto``
    unless forced), ``passes`` (what this build has) and ``source`` (``default``,
    ``cache``, ``tuned``, ``env`` or ``set``)."""
    msda = _native_msda()
    return {**msda.cpu_tuning(), "passes": msda.cpu_passes(), "source": _source}


def set_msda_tuning(**settings) -> dict:
    """Changes some settings (the names of ``msda_tuning()``; the others stay) and
    returns them all. ValueError naming a setting that is unknown or out of range."""
    global _source
    msda = _native_msda()
    current = msda.cpu_tuning()
    for name, value in settings.items():
        if name not in current:
            raise ValueError(f"{name}: not an MSDA setting (expected one of "
                             f"{', '.join(current)})")
        if name == "vector_pass":
            allowed = ["auto", *msda.cpu_passes()]
            if value not in allowed:
                raise ValueError(f"vector_pass: expected one of {allowed} (what this build "
                                 f"runs on this CPU), got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 256:
            raise ValueError(f"{name}: expected an int in [0, 256], got {value!r}")
    current.update(settings)
    msda.set_cpu_tuning(**current)
    _source = "set"
    return msda_tuning()


def _parse_env(text: str) -> dict:
    settings = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{ENV}: expected 'off' or name=value pairs, got {item!r}")
        name, value = name.strip(), value.strip()
        settings[name] = value if name == "vector_pass" else _int(name, value)
    return settings


def _int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{ENV}: {name} expects an int, got {value!r}") from None


def _read_cache() -> dict:
    try:
        with open(cache_path()) as f:
            saved = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        warnings.warn(f"{cache_path()}: cannot be read ({e}); the MSDA kernels use their "
                      "defaults (run ddetr tune to write it again)", stacklevel=3)
        return {}
    return saved if isinstance(saved, dict) else {}


def apply_saved() -> str:
    """At import: ``DDETR_MSDA_TUNING``, else this machine's saved settings, else the
    defaults. Returns the source. A bad variable raises (it was asked for); an unreadable
    or foreign cache entry warns and is ignored."""
    global _source
    if not _native.available():
        return _source
    text = os.environ.get(ENV, "").strip()
    if text.lower() == "off":
        _source = "default"
        return _source
    if text:
        settings = _parse_env(text)  # (its errors name the variable)
        try:
            set_msda_tuning(**settings)
        except ValueError as e:  # name the variable the setting came from
            raise ValueError(f"{ENV}: {e}") from None
        _source = "env"
        return _source
    entry = _read_cache().get(machine_key())
    if entry:
        try:
            set_msda_tuning(**{k: entry["settings"][k] for k in DISTANCES})
            _source = "cache"
        except (KeyError, TypeError, ValueError) as e:
            warnings.warn(f"{cache_path()}: the entry for this machine is not usable ({e}); "
                          "the MSDA kernels use their defaults", stacklevel=2)
    return _source


def _steps(image: tuple[int, int], seed: int = 0):
    """A forward and a forward+backward of an encoder-sized call (every token a query,
    8 heads of 32, 4 levels, 4 points, locations near each query's own position)."""
    from ddetr.ops.msda import ms_deform_attn

    gen = torch.Generator().manual_seed(seed)
    levels = [(-(-image[0] // s), -(-image[1] // s)) for s in (8, 16, 32, 64)]
    tokens = sum(h * w for h, w in levels)
    m, d, p = 8, 32, 4
    value = torch.randn(1, tokens, m, d, generator=gen)
    # each query samples near its own position: its pixel's centre on every level
    centres = torch.cat([torch.stack(torch.meshgrid((torch.arange(h) + 0.5) / h,
                                                    (torch.arange(w) + 0.5) / w,
                                                    indexing="ij")[::-1], -1).view(-1, 2)
                         for h, w in levels])
    jitter = 0.02 * torch.randn(1, tokens, m, len(levels), p, 2, generator=gen)
    loc = (centres[None, :, None, None, None] + jitter).clamp(-0.1, 1.1)
    attn = torch.rand(1, tokens, m, len(levels), p, generator=gen)
    attn = attn / attn.sum((-1, -2), keepdim=True)
    shapes = torch.tensor(levels)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    grad_out = torch.randn(1, tokens, m * d, generator=gen)

    def forward():
        with torch.no_grad():
            ms_deform_attn(value, shapes, starts, loc, attn)

    leaves = [t.requires_grad_() for t in (value.clone(), loc.clone(), attn.clone())]

    def backward():
        out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2])
        torch.autograd.grad(out, leaves, grad_out)

    return forward, backward


def _time_round_robin(step, name: str, values, base: dict, repeats: int, bar) -> dict:
    """Median seconds of ``step`` under each value of setting ``name``, the values
    taking turns call by call so that the machine's drift hits them alike."""
    msda = _native_msda()
    times = {v: [] for v in values}
    for _ in range(repeats):
        for v in values:
            msda.set_cpu_tuning(**{**base, name: v})
            start = time.perf_counter()
            step()
            times[v].append(time.perf_counter() - start)
            if bar is not None:
                bar.update(1)
    msda.set_cpu_tuning(**base)
    return {v: statistics.median(t) for v, t in times.items()}


def tune_msda(image: tuple[int, int] = (800, 1333), repeats: int = 7, save: bool = True,
              progress: bool = True) -> dict:
    """Measures the prefetch distances on this machine, one setting at a time (each
    candidate against the others, round robin, median of ``repeats`` calls), applies
    the best and (``save``) writes them to the cache for this CPU and build. A candidate
    replaces the current value only when it is at least 3% faster. Returns
    ``{"settings", "times_ms" (per setting, per candidate), "machine", "threads"}``.

    ``image``: (H, W) of the encoder call timed (the E1 benchmark's 800x1333 by
    default: about 22k queries, a minute or two on 2 cores)."""
    from tqdm import tqdm

    global _source
    if (not isinstance(image, (tuple, list)) or len(image) != 2
            or not all(isinstance(v, int) and v >= 64 for v in image)):
        raise ValueError(f"image: expected (H, W), ints of at least 64, got {image!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats: expected a positive int, got {repeats!r}")
    msda = _native_msda()
    forward, backward = _steps(tuple(image))
    base = msda.cpu_tuning()
    calls = sum(len(c) for c in CANDIDATES.values()) * repeats + 2
    bar = tqdm(total=calls, desc="tune msda", disable=not progress)
    forward(), backward()  # (warm-up: first-touch of the buffers, thread team)
    bar.update(2)
    times = {}
    for name in DISTANCES:
        step = forward if name == "corners_ahead_forward" else backward
        medians = _time_round_robin(step, name, CANDIDATES[name], base, repeats, bar)
        times[name] = {str(v): 1000 * t for v, t in medians.items()}
        best = min(medians, key=medians.get)
        if medians[best] < (1 - MIN_GAIN) * medians.get(base[name], float("inf")):
            base[name] = best
    bar.close()
    msda.set_cpu_tuning(**base)
    _source = "tuned"
    result = {"settings": {k: base[k] for k in DISTANCES}, "times_ms": times,
              "machine": machine_key(), "threads": torch.get_num_threads(),
              "image": list(image),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if save:
        saved = _read_cache()
        saved[machine_key()] = result
        os.makedirs(os.path.dirname(cache_path()), exist_ok=True)
        tmp = cache_path() + ".tmp"
        with open(tmp, "w") as f:
            json.dump(saved, f, indent=1)
        os.replace(tmp, cache_path())
    return result
