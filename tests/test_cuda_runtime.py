"""ddetr's CUDA runtime check: the native status and the once-per-process decision."""

import warnings

import pytest
import torch

from ddetr._native import loader

KEYS = {"built", "driver_version", "runtime_version", "device_count", "error",
        "insufficient_driver", "usable"}


def _status():
    if not loader.available():
        pytest.skip(f"the native extension is not built ({loader.IMPORT_ERROR})")
    status = loader.cuda_runtime_status()
    if status is None:
        pytest.skip("the installed extension predates cuda_runtime_status: rebuild it")
    return status


def test_status_reports_this_machine_without_raising():
    status = _status()
    assert set(status) == KEYS
    assert status["built"] is loader.cuda_built()
    for key in ("driver_version", "runtime_version", "device_count"):
        assert isinstance(status[key], int) and status[key] >= 0
    assert isinstance(status["error"], str) and status["error"]
    assert status["usable"] == (status["error"] == "cudaSuccess" and status["device_count"] > 0)
    if not status["built"]:
        assert not status["usable"] and status["runtime_version"] == 0
        return
    assert status["runtime_version"] >= 11000
    assert status["insufficient_driver"] == (status["error"] == "cudaErrorInsufficientDriver")
    if not torch.cuda.is_available():  # no GPU: it says so
        assert not status["usable"] and status["device_count"] == 0


@pytest.fixture
def fake_machine(monkeypatch):
    """cuda_usable() undecided, CUDA built in, torch seeing a GPU; returns a setter for
    the status the native runtime reports (counting the queries)."""
    monkeypatch.setattr(loader, "_cuda_state", None)
    monkeypatch.setattr(loader, "cuda_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    queries = []

    def report(status):
        monkeypatch.setattr(loader, "cuda_runtime_status",
                            lambda: queries.append(status) or dict(status))
        return queries

    return report


OLD_DRIVER = {"built": True, "driver_version": 12040, "runtime_version": 13000,
              "device_count": 0, "error": "cudaErrorInsufficientDriver",
              "insufficient_driver": True, "usable": False}


def test_an_old_driver_turns_cuda_off_with_one_warning(fake_machine):
    queries = fake_machine(OLD_DRIVER)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [loader.cuda_usable() for _ in range(3)] == [False] * 3
    assert len(queries) == 1
    assert len(caught) == 1 and caught[0].category is RuntimeWarning
    message = str(caught[0].message)
    assert "CUDA 13.0 toolkit" in message and "supports CUDA 12.4" in message
    assert "at least the CUDA version of the toolkit" in message
    assert "update the NVIDIA driver" in message and "rebuild ddetr" in message
    assert "pure-PyTorch reference" in message


def test_another_runtime_failure_names_its_error(fake_machine):
    fake_machine({**OLD_DRIVER, "driver_version": 13000, "error": "cudaErrorNoDevice",
                  "insufficient_driver": False})
    with pytest.warns(RuntimeWarning, match="cudaErrorNoDevice"):
        assert not loader.cuda_usable()


def test_a_working_runtime_keeps_cuda_on_silently(fake_machine):
    queries = fake_machine({**OLD_DRIVER, "driver_version": 13000, "device_count": 1,
                            "error": "cudaSuccess", "insufficient_driver": False,
                            "usable": True})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert loader.cuda_usable() and loader.cuda_usable()
    assert len(queries) == 1


def test_an_extension_that_cannot_ask_keeps_cuda_on(fake_machine, monkeypatch):
    fake_machine(OLD_DRIVER)
    monkeypatch.setattr(loader, "cuda_runtime_status", lambda: None)
    assert loader.cuda_usable()


def test_no_gpu_or_no_cuda_build_never_asks_the_runtime(fake_machine, monkeypatch):
    queries = fake_machine(OLD_DRIVER)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not loader.cuda_usable()
        monkeypatch.setattr(loader, "_cuda_state", None)
        monkeypatch.setattr(loader, "cuda_built", lambda: False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert not loader.cuda_usable()
    assert queries == []
