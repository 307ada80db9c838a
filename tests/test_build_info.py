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
