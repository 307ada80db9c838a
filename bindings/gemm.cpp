// CPU GEMMs (ddetr/blas.h): loading OpenBLAS at run time, float32 / float64 through it,
// and bfloat16 A, B and bias with C in `c_dtype` (bfloat16 or float32), which needs a
// 64-byte aligned workspace of gemm_workspace_bytes("bfloat16") bytes, on the `kernel`
// "auto", "amx", "amx_emulated", "avx512" or "widen" (Bf16GemmKernel). One GemmCall, filled by
// python/ddetr/_native/gemm.py. The int8 GEMM (ddetr/gemm_int8.h): Int8PackCall packs
// int8 weights once for a kernel, Int8GemmCall runs the GEMM on float32 or int8 A,
// Int8QuantizeCall quantises rows alone.
#include "common.h"
#include "ddetr/blas.h"
#include "ddetr/gemm_int8.h"

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
  if (const std::optional<Bf16GemmKernel> k = bf16_kernel_named(name)) return *k;
  throw std::invalid_argument(
      "gemm: kernel must be auto, amx, amx_emulated, avx512 or widen, got " + name);
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

std::string default_bf16_kernel() { return bf16_kernel_name(gemm_bf16_default_kernel()); }

struct Int8PackCall {
  std::string kernel = "auto";
  int64_t N = 0, K = 0;
  uintptr_t W = 0;  // int8 (N, K)
  int64_t ldw = 0;
  uintptr_t packed = 0;
  size_t packed_bytes = 0;
  int threads = 0;
};

struct Int8GemmCall {
  std::string a_dtype = "float32";  // float32 (quantised here) or int8 (with a_scale)
  int64_t M = 0, N = 0, K = 0;
  uintptr_t A = 0;
  int64_t lda = 0;
  uintptr_t a_scale = 0;
  uintptr_t packed = 0;
  size_t packed_bytes = 0;
  uintptr_t w_scale = 0;
  uintptr_t bias = 0;
  bool relu = false;
  uintptr_t C = 0;
  int64_t ldc = 0;
  int threads = 0;
};

struct Int8QuantizeCall {
  int64_t rows = 0, cols = 0;
  uintptr_t x = 0;  // float32
  int64_t ldx = 0;
  uintptr_t q = 0;  // int8
  int64_t ldq = 0;
  uintptr_t scale = 0;  // float32 (rows,)
  int threads = 0;
};

void int8_pack_call(const Int8PackCall c) {
  const Int8GemmKernel k = int8_kernel_from_name(c.kernel);
  py::gil_scoped_release unlocked;
  gemm_int8_pack(k, as<const int8_t>(c.W), c.N, c.K, c.ldw, as<void>(c.packed), c.packed_bytes,
                 c.threads);
}

void int8_gemm_call(const Int8GemmCall c) {
  Int8GemmArgs g;
  g.M = c.M;
  g.N = c.N;
  g.K = c.K;
  if (c.a_dtype == "float32") {
    if (c.a_scale) throw std::invalid_argument("a_scale: only with a_dtype int8");
    g.A = as<const float>(c.A);
  } else if (c.a_dtype == "int8") {
    g.A_q = as<const int8_t>(c.A);
    g.a_scale = as<const float>(c.a_scale);
  } else {
    throw std::invalid_argument("a_dtype: expected float32 or int8, got " + c.a_dtype);
  }
  if (c.M > 0 && c.N > 0 && c.K > 0) require(c.A, true, "A");
  g.lda = c.lda;
  g.packed = as<const void>(c.packed);
  g.packed_bytes = c.packed_bytes;
  g.w_scale = as<const float>(c.w_scale);
  g.bias = as<const float>(c.bias);
  g.relu = c.relu;
  g.C = as<float>(c.C);
  g.ldc = c.ldc;
  py::gil_scoped_release unlocked;
  gemm_int8(g, c.threads);
}

void int8_quantize_call(const Int8QuantizeCall c) {
  py::gil_scoped_release unlocked;
  quantize_rows_int8(as<const float>(c.x), c.rows, c.cols, c.ldx, as<int8_t>(c.q), c.ldq,
                     as<float>(c.scale), c.threads);
}

size_t int8_packed_bytes(const std::string& kernel, int64_t N, int64_t K) {
  return gemm_int8_packed_bytes(int8_kernel_from_name(kernel), N, K);
}

std::string int8_packed_kernel(uintptr_t packed, size_t packed_bytes) {
  return int8_kernel_name(gemm_int8_packed_kernel(as<const void>(packed), packed_bytes));
}

std::string int8_default_kernel() {
  return int8_kernel_name(gemm_int8_resolve(Int8GemmKernel::automatic));
}

bool int8_kernel_supported(const std::string& kernel) {
  return gemm_int8_supported(int8_kernel_from_name(kernel));
}

bool int8_kernel_agrees(const std::string& kernel) {
  const Int8GemmKernel k = int8_kernel_from_name(kernel);
  py::gil_scoped_release unlocked;
  return gemm_int8_agrees(k);
}

void bind_gemm_int8(py::module_& m) {
  NamedStruct<Int8PackCall>(m, "Int8PackCall", "Packs int8 W (N, K) for an int8 GEMM kernel.")
      .field("kernel", &Int8PackCall::kernel,
             "auto, scalar, avx2, avx512_vnni, amx or amx_emulated")
      .field("N", &Int8PackCall::N, "rows of W (output channels)")
      .field("K", &Int8PackCall::K, "columns of W (input channels)")
      .field("W", &Int8PackCall::W, "int8 (N, K)")
      .field("ldw", &Int8PackCall::ldw, "row stride of W in elements")
      .field("packed", &Int8PackCall::packed, "the output buffer")
      .field("packed_bytes", &Int8PackCall::packed_bytes, "its size (gemm_int8_packed_bytes)")
      .field("threads", &Int8PackCall::threads, "CPU threads (0: OpenMP's default)");
  using G = Int8GemmCall;
  NamedStruct<G>(m, "Int8GemmCall",
                 "C (M, N) float32 = act(int32(Aq Wq^T) a_scale w_scale + bias) "
                 "(ddetr/gemm_int8.h).")
      .field("a_dtype", &G::a_dtype, "float32 (quantised per row here) or int8")
      .field("M", &G::M, "rows of A and C")
      .field("N", &G::N, "columns of C")
      .field("K", &G::K, "the summed dimension")
      .field("A", &G::A, "(M, K) float32 or int8")
      .field("lda", &G::lda, "row stride of A in elements")
      .field("a_scale", &G::a_scale, "int8 A: its (M,) float32 row scales")
      .field("packed", &G::packed, "W packed by gemm_int8_pack")
      .field("packed_bytes", &G::packed_bytes, "its size")
      .field("w_scale", &G::w_scale, "(N,) float32")
      .field("bias", &G::bias, "(N,) float32 or 0")
      .field("relu", &G::relu, "ReLU after the bias")
      .field("C", &G::C, "(M, N) float32, written")
      .field("ldc", &G::ldc, "row stride of C in elements")
      .field("threads", &G::threads, "CPU threads (0: OpenMP's default)");
  NamedStruct<Int8QuantizeCall>(m, "Int8QuantizeCall",
                                "Symmetric int8 per row: scale = max|x| / 127, q = rne(x / scale).")
      .field("rows", &Int8QuantizeCall::rows, "rows of x")
      .field("cols", &Int8QuantizeCall::cols, "columns of x")
      .field("x", &Int8QuantizeCall::x, "float32 (rows, cols)")
      .field("ldx", &Int8QuantizeCall::ldx, "row stride of x")
      .field("q", &Int8QuantizeCall::q, "int8 (rows, cols), written")
      .field("ldq", &Int8QuantizeCall::ldq, "row stride of q")
      .field("scale", &Int8QuantizeCall::scale, "float32 (rows,), written")
      .field("threads", &Int8QuantizeCall::threads, "CPU threads (0: OpenMP's default)");
  m.def("gemm_int8_pack", &int8_pack_call, py::arg("call"), "Writes call.packed.");
  m.def("gemm_int8", &int8_gemm_call, py::arg("call"), "Writes call.C.");
  m.def("quantize_rows_int8", &int8_quantize_call, py::arg("call"), "Writes call.q, call.scale.");
  m.def("gemm_int8_packed_bytes", &int8_packed_bytes, py::arg("kernel"), py::arg("N"),
        py::arg("K"), "Bytes of W (N, K) packed for `kernel`.");
  m.def("gemm_int8_packed_kernel", &int8_packed_kernel, py::arg("packed"),
        py::arg("packed_bytes"), "The kernel a packed buffer is for (its header checked).");
  m.def("gemm_int8_kernel", &int8_default_kernel, "What kernel \"auto\" runs on this CPU.");
  m.def("gemm_int8_kernel_supported", &int8_kernel_supported, py::arg("kernel"),
        "Whether this CPU runs that int8 kernel.");
  m.def("gemm_int8_agrees", &int8_kernel_agrees, py::arg("kernel"),
        "Whether that kernel gives the scalar kernel's bits on the check \"auto\" runs "
        "before choosing AMX.");
}

}  // namespace

void bind_gemm(py::module_& m) {
  bind_gemm_int8(m);
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
  m.def("gemm_bf16_amx_supported", &gemm_bf16_amx_supported,
        "Whether this CPU (and its operating system) runs the AMX kernel.");
  m.def(
      "gemm_bf16_agrees",
      [](const std::string& kernel) {
        const Bf16GemmKernel k = bf16_kernel(kernel);
        py::gil_scoped_release unlocked;
        return gemm_bf16_agrees(k);
      },
      py::arg("kernel"),
      "Whether that kernel gives the AVX512-BF16 kernel's result on the check \"auto\" "
      "runs before choosing AMX.");
  m.def("load_blas", &load_blas, py::arg("path"), "Opens OpenBLAS at `path`.");
  m.def("blas_loaded", &blas_loaded);
  m.def("blas_core", &blas_core, "OpenBLAS's name for its kernels (\"\" before a load).");
}

}  // namespace bind
}  // namespace ddetr
