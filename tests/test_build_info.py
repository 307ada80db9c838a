import os
import subprocess
import sys

import torch

import ddetr


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
    # OpenBLAS chooses its kernels once, when it loads: a fresh process sees the choice
    # that OPENBLAS_CORETYPE forces, and reports it as OpenBLAS names it
    code = "import ddetr; print(ddetr.build_info()['blas'])"
    for core in ("Haswell", "Sandybridge"):
        env = {**os.environ, "OPENBLAS_CORETYPE": core}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True).stdout.split()
        assert out[-1] == core
