"""What CPU this is, for ``build_info()`` and every benchmark record: its name, family and
model, and the vector / matrix extensions the kernels can use (the figures depend on
them: AVX-512 MSDA gathers, AVX512-BF16 and AMX for bfloat16, VNNI for int8)."""

from __future__ import annotations

import platform

EXTENSIONS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
              "amx_bf16", "amx_int8")


def describe() -> str:
    """E.g. ``"AMD EPYC (family 25 model 1; avx2 fma)"``; the platform's processor name
    where ``/proc/cpuinfo`` cannot be read."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    flags = set(info.get("flags", "").split())
    ext = [f for f in EXTENSIONS if f in flags]
    return (f"{info.get('model name', platform.machine())} (family {info.get('cpu family', '?')} "
            f"model {info.get('model', '?')}; {' '.join(ext) or 'no AVX2'})")
