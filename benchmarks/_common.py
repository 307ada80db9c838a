"""Shapes, inputs, timed calls and peak-memory probes for ``bench_msda.py``.

Everything here runs inside one measurement (normally a fresh worker process), so it
imports torch eagerly; the driver only needs the shape tables and ``measure``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import ddetr
from ddetr import _native
from ddetr.ops import ms_deform_attn, ms_deform_attn_reference

HEADS, HEAD_DIM, POINTS = 8, 32, 4
STRIDES = (8, 16, 32, 64)      # the four levels Deformable DETR takes from the backbone
NOISE_PX = 2.0                 # std of the per-level, per-point offset, in pixels of that level
LOC_KINDS = ("realistic", "uniform")
IMPLS = ("native", "native-bf16v", "reference", "dense")
PASSES = ("fwd", "fwd+bwd")
SEED = 0


# ---------------------------------------------------------------- shapes

def image_levels(height: int, width: int) -> list[list[int]]:
    """(H_l, W_l) of each level: the image size divided by the stride, rounded up."""
    return [[-(-height // s), -(-width // s)] for s in STRIDES]


def make_shape(name: str, image, batch: int = 1, queries: int | None = None) -> dict:
    """A benchmark geometry; ``queries=None`` means every token is a query (the encoder)."""
    levels = image_levels(*image)
    tokens = sum(h * w for h, w in levels)
    return {"name": name, "image": list(image), "batch": batch, "levels": levels,
            "tokens": tokens, "queries": queries or tokens, "all_tokens": queries is None,
            "heads": HEADS, "head_dim": HEAD_DIM, "points": POINTS}


def standard_shapes(quick: bool) -> dict[str, list[dict]]:
    """Shape groups by CLI name; ``quick`` swaps in tiny images for a smoke run."""
    image = (96, 128) if quick else (800, 1333)
    sweep = ([(64, 64), (96, 128)] if quick else
             [(256, 256), (384, 384), (512, 512), (640, 640), (800, 800), (800, 1333)])
    return {"E1": [make_shape("E1", image)],
            "E2": [make_shape("E2", image, batch=2)],
            "D1": [make_shape("D1", image, queries=50 if quick else 300)],
            "sweep": [make_shape(f"{h}x{w}", (h, w)) for h, w in sweep]}


def geometry_key(shape: dict) -> tuple:
    """Two shapes with the same key measure exactly the same thing (E1 and sweep 800x1333)."""
    return (shape["batch"], tuple(map(tuple, shape["levels"])), shape["queries"],
            shape["all_tokens"])


def gather_bytes(shape: dict, impl: str, pass_: str, dtype: torch.dtype) -> int:
    """Nominal bytes of value read by the bilinear gathers: 4 corners x D per sample.

    fwd+bwd counts three sweeps (forward gather, backward gather, backward scatter-add).
    """
    elem = 2 if impl == "native-bf16v" else torch.empty((), dtype=dtype).element_size()
    samples = (shape["batch"] * shape["queries"] * shape["heads"] * len(shape["levels"])
               * shape["points"])
    return samples * 4 * shape["head_dim"] * elem * (3 if pass_ == "fwd+bwd" else 1)


# ---------------------------------------------------------------- inputs

def query_positions(shape: dict, gen: torch.Generator) -> torch.Tensor:
    """(Lq, 2) normalised (x, y) of each query.

    Encoder: every token is a query at the centre of its own pixel on its own level.
    Decoder: 300 learnt reference points, which end up spread over the image: uniform.
    """
    if not shape["all_tokens"]:
        return torch.rand(shape["queries"], 2, generator=gen)
    parts = []
    for h, w in shape["levels"]:
        y, x = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w,
                              indexing="ij")
        parts.append(torch.stack([x, y], dim=-1).reshape(-1, 2))
    return torch.cat(parts)


def sampling_locations(shape: dict, kind: str, gen: torch.Generator) -> torch.Tensor:
    """(N, Lq, M, L, P, 2) locations: 'realistic' (own position + a few pixels of noise
    on every level) or 'uniform' (uniform in [0, 1], the cache-hostile worst case)."""
    size = (shape["batch"], shape["queries"], shape["heads"], len(shape["levels"]),
            shape["points"], 2)
    if kind == "uniform":
        return torch.rand(size, generator=gen)
    ref = query_positions(shape, gen)[None, :, None, None, None, :]
    # One pixel of each level in normalised units, shaped (L, 1, 2) to broadcast over P.
    pixel = torch.tensor([[1.0 / w, 1.0 / h] for h, w in shape["levels"]])[:, None, :]
    return ref + torch.randn(size, generator=gen) * (NOISE_PX * pixel)


def msda_steps(shape: dict, impl: str, grad: bool, dtype, device) -> dict:
    """One callable per location kind, each running the op once (and its backward)."""
    gen = torch.Generator().manual_seed(SEED)
    n, lq, m, d = shape["batch"], shape["queries"], shape["heads"], shape["head_dim"]
    levels, points = shape["levels"], shape["points"]
    value_dtype = torch.bfloat16 if impl == "native-bf16v" else dtype
    # Locations and weights stay float32 (float64 for float64 runs): what the op computes in.
    side_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    value = torch.randn(n, shape["tokens"], m, d, generator=gen).to(device, value_dtype)
    logits = torch.randn(n, lq, m, len(levels) * points, generator=gen)
    attn = logits.softmax(-1).view(n, lq, m, len(levels), points).to(device, side_dtype)
    locs = {k: sampling_locations(shape, k, gen).to(device, side_dtype) for k in LOC_KINDS}
    grad_out = torch.randn(n, lq, m * d, generator=gen).to(device, value_dtype)
    spatial = torch.tensor(levels, dtype=torch.int64, device=device)
    start = torch.cat([spatial.new_zeros(1), spatial.prod(1).cumsum(0)[:-1]])
    fn = ms_deform_attn_reference if impl == "reference" else ms_deform_attn
    return {kind: _make_step(fn, (value, spatial, start, loc, attn), (value, loc, attn),
                             grad_out, grad)
            for kind, loc in locs.items()}


def dense_steps(shape: dict, grad: bool, dtype, device) -> dict:
    """SDPA over all tokens as DETR's encoder (q = k = v = tokens), or Lq queries over them."""
    gen = torch.Generator().manual_seed(SEED)
    n, m, d = shape["batch"], shape["heads"], shape["head_dim"]
    tokens = torch.randn(n, m, shape["tokens"], d, generator=gen).to(device, dtype)
    q = tokens if shape["all_tokens"] else torch.randn(
        n, m, shape["queries"], d, generator=gen).to(device, dtype)
    grad_out = torch.randn(n, m, shape["queries"], d, generator=gen).to(device, dtype)
    leaves = (tokens,) if q is tokens else (q, tokens)
    return {"dense": _make_step(F.scaled_dot_product_attention, (q, tokens, tokens), leaves,
                                grad_out, grad)}


def _make_step(fn, args, leaves, grad_out, grad: bool):
    """fwd: inference (no autograd graph kept). fwd+bwd: gradients of all leaves, discarded
    right away so one step's peak memory never includes the previous step's gradients."""
    if not grad:
        def step():
            with torch.no_grad():
                fn(*args)
        return step
    for t in leaves:
        t.requires_grad_(True)

    def step():
        torch.autograd.grad(fn(*args), leaves, grad_out)
    return step


# ---------------------------------------------------------------- timing and memory

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            begin, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            begin.record()
            step()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


class BusyProcesses:
    """``count`` other processes that each keep one core busy (a Python loop) while the
    block runs: the load a data-loader worker or a second job puts on the machine.
    They are started before the block and killed after it."""

    def __init__(self, count: int):
        self.count, self.procs = count, []

    def __enter__(self):
        loop = "while True:\n    pass\n"
        self.procs = [subprocess.Popen([sys.executable, "-c", loop]) for _ in range(self.count)]
        time.sleep(0.5)  # let the scheduler see them
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait()
        self.procs = []


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return None


def release_heap(fixed_mmap: bool) -> None:
    """Make RSS follow live tensors (glibc): free heap memory goes back to the OS now, and,
    with ``fixed_mmap``, every allocation of 64 KiB or more is mmapped from here on, so it
    is unmapped when freed. By default glibc raises that threshold after the first big free
    and keeps later tensors on the heap, where a call can reuse memory freed by input
    building without the high-water mark moving. This changes allocation costs, so it is
    only done after the timing, in a worker process that ends right after."""
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return  # not glibc: figures may read low
    if fixed_mmap:
        libc.mallopt(-3, 64 * 1024)   # M_MMAP_THRESHOLD; also turns off the dynamic raise
    libc.malloc_trim(0)


class PeakMemory:
    """Peak memory growth over a ``with`` block.

    CUDA: the caching allocator's ``max_memory_allocated`` minus what was allocated at entry
    (the inputs). CPU: torch's CPU allocations bypass tracemalloc, so this is the growth of
    the resident set's high-water mark (VmHWM) over the resident set at entry; writing 5 to
    /proc/self/clear_refs resets the mark, so one process can measure several blocks. Where
    that is not allowed it falls back to ``ru_maxrss``, which only works once per process.
    """

    def __init__(self, device: torch.device, fixed_mmap: bool = False):
        self.device, self.fixed_mmap, self.peak_bytes = device, fixed_mmap, None

    def __enter__(self):
        _sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda max_memory_allocated - allocated inputs"
            return self
        release_heap(self.fixed_mmap)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _proc_status_kb("VmRSS") * 1024
            self.method = "VmHWM growth over VmRSS at start (clear_refs reset)"
        except OSError:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.method = "ru_maxrss growth"
        return self

    def __exit__(self, *exc):
        _sync(self.device)
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("VmHWM"):
            peak = _proc_status_kb("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak_bytes = max(0, peak - self.base)
        return False


def limit_address_space(fraction: float = 0.85) -> None:
    """Turn a CPU allocation beyond the free RAM into a catchable RuntimeError rather than
    a visit from the OOM killer (which might pick another process). CPU workers only:
    CUDA reserves far more address space than it uses."""
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    limit = (_proc_status_kb("VmSize") + int(fraction * info["MemAvailable"])) * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or limit < hard:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return (isinstance(exc, MemoryError) or "out of memory" in text
            or "can't allocate memory" in text or "cannot allocate memory" in text)


def measure(spec: dict) -> dict:
    """Time and memory of one (shape, impl, pass): ``{"ok", "times_ms", "peak_mb", ...}``."""
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    shape, impl, grad = spec["shape"], spec["impl"], spec["pass"] == "fwd+bwd"
    result = {"ok": True, "times_ms": {}, "median_ms": {}, "peak_mb": {}}
    build = (lambda shp: dense_steps(shp, grad, dtype, device)) if impl == "dense" else (
        lambda shp: msda_steps(shp, impl, grad, dtype, device))
    try:
        # Prime on a tiny input first: the op's first call imports torch._dynamo (seconds,
        # ~70 MB of RSS), which is neither the op's time nor its memory.
        for step in build(make_shape("prime", (64, 64))).values():
            step()
        steps = build(shape)
        if spec.get("isolated") and device.type == "cpu":
            limit_address_space()
        for kind, step in steps.items():
            times = time_step(step, device, spec["warmup"], spec["repeats"])
            result["times_ms"][kind] = times
            result["median_ms"][kind] = statistics.median(times)
        # Memory last, one more call each, once every timing is done (see release_heap).
        for kind, step in steps.items():
            with PeakMemory(device, fixed_mmap=spec.get("isolated", False)) as mem:
                step()
            result["peak_mb"][kind] = mem.peak_bytes / 2**20
            result["memory_method"] = mem.method
    except (RuntimeError, MemoryError) as exc:
        return _failure(exc, device)
    return result


def _failure(exc: BaseException, device: torch.device) -> dict:
    """The result of a measurement that raised (CUDA's cache emptied for the next one)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reason = "out of memory" if _is_oom(exc) else "failed"
    return {"ok": False, "error": f"{reason}: {str(exc).splitlines()[0][:160]}"}


def measure_paired(spec: dict) -> dict:
    """The native op (``spec["impl"]``) against the grid_sample reference on the same
    inputs (realistic locations), taking turns: each of ``spec["rounds"]`` rounds times
    ``spec["repeats"]`` native calls (their median) and then one reference call, and
    keeps their ratio. A change in the machine's speed over the minutes a run takes
    (this VM's is up to 2x) then slows both sides of each ratio alike, where rows timed
    one after the other, in their own processes, meet it at different times.
    ``{"ok", "ratios", "x_ref" (their median), "native_ms", "reference_ms"}``."""
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    grad = spec["pass"] == "fwd+bwd"
    try:
        for impl in (spec["impl"], "reference"):  # see measure: the first call's imports
            for step in msda_steps(make_shape("prime", (64, 64)), impl, grad, dtype,
                                   device).values():
                step()
        native = msda_steps(spec["shape"], spec["impl"], grad, dtype, device)["realistic"]
        reference = msda_steps(spec["shape"], "reference", grad, dtype, device)["realistic"]
        time_step(native, device, spec["warmup"], 0)
        time_step(reference, device, spec["warmup"], 0)
        native_ms, reference_ms = [], []
        for _ in range(spec["rounds"]):
            native_ms.append(statistics.median(time_step(native, device, 0, spec["repeats"])))
            reference_ms.append(time_step(reference, device, 0, 1)[0])
    except (RuntimeError, MemoryError) as exc:
        return _failure(exc, device)
    ratios = [r / n for r, n in zip(reference_ms, native_ms)]
    return {"ok": True, "ratios": ratios, "x_ref": statistics.median(ratios),
            "native_ms": native_ms, "reference_ms": reference_ms}


# ---------------------------------------------------------------- environment

def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    # name, family, model and vector extensions, and the logical CPU count
    return f"{ddetr.build_info()['cpu']}, {os.cpu_count()} logical CPUs"


def blas_note() -> str:
    """Which OpenBLAS kernels ddetr's CPU linear layers run, and whether the environment
    chose them (OPENBLAS_CORETYPE): an AVX2 core forced on an AVX-512 machine halves the
    speed of every GEMM, so a result means little without it."""
    core = ddetr.build_info().get("blas") or "none (torch's matmul)"
    forced = os.environ.get("OPENBLAS_CORETYPE")
    chooser = f"OPENBLAS_CORETYPE={forced}" if forced else "chosen by OpenBLAS"
    return f"OpenBLAS kernels: {core} ({chooser})"


def git(*cmd: str) -> str | None:
    """Output of a git command in this checkout, or None (no git, not a checkout)."""
    try:
        out = subprocess.run(["git", *cmd], cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def extension_built() -> str | None:
    """When the installed extension was built: the commit alone does not say whether the
    installed package matches the checkout."""
    try:
        path = _native.extension_path()
        return datetime.datetime.fromtimestamp(os.path.getmtime(path)).isoformat(
            timespec="seconds")
    except (AttributeError, OSError, TypeError):
        return None


def write_result(out_dir: str, name: str, data: dict) -> str:
    """Writes ``data`` as ``<out_dir>/<name>_<YYYYmmdd-HHMMSS>.json``; returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}_{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    print("wrote " + path, file=sys.stderr)
    return path
