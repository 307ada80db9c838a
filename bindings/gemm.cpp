// CPU GEMMs (ddetr/blas.h): loading OpenBLAS at run time, float32 / float64 through it,
// and bfloat16 A, B and bias with C in `c_dtype` (bfloat16 or float32), which needs a
// 64-byte aligned workspace of gemm_workspace_bytes("bfloat16") bytes, on the `kernel`
// "auto", "avx512" or "widen" (Bf16GemmKernel). One GemmCall, filled by
// python/ddetr/_native/gemm.py.
#include "common.h"
#include "ddetr/blas.h"

namespace ddetr {
namespace bind {
namespace {

struct GemmCall {
  std::string dtype;          // of A, B and bias: float32, float64 or bfloat16
  std::string c_dtype;        // of C; "" = dtype
  std::string kernel = "auto";  // bfloat16 only
  bool trans_a = false, trans_b = false;
  int64_t M = 0, N = 0, K = 0;
  uintptr_t A = 0;
  int64_t lda = 0;
  uintptr_t B = 0;
  int64_t ldb = 0;
  double beta = 0.0;
  uintptr_t C = 0;
  int64_t ldc = 0;
  uintptr_t bias = 0;  // (N,) or 0
  bool relu = false;
  int threads = 0;  // torch.get_num_threads(); 0: OpenMP's default
  uintptr_t workspace = 0;  // bfloat16 only
  size_t workspace_bytes = 0;
};

size_t workspace_bytes(const std::string& dtype) {
  if (dtype == "bfloat16") return kGemmBf16ScratchBytes;
  if (dtype == "float32" || dtype == "float64") return 0;
  throw std::invalid_argument("gemm takes float32, float64 or bfloat16, got " + dtype);
}

Bf16GemmKernel bf16_kernel(const std::string& name) {
  if (name == "auto") return Bf16GemmKernel::automatic;
  if (name == "avx512") return Bf16GemmKernel::avx512;
  if (name == "widen") return Bf16GemmKernel::widen;
  throw std::invalid_argument("gemm: kernel must be auto, avx512 or widen, got " + name);
}

GemmArgs gemm_args(const GemmCall& c) {
  GemmArgs g;
  g.trans_a = c.trans_a;
  g.trans_b = c.trans_b;
  g.M = c.M;
  g.N = c.N;
  g.K = c.K;
  g.A = as<const void>(c.A);
  g.lda = c.lda;
  g.B = as<const void>(c.B);
  g.ldb = c.ldb;
  g.beta = c.beta;
  g.C = as<void>(c.C);
  g.ldc = c.ldc;
  g.bias = as<const void>(c.bias);
  g.relu = c.relu;
  return g;
}

// By value: Python cannot change the call while the GEMM runs without the GIL.
void gemm_call(const GemmCall c) {
  const GemmArgs g = gemm_args(c);
  const std::string c_type = c.c_dtype.empty() ? c.dtype : c.c_dtype;
  if (c.dtype == "bfloat16") {
    if (c_type != "bfloat16" && c_type != "float32")
      throw std::invalid_argument("gemm: bfloat16 operands take a bfloat16 or float32 C, got " +
                                  c_type);
    const Bf16GemmKernel k = bf16_kernel(c.kernel);
    const size_t needed = workspace_bytes(c.dtype);
    require(c.workspace, true, "workspace");
    if (c.workspace_bytes < needed)
      throw std::invalid_argument("workspace: " + std::to_string(c.workspace_bytes) +
                                  " bytes, the bfloat16 GEMM needs " + std::to_string(needed));
    if (c.workspace % 64 != 0) throw std::invalid_argument("workspace: not 64-byte aligned");
    py::gil_scoped_release unlocked;
    gemm_bf16(g, c_type == "float32", c.threads, as<float>(c.workspace), k);
    return;
  }
  if (c.dtype != "float32" && c.dtype != "float64")
    throw std::invalid_argument("gemm takes float32, float64 or bfloat16, got " + c.dtype);
  if (c_type != c.dtype)
    throw std::invalid_argument("gemm: " + c.dtype + " operands take a C of the same dtype, got " +
                                c_type);
  const DType t = c.dtype == "float32" ? DType::f32 : DType::f64;
  py::gil_scoped_release unlocked;
  gemm(t, g, c.threads);
}

std::string default_bf16_kernel() {
  return gemm_bf16_default_kernel() == Bf16GemmKernel::avx512 ? "avx512" : "widen";
}

}  // namespace

void bind_gemm(py::module_& m) {
  using C = GemmCall;
  NamedStruct<C>(m, "GemmCall",
                 "C (M, N) = act(op(A) op(B) + beta C + bias), row-major (ddetr/blas.h).")
      .field("dtype", &C::dtype, "of A, B and bias: float32, float64 or bfloat16")
      .field("c_dtype", &C::c_dtype, "of C (\"\": dtype); bfloat16 operands: bfloat16 or float32")
      .field("kernel", &C::kernel, "bfloat16: auto, avx512 or widen")
      .field("trans_a", &C::trans_a, "op(A) = A^T")
      .field("trans_b", &C::trans_b, "op(B) = B^T")
      .field("M", &C::M, "rows of C")
      .field("N", &C::N, "columns of C")
      .field("K", &C::K, "the summed dimension")
      .field("A", &C::A, "(M, K), or (K, M) transposed")
      .field("lda", &C::lda, "row stride of A in elements")
      .field("B", &C::B, "(K, N), or (N, K) transposed")
      .field("ldb", &C::ldb, "row stride of B in elements")
      .field("beta", &C::beta, "scale of the old C")
      .field("C", &C::C, "(M, N), read (beta != 0) and written")
      .field("ldc", &C::ldc, "row stride of C in elements")
      .field("bias", &C::bias, "(N,) or 0")
      .field("relu", &C::relu, "ReLU after the bias")
      .field("threads", &C::threads, "CPU threads (0: OpenMP's default)")
      .field("workspace", &C::workspace, "bfloat16: 64-byte aligned scratch")
      .field("workspace_bytes", &C::workspace_bytes, "its size");
  m.def("gemm", &gemm_call, py::arg("call"), "Writes call.C.");
  m.def("gemm_workspace_bytes", &workspace_bytes, py::arg("dtype"),
        "Workspace bytes a GEMM of operands in `dtype` needs.");
  m.def("gemm_bf16_kernel", &default_bf16_kernel, "What kernel \"auto\" runs.");
  m.def("gemm_bf16_avx512_supported", &gemm_bf16_avx512_supported,
        "Whether this CPU runs the AVX512-BF16 kernel.");
  m.def("load_blas", &load_blas, py::arg("path"), "Opens OpenBLAS at `path`.");
  m.def("blas_loaded", &blas_loaded);
  m.def("blas_core", &blas_core, "OpenBLAS's name for its kernels (\"\" before a load).");
}

}  // namespace bind
}  // namespace ddetr
