import os

import pytest
import torch

import ddetr
from ddetr.ops.blas import blas_available


def test_build_info_reports_the_build():
    info = ddetr.build_info()
    assert info["native"] is True, info.get("import_error")
    assert info["version"] == ddetr.__version__
    assert isinstance(info["cuda"], bool)
    assert info["cuda_archs"] if info["cuda"] else info["cuda_archs"] == ""
    assert info["openmp"] is True
    assert info["threads"] == torch.get_num_threads()
    assert info["max_levels"] >= 16


def test_build_info_names_the_openblas_kernels_in_use():
    # OpenBLAS chooses its kernels when it loads, from the CPU or from OPENBLAS_CORETYPE
    # (which the test leaves as the environment has it)
    if not blas_available():
        pytest.skip("scipy-openblas32 is not installed")
    core = ddetr.build_info()["blas"]
    assert core and core.isprintable()
    forced = os.environ.get("OPENBLAS_CORETYPE", "")
    if forced.lower() in {"haswell", "skylakex", "zen", "sandybridge", "cooperlake"}:
        assert core.lower() == forced.lower()


def _cpu_flags() -> set[str]:
    if not os.path.exists("/proc/cpuinfo"):
        return set()
    with open("/proc/cpuinfo") as f:
        return set(next((ln for ln in f if ln.startswith("flags")), ":").split(":")[1].split())


def test_build_info_names_the_cpu_and_the_kernels_chosen_for_it():
    from ddetr._native import gemm

    info = ddetr.build_info()
    flags = _cpu_flags()
    # "<name> (family F model M; ext ext ...)": every extension the CPU reports is named,
    # and none it lacks
    listed = set(info["cpu"].rsplit(";", 1)[-1].rstrip(")").split())
    if flags:
        for ext in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8"):
            assert (ext in listed) == (ext in flags), (ext, info["cpu"])
    assert info["gemm_bf16_kernel"] == gemm.bf16_kernel()
    assert info["gemm_int8_kernel"] == gemm.int8_kernel()
    assert gemm.int8_kernel_supported(info["gemm_int8_kernel"])


def test_the_deformable_attention_kernels_run_the_widest_loops_this_cpu_has():
    # Picked at run time from the CPU, in a portable build (DDETR_NATIVE_ARCH=OFF, which CI
    # also tests) as in a -march=native one: a build for the baseline x86-64 still runs
    # its AVX2 and AVX-512 copies on CPUs that have them (with GCC on x86).
    from ddetr._native import msda

    flags = _cpu_flags()
    if not flags or "sse2" not in flags:
        pytest.skip("not an x86 CPU with /proc/cpuinfo")
    info = ddetr.build_info()
    if not info["cpu_runtime_dispatch"]:
        pytest.skip("built by a compiler without the per-instruction-set copies: the "
                    "passes are those the build's flags allow")
    passes = msda.cpu_passes()
    avx2 = {"avx2", "fma"} <= flags
    avx512 = avx2 and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    assert ("avx2" in passes) == avx2, (passes, info["cpu_arch_flags"])
    assert ("avx512" in passes) == avx512, (passes, info["cpu_arch_flags"])
    assert info["msda_tuning"]["passes"] == passes
