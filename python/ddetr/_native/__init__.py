"""The native boundary: the only code that calls ``ddetr._C`` or reads ``data_ptr()``.

``loader`` imports the extension once and says what it can do; one module per native
family (``msda``, ``flatten``, ``gemm``, ``dropout``, ``layers``) takes tensors that the
ops above have already checked (shapes, dtypes, devices: ``ValueError`` naming the
argument is raised there), allocates the outputs and workspaces with torch (so CUDA
memory comes from torch's caching allocator), and hands the extension one struct per
call whose fields it sets by name (``_C.MsdaCall(dtype=..., device=..., N=..., value=...)``:
pointers as integers, sizes, the level table as ``_C.Level``, torch's current CUDA stream
in ``_C.Device``). The extension re-checks every size and pointer and raises
``ValueError`` naming the field that does not fit.

Re-exported here for the rest of the package, the tests and the benchmarks: the loader's
answers (``available``, ``cuda_built``, ``cuda_usable``, ``runs_natively``, ...), the
extension's ``build_info`` and ``extension_path``, ``struct`` / ``call_entry`` (for tests
of the native re-checks) and ``storage_id``.
"""

from ddetr._native.common import storage_id
from ddetr._native.loader import (IMPORT_ERROR, available, build_info, call_entry, cuda_built,
                                  cuda_runtime_status, cuda_usable, extension_path,
                                  runs_natively, struct, warn_fallback)

__all__ = ["IMPORT_ERROR", "available", "build_info", "call_entry", "cuda_built",
           "cuda_runtime_status", "cuda_usable", "extension_path", "runs_natively",
           "storage_id", "struct", "warn_fallback"]
