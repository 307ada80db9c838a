import pytest
import torch

import ddetr

CUDA_REASON = None
if not torch.cuda.is_available():
    CUDA_REASON = "no CUDA GPU on this machine"
elif not ddetr.build_info()["cuda"]:
    CUDA_REASON = "ddetr was built without CUDA kernels"


def pytest_collection_modifyitems(config, items):
    if CUDA_REASON is None:
        return
    skip = pytest.mark.skip(reason=CUDA_REASON)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_generate_tests(metafunc):
    # Tests taking a `device` argument run on the CPU and, marked `cuda`, on the GPU.
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
