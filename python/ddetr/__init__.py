"""ddetr: Deformable DETR with a native (C++/CUDA) multi-scale deformable attention core."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version as _dist_version

import torch

from ddetr import _native
from ddetr.models.deformable_detr import DeformableDetr
from ddetr.models.detr import Detr
from ddetr.models.dino import Dino
from ddetr.models.ms_deform_attn import MSDeformAttn
from ddetr.ops import msda_tuning as _msda_tuning

try:
    __version__ = _dist_version("ddetr")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"

# this machine's saved prefetch distances of the CPU MSDA kernels (ddetr tune), if any
_msda_tuning.apply_saved()

__all__ = ["DeformableDetr", "Detr", "Dino", "MSDeformAttn", "build_info", "__version__"]


def build_info() -> dict:
    """How the native extension was built and what it will use at run time.

    Keys: ``version``, ``native`` (the extension imported), ``cuda`` (CUDA kernels
    compiled in), ``cuda_archs``, ``cuda_version``, ``openmp``, ``threads`` (what the
    CPU kernels use: ``torch.get_num_threads()``), ``cpu_arch_flags`` (the build's
    instruction-set flags: "-march=native", or "" for a portable build),
    ``cpu_runtime_dispatch`` (the CPU deformable-attention kernels carry a copy per
    instruction set and run the widest this CPU has, whatever ``cpu_arch_flags``; False
    only for compilers other than GCC, whose build flags decide), ``max_levels``,
    ``blas`` (the OpenBLAS kernels the CPU linear layers run, by OpenBLAS's name, e.g.
    "SkylakeX"; "" when OpenBLAS is not available; asking loads it), ``gemm_bf16_kernel``
    and ``gemm_int8_kernel`` (the kernels the bfloat16 layers and the int8 linears run on
    this CPU, chosen at run time), ``msda_tuning`` (the CPU MSDA kernels' prefetch
    distances and backward pass, and where they came from: ``ddetr.ops.msda_tuning``),
    ``bf16_cpu`` (how CPU bfloat16 convolutions and linear layers outside the native
    layers run: "onednn", or "widen" to float32 where oneDNN has no bfloat16 on this CPU;
    ``ddetr.ops.bf16_cpu``),
    ``cpu`` (name, family, model and vector extensions),
    and ``import_error`` when the extension is missing.
    """
    from ddetr import _cpu
    from ddetr.ops.blas import blas_core
    from ddetr.ops.bf16_cpu import bf16_cpu_path

    info = {"version": __version__, "native": _native.available()}
    if _native.available():
        info.update(_native.build_info())
        info["version"] = __version__
    else:
        info.update(cuda=False, cuda_archs="", cuda_version="", openmp=False,
                    import_error=str(_native.IMPORT_ERROR))
    info["threads"] = torch.get_num_threads()
    info["blas"] = blas_core()
    info["bf16_cpu"] = bf16_cpu_path()
    if _native.available():
        from ddetr._native import gemm
        info["gemm_bf16_kernel"] = gemm.bf16_kernel()
        info["gemm_int8_kernel"] = gemm.int8_kernel()
        info["msda_tuning"] = _msda_tuning.msda_tuning()
    info["cpu"] = _cpu.describe()
    return info
