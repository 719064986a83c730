// Python binding of the decode-batch GEMV (csrc/gemv.cu): check tensors, then call the plain
// launcher of gemv.h. bindings.cpp adds it to the one extension module (add_gemv_bindings);
// services/worker/ops/gemv_ops.py calls it. Returns "" or the error, never throws
// (binding_checks.h says why).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "binding_checks.h"
#include "fused_bindings.h"
#include "gemv.h"

namespace {

using nanopd::Checks;
using Named = std::pair<const at::Tensor*, const char*>;

// The checks of out [rows, n / out_div] from x [rows, k] w [n, k]^T + bias [n] (bias empty:
// none), out_div 1 (a plain GEMV) or 2 (a SiLU-and-mul epilogue of [gate; up]); fills p.
std::string check_gemv(Checks& c, GemvParams& p, at::Tensor& out, const at::Tensor& x,
                       const at::Tensor& w, const at::Tensor& bias, int max_rows, int out_div) {
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
  c.require(x.size(1) == k, "w is ", w.sizes(), "; expected [n, ", x.size(1), "] for x ",
            x.sizes());
  c.require(n % out_div == 0, "w's n (", n, ") must be even: [gate; up] rows");
  c.require(out.size(0) == rows && out.size(1) == n / out_div, "out is ", out.sizes(),
            "; expected [", rows, ", ", n / out_div, "]");
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

// The checks of a NORM prologue's sums [rows, ceil(k / 8)] (fp32, from an ADD epilogue) and
// norm weight [k] for the GEMV of p (filled); sums empty: no norm. Fills nm.
std::string check_norm(Checks& c, GemvNormParams& nm, const GemvParams& p, const at::Tensor& x,
                       const at::Tensor& sums, const at::Tensor& weight, double eps) {
  if (sums.numel() == 0) return c.error();
  const at::Device device = x.device();
  if (!c.on_device(sums, "norm_sums", device) || !c.on_device(weight, "norm_weight", device)) {
    return c.error();
  }
  const int64_t num_sums = (p.k_dim + NANOPD_GEMV_SUM_COLUMNS - 1) / NANOPD_GEMV_SUM_COLUMNS;
  c.require(num_sums <= NANOPD_GEMV_NORM_MAX_SUMS, "a normed GEMV takes k up to ",
            NANOPD_GEMV_NORM_MAX_SUMS * NANOPD_GEMV_SUM_COLUMNS, "; got ", p.k_dim);
  c.require(sums.scalar_type() == at::kFloat && sums.dim() == 2 && sums.size(0) == p.num_rows &&
                sums.size(1) == num_sums && sums.is_contiguous(),
            "norm_sums must be contiguous float32 [", p.num_rows, ", ", num_sums,
            "] (an ADD epilogue's sums of squares); got ", sums.sizes(), " ",
            sums.scalar_type());
  c.require(weight.scalar_type() == x.scalar_type() && weight.dim() == 1 &&
                weight.size(0) == p.k_dim && weight.is_contiguous(),
            "norm_weight must be contiguous [", p.k_dim, "] ", x.scalar_type(), "; got ",
            weight.sizes(), " ", weight.scalar_type());
  c.require(eps >= 0, "eps must be >= 0; got ", eps);
  if (c.failed() || !c.rows16(weight, "norm_weight")) return c.error();
  nm.sums = sums.data_ptr<float>(), nm.weight = weight.data_ptr();
  nm.num_sums = (int)num_sums, nm.eps = (float)eps;
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

// out [rows, I] = silu_and_mul(x [rows, k] w [2 I, k]^T + bias [2 I]), x normed first when
// norm_sums is not empty (check_norm); 1 <= rows <= 2
std::string gemv_silu_and_mul(at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                              const at::Tensor& bias, const at::Tensor& norm_sums,
                              const at::Tensor& norm_weight, double eps) {
  Checks c;
  GemvFusedParams q{};
  if (!check_gemv(c, q.gemv, out, x, w, bias, NANOPD_GEMV_FUSED_MAX_ROWS, 2).empty() ||
      !check_norm(c, q.norm, q.gemv, x, norm_sums, norm_weight, eps).empty()) {
    return c.error();
  }
  q.epilogue = NANOPD_GEMV_SWIGLU;
  const c10::cuda::CUDAGuard guard(x.device());
  c.launch(nanopd_gemv_fused(&q, at::cuda::getCurrentCUDAStream()), "gemv_silu_and_mul");
  return c.error();
}

// qkv [rows, (H + 2 KVH) D] = x w^T + bias, rotated and k, v stored as rotary_store_kv
// (without q/k norm) does, x normed first when norm_sums is not empty; 1 <= rows <= 2
std::string gemv_rotary(at::Tensor& qkv, const at::Tensor& x, const at::Tensor& w,
                        const at::Tensor& bias, const at::Tensor& positions,
                        const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                        at::Tensor& v_cache, const at::Tensor& slot_mapping, int64_t num_heads,
                        int64_t num_kv_heads, int64_t head_dim, const at::Tensor& norm_sums,
                        const at::Tensor& norm_weight, double eps) {
  Checks c;
  GemvFusedParams q{};
  const at::Tensor none = at::empty({0});  // no q/k norm
  if (!check_gemv(c, q.gemv, qkv, x, w, bias, NANOPD_GEMV_FUSED_MAX_ROWS, 1).empty() ||
      !check_norm(c, q.norm, q.gemv, x, norm_sums, norm_weight, eps).empty() ||
      !nanopd::check_rotary(c, q.rotary, qkv, positions, cos, sin, none, none,
                            0.0, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads,
                            head_dim)
           .empty()) {
    return c.error();
  }
  q.epilogue = NANOPD_GEMV_ROTARY;
  const c10::cuda::CUDAGuard guard(x.device());
  c.launch(nanopd_gemv_fused(&q, at::cuda::getCurrentCUDAStream()), "gemv_rotary");
  return c.error();
}

// out [rows, n] = RMSNorm(x) w^T + bias, RMSNorm from norm_sums (check_norm); 1 <= rows <= 2
std::string gemv_normed(at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                        const at::Tensor& bias, const at::Tensor& norm_sums,
                        const at::Tensor& norm_weight, double eps) {
  Checks c;
  GemvFusedParams q{};
  if (!check_gemv(c, q.gemv, out, x, w, bias, NANOPD_GEMV_FUSED_MAX_ROWS, 1).empty() ||
      !check_norm(c, q.norm, q.gemv, x, norm_sums, norm_weight, eps).empty()) {
    return c.error();
  }
  c.require(norm_sums.numel() > 0, "gemv_normed needs norm_sums (else: gemv)");
  if (c.failed()) return c.error();
  q.epilogue = NANOPD_GEMV_PLAIN;
  const c10::cuda::CUDAGuard guard(x.device());
  c.launch(nanopd_gemv_fused(&q, at::cuda::getCurrentCUDAStream()), "gemv_normed");
  return c.error();
}

// residual [rows, n] += x [rows, k] w [n, k]^T + bias, in place with the add's rounding, and
// sums [rows, ceil(n / 8)] = the new residual's sums of squares by runs of 8 columns (fp32):
// the next normed GEMV's norm_sums; 1 <= rows <= 2
std::string gemv_add(at::Tensor& residual, const at::Tensor& x, const at::Tensor& w,
                     const at::Tensor& bias, at::Tensor& sums) {
  Checks c;
  GemvFusedParams q{};
  if (!check_gemv(c, q.gemv, residual, x, w, bias, NANOPD_GEMV_FUSED_MAX_ROWS, 1).empty() ||
      !c.on_device(sums, "sums", x.device())) {
    return c.error();
  }
  const int64_t num_sums = (q.gemv.n_dim + NANOPD_GEMV_SUM_COLUMNS - 1) / NANOPD_GEMV_SUM_COLUMNS;
  c.require(sums.scalar_type() == at::kFloat && sums.dim() == 2 &&
                sums.size(0) == q.gemv.num_rows && sums.size(1) == num_sums &&
                sums.is_contiguous(),
            "sums must be contiguous float32 [", q.gemv.num_rows, ", ", num_sums, "]; got ",
            sums.sizes(), " ", sums.scalar_type());
  if (c.failed()) return c.error();
  q.epilogue = NANOPD_GEMV_ADD;
  q.sums = sums.data_ptr<float>();
  const c10::cuda::CUDAGuard guard(x.device());
  c.launch(nanopd_gemv_fused(&q, at::cuda::getCurrentCUDAStream()), "gemv_add");
  return c.error();
}

}  // namespace

void add_gemv_bindings(pybind11::module_& m) {
  m.def("gemv", &gemv, "out = x w^T (+ bias) for 1-8 rows of x (gemv.cu)");
  m.def("gemv_silu_and_mul", &gemv_silu_and_mul,
        "the gate_up GEMV with SiLU-and-mul in its epilogue (gemv_fused.cu)");
  m.def("gemv_rotary", &gemv_rotary,
        "the qkv GEMV with rotary and the KV store in its epilogue (gemv_fused.cu)");
  m.def("gemv_normed", &gemv_normed,
        "the GEMV of RMSNorm(x), the norm from an ADD epilogue's sums (gemv_fused.cu)");
  m.def("gemv_add", &gemv_add,
        "the GEMV added into the residual, with its sums of squares (gemv_fused.cu)");
}
