"""The CPU MSDA kernels' run-time settings (ddetr.ops.msda_tuning): every vector pass
this build has, forced, against the float64 reference; the prefetch distances change no
bit; bad settings raise naming the setting; DDETR_MSDA_TUNING and the per-machine cache
are applied at import; ``ddetr tune`` measures and saves. (Bitwise thread-count
independence of each pass: tests/test_threads.py, family msda_passes.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ddetr import _native
from ddetr.ops import ms_deform_attn, ms_deform_attn_reference
from tests.ops.msda_cases import CASES, MANY_QUERIES, make_inputs
from tests.ops.test_msda import low_precision_error

pytestmark = pytest.mark.skipif(not _native.available(), reason="native extension not built")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def tuning():
    from ddetr.ops import msda_tuning
    before = msda_tuning.msda_tuning()
    yield msda_tuning
    msda_tuning.set_msda_tuning(**{k: before[k] for k in (*msda_tuning.DISTANCES,
                                                          "vector_pass")})


def _run(case, dtype, kind="random"):
    value, shapes, start, loc, attn = make_inputs(case, kind=kind)
    leaves = [t.to(dtype if t is value else torch.float32).requires_grad_()
              for t in (value, loc, attn)]
    out = ms_deform_attn(leaves[0], shapes, start, leaves[1], leaves[2])
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.dtype)
    return [out, *torch.autograd.grad(out, leaves, g)], (value, shapes, start, loc, attn, g)


def _passes():
    if not _native.available():
        return []
    from ddetr.ops import msda_tuning
    return msda_tuning.msda_tuning()["passes"]


@pytest.mark.parametrize("vector_pass", _passes())
@pytest.mark.parametrize("case", CASES + [MANY_QUERIES], ids=str)
def test_every_pass_matches_the_reference(tuning, vector_pass, case):
    # float32 against the float64 reference, on and off the map and on the borders
    tuning.set_msda_tuning(vector_pass=vector_pass)
    for kind in ("random", "border"):
        got, (value, shapes, start, loc, attn, g) = _run(case, torch.float32, kind)
        leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
        ref = ms_deform_attn_reference(leaves[0], shapes, start, leaves[1], leaves[2])
        want = [ref, *torch.autograd.grad(ref, leaves, g.double())]
        for name, a, b in zip(("output", "value", "locations", "weights"), got, want):
            if kind == "border" and name == "locations":
                continue  # one-sided derivatives at pixel centres (as in test_msda.py)
            # (location gradients scale with the level width: relative to the largest)
            scale = max(1.0, b.abs().max().item()) if name == "locations" else 1.0
            torch.testing.assert_close(a.double(), b, atol=1e-4 * scale, rtol=1e-4,
                                       msg=f"{vector_pass} {kind}: {name}")


@pytest.mark.parametrize("vector_pass", _passes())
def test_bf16_in_every_pass_keeps_the_house_error_bound(tuning, vector_pass):
    # test_msda.py's rule for bfloat16: the error against float64 at most 2x (output) and
    # 3x (gradients) the reference's own in bfloat16, plus 1e-2; the head sizes that the
    # AVX2 (8, 16, 32, 64) and AVX-512 (16, 32, 64) passes take
    tuning.set_msda_tuning(vector_pass=vector_pass)
    for case in CASES:
        if case.d % 8:
            continue
        native, reference = low_precision_error(case, torch.bfloat16, "cpu")
        for i, (got, ref_err, factor) in enumerate(zip(native, reference, [2, 3, 3, 3])):
            assert got <= factor * ref_err + 1e-2, (str(case), i, got, ref_err)


@pytest.mark.parametrize("vector_pass", _passes())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_backward_gives_the_forward_rows_bit_for_bit(tuning, vector_pass, dtype):
    # the native encoder layer's backward takes its sampled features from the MSDA
    # backward's gathers instead of storing the forward's: in every pass they must be the
    # forward's output to the bit (both sum the corners in the same running sums)
    from ddetr._native import msda as native
    from ddetr.ops.levels import as_level_table
    tuning.set_msda_tuning(vector_pass=vector_pass)
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    for case in CASES + [MANY_QUERIES]:
        for kind in ("random", "border"):
            value, shapes, start, loc, attn = make_inputs(case, kind=kind)
            value, loc, attn = value.to(dtype), loc.float(), attn.float()
            rows = list(as_level_table(shapes, start, value.device).rows)
            out = native.forward(value, rows, loc, attn)
            g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
            again = native.backward(g, value, rows, loc, attn, forward_rows=True)[3]
            assert torch.equal(out.view(bits), again.view(bits)), (str(case), kind)


def test_prefetch_distances_change_no_bit(tuning):
    case = MANY_QUERIES
    results = []
    for distances in ({}, dict(corners_ahead_forward=0, corners_ahead_backward=0,
                               queries_ahead=0),
                      dict(corners_ahead_forward=256, corners_ahead_backward=1,
                           queries_ahead=256),
                      dict(corners_ahead_forward=3, corners_ahead_backward=64,
                           queries_ahead=1)):
        tuning.set_msda_tuning(**distances)
        results.append([t.view(torch.int32) for t in _run(case, torch.float32)[0]])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("settings, match", [
    (dict(queries_ahead=-1), "queries_ahead: expected an int in \\[0, 256\\]"),
    (dict(corners_ahead_forward=257), "corners_ahead_forward: expected"),
    (dict(corners_ahead_backward=2.5), "corners_ahead_backward: expected"),
    (dict(queries_ahead=True), "queries_ahead: expected"),
    (dict(vector_pass="sse"), "vector_pass: expected one of"),
    (dict(prefetch=3), "prefetch: not an MSDA setting"),
])
def test_bad_settings_raise_naming_them(tuning, settings, match):
    before = tuning.msda_tuning()
    with pytest.raises(ValueError, match=match):
        tuning.set_msda_tuning(**settings)
    assert tuning.msda_tuning() == before


def test_native_refuses_what_python_would_have_caught(tuning):
    # the extension re-checks: a distance out of range, a pass this build does not have
    from ddetr._native import msda
    with pytest.raises(ValueError, match="queries_ahead"):
        msda.set_cpu_tuning(32, 16, 300, "auto")
    missing = [p for p in ("avx2", "avx512") if p not in msda.cpu_passes()]
    for name in missing:
        with pytest.raises(ValueError, match="vector_pass"):
            msda.set_cpu_tuning(32, 16, 4, name)
    assert msda.cpu_tuning()["queries_ahead"] == tuning.msda_tuning()["queries_ahead"]


def _import_info(env: dict) -> subprocess.CompletedProcess:
    code = "import json, ddetr; print(json.dumps(ddetr.build_info()['msda_tuning']))"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=120)


def test_environment_variable_is_applied_at_import(tmp_path):
    run = _import_info({"DDETR_MSDA_TUNING": "queries_ahead=9, vector_pass=generic",
                        "DDETR_CACHE": str(tmp_path)})
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout.strip().splitlines()[-1])
    assert (info["queries_ahead"], info["vector_pass"], info["source"]) == (9, "generic", "env")
    bad = _import_info({"DDETR_MSDA_TUNING": "queries_ahead=far"})
    assert bad.returncode != 0 and "DDETR_MSDA_TUNING: queries_ahead expects an int" in bad.stderr
    # a pass this CPU cannot run (or no pass at all) is refused naming the variable
    bad = _import_info({"DDETR_MSDA_TUNING": "vector_pass=sse"})
    assert bad.returncode != 0
    assert "DDETR_MSDA_TUNING: vector_pass: expected one of" in bad.stderr, bad.stderr[-500:]


def test_tune_saves_per_machine_and_import_applies_it(tmp_path, monkeypatch, tuning):
    monkeypatch.setenv("DDETR_CACHE", str(tmp_path))
    result = tuning.tune_msda(image=(64, 96), repeats=1, progress=False)
    assert set(result["settings"]) == set(tuning.DISTANCES)
    for name, times in result["times_ms"].items():
        assert [int(v) for v in times] == list(tuning.CANDIDATES[name])
        assert all(t > 0 for t in times.values())
        assert result["settings"][name] in tuning.CANDIDATES[name] + (
            {"corners_ahead_forward": 32, "corners_ahead_backward": 16, "queries_ahead": 4}[name],)
    assert tuning.msda_tuning()["source"] == "tuned"
    saved = json.loads((tmp_path / "msda_tuning.json").read_text())
    assert saved[tuning.machine_key()]["settings"] == result["settings"]
    # a planted entry for this machine is what the next import applies
    saved[tuning.machine_key()]["settings"] = {"corners_ahead_forward": 5,
                                               "corners_ahead_backward": 6, "queries_ahead": 7}
    saved["some other CPU | -march=native"] = {"settings": {"queries_ahead": 200}}
    (tmp_path / "msda_tuning.json").write_text(json.dumps(saved))
    run = _import_info({"DDETR_CACHE": str(tmp_path), "DDETR_MSDA_TUNING": ""})
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout.strip().splitlines()[-1])
    assert (info["corners_ahead_forward"], info["corners_ahead_backward"],
            info["queries_ahead"], info["source"]) == (5, 6, 7, "cache")
    off = _import_info({"DDETR_CACHE": str(tmp_path), "DDETR_MSDA_TUNING": "off"})
    assert json.loads(off.stdout.strip().splitlines()[-1])["source"] == "default"


def test_an_unreadable_cache_warns_and_keeps_the_defaults(tmp_path):
    (tmp_path / "msda_tuning.json").write_text("{not json")
    run = _import_info({"DDETR_CACHE": str(tmp_path), "DDETR_MSDA_TUNING": ""})
    assert run.returncode == 0, run.stderr
    assert "cannot be read" in run.stderr
    info = json.loads(run.stdout.strip().splitlines()[-1])
    assert (info["queries_ahead"], info["source"]) == (4, "default")


def test_tune_rejects_bad_arguments(tuning):
    with pytest.raises(ValueError, match="image: expected"):
        tuning.tune_msda(image=(32, 800), progress=False, save=False)
    with pytest.raises(ValueError, match="repeats: expected"):
        tuning.tune_msda(image=(64, 64), repeats=0, progress=False, save=False)


def test_cli_tune(tmp_path):
    run = subprocess.run([sys.executable, "-m", "ddetr.cli", "tune", "--image", "64", "80",
                          "--repeats", "1", "--no-progress", "--threads", "2"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "DDETR_CACHE": str(tmp_path)})
    assert run.returncode == 0, run.stderr
    assert "queries_ahead" in run.stdout and (tmp_path / "msda_tuning.json").exists()
    bad = subprocess.run([sys.executable, "-m", "ddetr.cli", "tune", "--threads", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "DDETR_CACHE": str(tmp_path)})
    assert bad.returncode == 2 and "--threads: expected a positive int" in bad.stderr
