// Python binding of the decode-batch GEMV (csrc/gemv.cu): check tensors, then call the plain
// launcher of gemv.h. bindings.cpp adds it to the one extension module (add_gemv_bindings);
// services/worker/ops/gemv_ops.py calls it. Returns "" or the error, never throws
// (binding_checks.h says why).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "binding_checks.h"
#include "gemv.h"

namespace {

using nanopd::Checks;
using Named = std::pair<const at::Tensor*, const char*>;

// The checks of out [rows, n] = x [rows, x_k] w [n, k]^T + bias [n] (bias empty: none) with
// x_k = k, or 2 k for SwiGLU's [gate | up]; fills p.
std::string check_gemv(Checks& c, GemvParams& p, at::Tensor& out, const at::Tensor& x,
                       const at::Tensor& w, const at::Tensor& bias, int max_rows,
                       int x_k_factor) {
  const at::Device device = x.device();
  for (auto [t, name] : {Named{&x, "x"}, {&out, "out"}, {&w, "w"}}) {
    if (!c.on_device(*t, name, device)) return c.error();
  }
  const bool has_bias = bias.numel() > 0;
  if (has_bias && !c.on_device(bias, "bias", device)) return c.error();
  const auto dtype = x.scalar_type();
  c.require(dtype == at::kHalf || dtype == at::kBFloat16,
            "gemv takes float16 or bfloat16 (float32 stays on the torch path); got ", dtype);
  c.require(out.scalar_type() == dtype && w.scalar_type() == dtype &&
                (!has_bias || bias.scalar_type() == dtype),
            "x, w, out", has_bias ? " and bias" : "", " must share one dtype");
  c.require(x.dim() == 2 && w.dim() == 2 && out.dim() == 2,
            "x [rows, k], w [n, k] and out [rows, n] must be 2-D");
  if (c.failed()) return c.error();
  const int64_t rows = x.size(0), k = w.size(1), n = w.size(0);
  c.require(rows >= 1 && rows <= max_rows, "gemv takes 1 to ", max_rows, " rows of x; got ",
            rows, " (use a GEMM)");
  c.require(x.size(1) == x_k_factor * k, "w is ", w.sizes(), "; expected [n, ",
            x.size(1) / x_k_factor, "] for x ", x.sizes());
  c.require(out.size(0) == rows && out.size(1) == n, "out is ", out.sizes(), "; expected [",
            rows, ", ", n, "]");
  c.require(k % 8 == 0 && k > 0, "k (", k, ") must be a positive multiple of 8");
  c.require(n >= 1 && n < (1LL << 30), "n (", n, ") must be in [1, 2^30)");
  c.require(!has_bias || (bias.dim() == 1 && bias.size(0) == n && bias.is_contiguous()),
            "bias must be contiguous [", n, "]");
  if (c.failed()) return c.error();
  for (auto [t, name] : {Named{&x, "x"}, {&w, "w"}}) c.rows16(*t, name);
  c.require(out.stride(1) == 1, "out must be contiguous in its last dimension");
  if (c.failed()) return c.error();
  p.out = out.data_ptr(), p.x = x.data_ptr(), p.w = w.data_ptr();
  p.bias = has_bias ? bias.data_ptr() : nullptr;
  p.out_stride_row = out.stride(0), p.x_stride_row = x.stride(0), p.w_stride_row = w.stride(0);
  p.num_rows = (int)rows, p.n_dim = (int)n, p.k_dim = (int)k;
  p.dtype = dtype == at::kHalf ? NANOPD_FP16 : NANOPD_BF16;
  return c.error();
}

// out [rows, n] = x [rows, k] w [n, k]^T + bias [n] (bias empty: none), 1 <= rows <= 8
std::string gemv(at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                 const at::Tensor& bias) {
  Checks c;
  GemvParams p{};
  if (!check_gemv(c, p, out, x, w, bias, NANOPD_GEMV_MAX_ROWS, 1).empty()) return c.error();
  const c10::cuda::CUDAGuard guard(x.device());
  c.launch(nanopd_gemv(&p, at::cuda::getCurrentCUDAStream()), "gemv");
  return c.error();
}

// The GEMV after add + RMSNorm (mode 1: x [rows, k], residual and residual_out [rows, k] or
// both empty, norm_weight [k], eps) or after SwiGLU (mode 2: x [rows, 2 k]); 1 <= rows <= 2
std::string gemv_prologue(at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                          const at::Tensor& bias, const at::Tensor& residual,
                          at::Tensor& residual_out, const at::Tensor& norm_weight, double eps,
                          int64_t mode) {
  Checks c;
  GemvPrologueParams q{};
  const bool norm = mode == NANOPD_GEMV_ADD_NORM;
  if (!c.require(norm || mode == NANOPD_GEMV_SWIGLU, "mode must be ",
                 (int)NANOPD_GEMV_ADD_NORM, " (add + RMSNorm) or ", (int)NANOPD_GEMV_SWIGLU,
                 " (SwiGLU); got ", mode) ||
      !check_gemv(c, q.gemv, out, x, w, bias, 2, norm ? 1 : 2).empty()) {
    return c.error();
  }
  const int64_t rows = x.size(0), k = w.size(1);
  c.require(rows * k * x.element_size() <= NANOPD_GEMV_PROLOGUE_MAX_NBYTES, "rows x k = ",
            rows * k, " elements do not fit the kernel's shared memory");
  q.mode = (int)mode;
  if (norm) {
    const bool has_residual = residual.numel() > 0;
    c.require(has_residual == (residual_out.numel() > 0),
              "give both residual and residual_out or neither");
    if (!c.on_device(norm_weight, "norm_weight", x.device())) return c.error();
    c.require(norm_weight.scalar_type() == x.scalar_type() && norm_weight.dim() == 1 &&
                  norm_weight.size(0) == k && norm_weight.is_contiguous(),
              "norm_weight must be contiguous [", k, "] in x's dtype");
    c.rows16(norm_weight, "norm_weight");
    if (c.failed()) return c.error();
    if (has_residual) {
      for (auto [t, name] : {Named{&residual, "residual"}, {&residual_out, "residual_out"}}) {
        if (!c.on_device(*t, name, x.device())) return c.error();
        c.require(t->scalar_type() == x.scalar_type() && t->sizes() == x.sizes(), name,
                  " must be ", x.sizes(), " in x's dtype");
        c.rows16(*t, name);
      }
      c.require(residual_out.data_ptr() != x.data_ptr() &&
                    residual_out.data_ptr() != residual.data_ptr(),
                "residual_out must be a buffer of its own (other blocks still read x and "
                "residual)");
      if (c.failed()) return c.error();
      q.residual = residual.data_ptr(), q.residual_out = residual_out.data_ptr();
      q.residual_stride_row = residual.stride(0);
      q.residual_out_stride_row = residual_out.stride(0);
    }
    q.norm_weight = norm_weight.data_ptr();
    q.eps = (float)eps;
  }
  const c10::cuda::CUDAGuard guard(x.device());
  c.launch(nanopd_gemv_prologue(&q, at::cuda::getCurrentCUDAStream()), "gemv_prologue");
  return c.error();
}

}  // namespace

void add_gemv_bindings(pybind11::module_& m) {
  m.def("gemv", &gemv, "out = x w^T (+ bias) for 1-8 rows of x (gemv.cu)");
  m.def("gemv_prologue", &gemv_prologue,
        "the GEMV after add + RMSNorm or SwiGLU, made in the kernel (gemv_fused.cu)");
}
