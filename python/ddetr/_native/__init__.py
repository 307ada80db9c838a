"""The native boundary: the only code that calls ``ddetr._C`` or reads ``data_ptr()``.

One module per native family (``msda``, ``flatten``, ``gemm``, ``dropout``, ``layers``).
Each takes tensors that the ops above have already checked (shapes, dtypes, devices:
``ValueError`` naming the argument is raised there), allocates the outputs and
workspaces with torch (so CUDA memory comes from torch's caching allocator), and hands
the extension pointers, sizes and torch's current CUDA stream. The extension re-checks
every size and pointer and raises ``ValueError`` for what does not fit.

``loader`` imports the extension once; what the rest of the package, the tests and the
benchmarks need from it is re-exported here (``available``, ``cuda_built``,
``cuda_usable``, ``runs_natively``, ..., the extension's ``build_info`` and
``extension_path``).
"""

from ddetr._native.loader import (IMPORT_ERROR, available, build_info, cuda_built,
                                  cuda_runtime_status, cuda_usable, extension_path,
                                  runs_natively, warn_fallback)

__all__ = ["IMPORT_ERROR", "available", "build_info", "cuda_built", "cuda_runtime_status",
           "cuda_usable", "extension_path", "runs_natively", "warn_fallback"]
