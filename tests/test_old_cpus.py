"""A portable build (DDETR_NATIVE_ARCH=OFF) on x86 CPUs older than this one, emulated by
qemu's user mode (Debian's qemu-user; CI installs it): an AVX-only CPU (no AVX2, FMA or
AVX-512) and an AVX2 + FMA one without AVX-512. Each must import the extension, run the
widest deformable-attention copy it has (and no wider: an instruction it lacks would kill
the process), match the reference, and run a small detector."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ddetr

ROOT = Path(__file__).resolve().parent.parent
QEMU = shutil.which("qemu-x86_64")


@pytest.mark.slow
@pytest.mark.parametrize("cpu, passes", [("SandyBridge", "generic"),
                                         ("Haswell", "generic,avx2")])
def test_a_portable_build_runs_on_older_cpus(cpu, passes):
    info = ddetr.build_info()
    if QEMU is None:
        pytest.skip("qemu-x86_64 (Debian's qemu-user) is not installed")
    if info["cpu_arch_flags"]:
        pytest.skip(f"a {info['cpu_arch_flags']} build runs only on CPUs like the one that "
                    "built it (CI tests its portable build here)")
    if not info["cpu_runtime_dispatch"]:
        pytest.skip("built without the per-instruction-set copies")
    # OpenBLAS picks its kernels from the emulated CPU, unless the environment forces some
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    env["EXPECT"] = passes
    run = subprocess.run([QEMU, "-cpu", cpu, sys.executable, "-m", "tests.old_cpu_worker"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-4000:])
    assert run.stdout.rstrip().endswith("ok"), run.stdout[-2000:]
