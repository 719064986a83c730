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

// out [rows, n] = x [rows, k] w [n, k]^T + bias [n] (bias empty: none), 1 <= rows <= 8
std::string gemv(at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                 const at::Tensor& bias) {
  Checks c;
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
  const int64_t rows = x.size(0), k = x.size(1), n = w.size(0);
  c.require(rows >= 1 && rows <= NANOPD_GEMV_MAX_ROWS, "gemv takes 1 to ",
            (int)NANOPD_GEMV_MAX_ROWS, " rows of x; got ", rows, " (use a GEMM)");
  c.require(w.size(1) == k, "w is ", w.sizes(), "; expected [n, ", k, "] for x ", x.sizes());
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
  GemvParams p{};
  p.out = out.data_ptr(), p.x = x.data_ptr(), p.w = w.data_ptr();
  p.bias = has_bias ? bias.data_ptr() : nullptr;
  p.out_stride_row = out.stride(0), p.x_stride_row = x.stride(0), p.w_stride_row = w.stride(0);
  p.num_rows = (int)rows, p.n_dim = (int)n, p.k_dim = (int)k;
  p.dtype = dtype == at::kHalf ? NANOPD_FP16 : NANOPD_BF16;
  const c10::cuda::CUDAGuard guard(device);
  c.launch(nanopd_gemv(&p, at::cuda::getCurrentCUDAStream()), "gemv");
  return c.error();
}

}  // namespace

void add_gemv_bindings(pybind11::module_& m) {
  m.def("gemv", &gemv, "out = x w^T (+ bias) for 1-8 rows of x (gemv.cu)");
}
