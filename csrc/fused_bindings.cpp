// Python bindings of the fused decoder-layer kernels (csrc/fused.cu): check tensors, then call
// the plain launchers of fused_kernels.h. bindings.cpp adds them to the one extension module
// (add_fused_bindings); services/worker/ops/fused_ops.py calls them. Each binding returns ""
// or the error and never throws (binding_checks.h says why).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "binding_checks.h"
#include "fused_bindings.h"
#include "fused_kernels.h"

namespace {

using nanopd::Checks;
using Named = std::pair<const at::Tensor*, const char*>;

bool half_dtype(Checks& c, const at::Tensor& t, const char* what) {
  const auto dtype = t.scalar_type();
  return c.require(dtype == at::kHalf || dtype == at::kBFloat16, what,
                   " takes float16 or bfloat16 (float32 stays on the torch path); got ", dtype);
}

int dtype_code(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf ? NANOPD_FP16 : NANOPD_BF16;
}

// x and out [num_tokens, hidden] rows contiguous and 16-byte aligned; weight [hidden].
std::string check_norm(Checks& c, const at::Tensor& out, const at::Tensor& x,
                       const at::Tensor& weight, const at::Tensor* residual) {
  const at::Device device = x.device();
  for (auto [t, name] : {Named{&x, "x"}, {&out, "out"}, {&weight, "weight"}}) {
    if (!c.on_device(*t, name, device)) return c.error();
  }
  if (residual != nullptr && !c.on_device(*residual, "residual", device)) return c.error();
  if (!half_dtype(c, x, "rms_norm")) return c.error();
  c.require(out.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type() &&
                (residual == nullptr || residual->scalar_type() == x.scalar_type()),
            "x, weight", residual ? ", residual" : "", " and out must share one dtype");
  c.require(x.dim() == 2 && out.sizes() == x.sizes() &&
                (residual == nullptr || residual->sizes() == x.sizes()),
            "x", residual ? ", residual" : "", " and out must be [num_tokens, hidden] of one shape");
  if (c.failed()) return c.error();
  const int64_t hidden = x.size(1);
  c.require(hidden % 8 == 0 && hidden > 0 && hidden <= NANOPD_RMS_NORM_MAX_HIDDEN, "hidden ",
            hidden, " must be a positive multiple of 8 up to ",
            (int)NANOPD_RMS_NORM_MAX_HIDDEN);
  c.require(weight.dim() == 1 && weight.size(0) == hidden && weight.is_contiguous(),
            "weight must be contiguous [", hidden, "]");
  c.require(x.size(0) < (1LL << 31), "too many tokens: ", x.size(0));
  if (c.failed()) return c.error();
  for (auto [t, name] : {Named{&x, "x"}, {&out, "out"}, {&weight, "weight"}}) c.rows16(*t, name);
  if (residual != nullptr) c.rows16(*residual, "residual");
  return c.error();
}

std::string launch_norm(Checks& c, const at::Tensor& out, const at::Tensor& x,
                        const at::Tensor& weight, at::Tensor* residual, double eps) {
  RmsNormParams p{};
  p.out = out.data_ptr(), p.x = x.data_ptr(), p.weight = weight.data_ptr();
  p.residual = residual ? residual->data_ptr() : nullptr;
  p.out_stride_token = out.stride(0), p.x_stride_token = x.stride(0);
  p.residual_stride_token = residual ? residual->stride(0) : 0;
  p.num_tokens = (int)x.size(0), p.hidden_size = (int)x.size(1);
  p.eps = (float)eps;
  p.dtype = dtype_code(x);
  const c10::cuda::CUDAGuard guard(x.device());
  c.launch(nanopd_rms_norm(&p, at::cuda::getCurrentCUDAStream()), "rms_norm");
  return c.error();
}

std::string rms_norm(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                     double eps) {
  Checks c;
  if (!check_norm(c, out, x, weight, nullptr).empty()) return c.error();
  return launch_norm(c, out, x, weight, nullptr, eps);
}

std::string fused_add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight,
                               double eps) {
  Checks c;
  if (!check_norm(c, x, x, weight, &residual).empty()) return c.error();
  if (!c.require(x.data_ptr() != residual.data_ptr(), "x and residual must be two tensors")) {
    return c.error();
  }
  return launch_norm(c, x, x, weight, &residual, eps);
}

}  // namespace

namespace nanopd {

// The checks of rotary_store_kv's tensors (also those of the GEMV with the rotation in its
// epilogue, gemv_bindings.cpp); fills p. fused_bindings.h
std::string check_rotary(Checks& c, RotaryStoreKvParams& p, at::Tensor& qkv,
                         const at::Tensor& positions, const at::Tensor& cos,
                         const at::Tensor& sin, const at::Tensor& q_norm_weight,
                         const at::Tensor& k_norm_weight, double eps, at::Tensor& k_cache,
                         at::Tensor& v_cache, const at::Tensor& slot_mapping, int64_t num_heads,
                         int64_t num_kv_heads, int64_t head_dim) {
  const at::Device device = qkv.device();
  for (auto [t, name] : {Named{&qkv, "qkv"}, {&positions, "positions"}, {&cos, "cos"},
                         {&sin, "sin"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"},
                         {&slot_mapping, "slot_mapping"}}) {
    if (!c.on_device(*t, name, device)) return c.error();
  }
  if (!half_dtype(c, qkv, "rotary_store_kv")) return c.error();
  const auto dtype = qkv.scalar_type();
  const int64_t lanes = head_dim / 16;
  c.require(head_dim > 0 && head_dim % 16 == 0 && lanes <= 32 && (lanes & (lanes - 1)) == 0,
            "head_dim ", head_dim, " is not built (16, 32, 64, 128, 256 or 512)");
  c.require(num_heads > 0 && num_kv_heads > 0, "num_heads and num_kv_heads must be positive");
  if (c.failed()) return c.error();
  const int64_t width = (num_heads + 2 * num_kv_heads) * head_dim;
  c.require(qkv.dim() == 2 && qkv.size(1) == width, "qkv must be [num_tokens, ", width,
            "] for ", num_heads, " + 2 x ", num_kv_heads, " heads of ", head_dim);
  c.require(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() &&
                k_cache.size(2) == num_kv_heads && k_cache.size(3) == head_dim,
            "k_cache and v_cache must be [num_blocks, block_size, ", num_kv_heads, ", ",
            head_dim, "]");
  c.require(k_cache.scalar_type() == dtype && v_cache.scalar_type() == dtype,
            "qkv and the caches must share one dtype");
  if (c.failed()) return c.error();
  const int64_t num_tokens = qkv.size(0);
  c.require(positions.scalar_type() == at::kLong && positions.dim() == 1 &&
                positions.size(0) == num_tokens && positions.is_contiguous(),
            "positions must be contiguous int64 [num_tokens]");
  c.require(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                slot_mapping.size(0) == num_tokens && slot_mapping.is_contiguous(),
            "slot_mapping must be contiguous int64 [num_tokens]");
  c.require(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
                cos.dim() == 2 && cos.size(1) == head_dim && sin.sizes() == cos.sizes() &&
                cos.is_contiguous() && sin.is_contiguous(),
            "cos and sin must be contiguous float32 [max_positions, ", head_dim, "]");
  const bool qk_norm = q_norm_weight.numel() > 0;
  c.require(qk_norm == (k_norm_weight.numel() > 0),
            "give both q_norm_weight and k_norm_weight or neither");
  if (c.failed()) return c.error();
  if (qk_norm) {
    for (auto [t, name] : {Named{&q_norm_weight, "q_norm_weight"},
                           {&k_norm_weight, "k_norm_weight"}}) {
      if (!c.on_device(*t, name, device)) return c.error();
      c.require(t->scalar_type() == dtype && t->dim() == 1 && t->size(0) == head_dim &&
                    t->is_contiguous(),
                name, " must be contiguous [", head_dim, "] in qkv's dtype");
      c.rows16(*t, name);
    }
  }
  c.require(num_tokens * (width / 8) < (1LL << 31), "too many tokens: ", num_tokens);
  for (auto [t, name] : {Named{&qkv, "qkv"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"},
                         {&cos, "cos"}, {&sin, "sin"}}) {
    c.rows16(*t, name);
  }
  if (c.failed()) return c.error();
  p.qkv = qkv.data_ptr();
  p.positions = positions.data_ptr<int64_t>();
  p.cos = cos.data_ptr<float>(), p.sin = sin.data_ptr<float>();
  p.q_norm_weight = qk_norm ? q_norm_weight.data_ptr() : nullptr;
  p.k_norm_weight = qk_norm ? k_norm_weight.data_ptr() : nullptr;
  p.k_cache = k_cache.data_ptr(), p.v_cache = v_cache.data_ptr();
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.qkv_stride_token = qkv.stride(0);
  p.k_stride_block = k_cache.stride(0), p.k_stride_slot = k_cache.stride(1);
  p.k_stride_head = k_cache.stride(2);
  p.v_stride_block = v_cache.stride(0), p.v_stride_slot = v_cache.stride(1);
  p.v_stride_head = v_cache.stride(2);
  p.max_positions = cos.size(0);
  p.num_tokens = (int)num_tokens, p.num_heads = (int)num_heads;
  p.num_kv_heads = (int)num_kv_heads, p.head_dim = (int)head_dim;
  p.block_size = (int)k_cache.size(1);
  p.eps = (float)eps;
  p.dtype = dtype_code(qkv);
  return c.error();
}

}  // namespace nanopd

namespace {

std::string rotary_store_kv(at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos,
                            const at::Tensor& sin, const at::Tensor& q_norm_weight,
                            const at::Tensor& k_norm_weight, double eps, at::Tensor& k_cache,
                            at::Tensor& v_cache, const at::Tensor& slot_mapping,
                            int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
  Checks c;
  RotaryStoreKvParams p{};
  if (!nanopd::check_rotary(c, p, qkv, positions, cos, sin, q_norm_weight, k_norm_weight, eps,
                            k_cache, v_cache, slot_mapping, num_heads, num_kv_heads, head_dim)
           .empty()) {
    return c.error();
  }
  const at::Device device = qkv.device();
  const c10::cuda::CUDAGuard guard(device);
  c.launch(nanopd_rotary_store_kv(&p, at::cuda::getCurrentCUDAStream()), "rotary_store_kv");
  return c.error();
}

std::string silu_and_mul(at::Tensor& out, const at::Tensor& x) {
  Checks c;
  const at::Device device = x.device();
  for (auto [t, name] : {Named{&x, "x"}, {&out, "out"}}) {
    if (!c.on_device(*t, name, device)) return c.error();
  }
  if (!half_dtype(c, x, "silu_and_mul")) return c.error();
  c.require(out.scalar_type() == x.scalar_type(), "x and out must share one dtype");
  c.require(x.dim() == 2 && out.dim() == 2 && x.size(1) % 16 == 0 && x.size(1) > 0 &&
                out.size(0) == x.size(0) && out.size(1) * 2 == x.size(1),
            "x must be [num_tokens, 2 * intermediate] (intermediate a multiple of 8) and out "
            "[num_tokens, intermediate]");
  if (c.failed()) return c.error();
  c.require(x.size(0) < (1LL << 31), "too many tokens: ", x.size(0));
  c.rows16(x, "x");
  c.rows16(out, "out");
  if (c.failed()) return c.error();
  SiluAndMulParams p{};
  p.out = out.data_ptr(), p.x = x.data_ptr();
  p.out_stride_token = out.stride(0), p.x_stride_token = x.stride(0);
  p.num_tokens = (int)x.size(0), p.intermediate_size = (int)out.size(1);
  p.dtype = dtype_code(x);
  const c10::cuda::CUDAGuard guard(device);
  c.launch(nanopd_silu_and_mul(&p, at::cuda::getCurrentCUDAStream()), "silu_and_mul");
  return c.error();
}

}  // namespace

void add_fused_bindings(pybind11::module_& m) {
  m.def("rms_norm", &rms_norm, "RMSNorm of each row into out (fused.cu)");
  m.def("fused_add_rms_norm", &fused_add_rms_norm,
        "residual += x, then x = RMSNorm(residual), both in place (fused.cu)");
  m.def("rotary_store_kv", &rotary_store_kv,
        "rotary (and Qwen3 q/k norm) in place in qkv, then k and v into their slots");
  m.def("silu_and_mul", &silu_and_mul, "SiLU(gate) * up into out (fused.cu)");
}
