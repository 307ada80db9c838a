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
