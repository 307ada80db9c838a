"""The native boundary: the only code that calls ``ddetr._C`` or reads ``data_ptr()``.

One module per native family (``msda``, ``flatten``, ``gemm``, ``dropout``, ``layers``).
Each takes tensors that the ops above have already checked (shapes, dtypes, devices:
``ValueError`` naming the argument is raised there), allocates the outputs and
workspaces with torch (so CUDA memory comes from torch's caching allocator), and hands
the extension pointers, sizes and torch's current CUDA stream. The extension re-checks
every size and pointer and raises ``ValueError`` for what does not fit.
"""
