// Fused decoder-layer kernels: RMSNorm (plain and with the residual add), rotary embedding with
// the KV store (and Qwen3's per-head q/k norm), SiLU-and-mul. Interfaces and the roundings they
// reproduce: fused_kernels.h; torch references: services/worker/ops/fused_reference.py.
//
// Every rounding of the torch reference is explicit here: products and sums go through
// __fmul_rn / __fadd_rn (never contracted into an FMA) and each intermediate that torch keeps
// in the dtype is rounded to it (rnd<T>). The only non-bitwise step is the mean of squares of
// the norms, summed in another order than torch's reduction.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#include "device_utils.cuh"
#include "fused_kernels.h"
#include "fused_math.cuh"
#include "launch.h"

namespace nanopd {
namespace {

constexpr int kNormThreads = 512;   // at most, per row
constexpr int kRotaryThreads = 256;
constexpr int kSiluThreads = 256;
// One thread block per row; each thread keeps up to VPT 16-byte vectors of it in registers.
template <typename T, int VPT>
__global__ void __launch_bounds__(kNormThreads) rms_norm_kernel(const RmsNormParams p,
                                                                float inv_hidden) {
  pdl_wait();  // x and residual come from the previous kernel (launch.h)
  pdl_launch_dependents();
  const int64_t row = blockIdx.x;
  const int num_vecs = p.hidden_size / 8;
  const T* x = static_cast<const T*>(p.x) + row * p.x_stride_token;
  T* residual = p.residual == nullptr
                    ? nullptr
                    : static_cast<T*>(p.residual) + row * p.residual_stride_token;
  uint4 v[VPT];
  float sum_sq = 0.f;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    if (i < num_vecs) {
      v[k] = load8(x + 8 * i);
      float f[8];
      unpack8<T>(v[k], f);
      if (residual != nullptr) {  // residual = round(x + residual), the row to normalize
        float r[8];
        unpack8<T>(load8(residual + 8 * i), r);
#pragma unroll
        for (int e = 0; e < 8; ++e) f[e] = rnd<T>(__fadd_rn(f[e], r[e]));
        v[k] = pack8<T>(f);
        store8(residual + 8 * i, v[k]);
      }
      sum_sq = __fadd_rn(sum_sq, sum_sq8(f));
    }
  }
  // every read of x is done before the barrier inside: out may be x
  const float total = block_total(sum_sq);
  const float inv = rsqrtf(__fadd_rn(__fmul_rn(total, inv_hidden), p.eps));
  T* out = static_cast<T*>(p.out) + row * p.out_stride_token;
  const T* weight = static_cast<const T*>(p.weight);
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    if (i < num_vecs) {
      float f[8];
      unpack8<T>(v[k], f);
      scale_by_weight<T>(f, inv, load8(weight + 8 * i));
      store8(out + 8 * i, pack8<T>(f));
    }
  }
}

__device__ __forceinline__ void load_table8(const float* row, float (&f)[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(row));
  const float4 b = __ldg(reinterpret_cast<const float4*>(row + 4));
  f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
}

// lanes_per_head = head_dim / 16 consecutive threads per (token, head): lane l holds dims
// 8l .. 8l + 7 (a) and their rotate-half partners D/2 + 8l .. (b). The heads of a token are
// q heads, then k, then v; a v head is only copied into the cache.
template <typename T>
__global__ void __launch_bounds__(kRotaryThreads) rotary_store_kv_kernel(
    const RotaryStoreKvParams p, int lanes_per_head) {
  pdl_wait();  // qkv comes from the previous kernel (launch.h)
  pdl_launch_dependents();
  const int heads = p.num_heads + 2 * p.num_kv_heads;
  const int64_t i = (int64_t)blockIdx.x * kRotaryThreads + threadIdx.x;
  const int lane = (int)(i % lanes_per_head);
  const int64_t unit = i / lanes_per_head;
  const int head = (int)(unit % heads);
  const int64_t token = unit / heads;
  const bool valid = token < p.num_tokens;  // no early exit: every lane joins the shuffles
  const bool is_q = head < p.num_heads;
  const bool is_v = head >= p.num_heads + p.num_kv_heads;
  const int half = p.head_dim / 2;
  T* row = static_cast<T*>(p.qkv) + (valid ? token : 0) * p.qkv_stride_token +
           (int64_t)head * p.head_dim;
  const uint4 raw_a = valid ? load8(row + 8 * lane) : make_uint4(0, 0, 0, 0);
  const uint4 raw_b = valid ? load8(row + half + 8 * lane) : make_uint4(0, 0, 0, 0);
  float a[8], b[8];
  unpack8<T>(raw_a, a);
  unpack8<T>(raw_b, b);

  if (p.q_norm_weight != nullptr) {  // Qwen3: RMSNorm of each q and k head over head_dim
    float sum_sq = __fadd_rn(sum_sq8(a), sum_sq8(b));
    for (int o = lanes_per_head / 2; o > 0; o /= 2) {
      sum_sq += __shfl_xor_sync(kFullMask, sum_sq, o);
    }
    if (!is_v) {
      const float inv =
          rsqrtf(__fadd_rn(__fmul_rn(sum_sq, 1.f / (float)p.head_dim), p.eps));
      const T* w = static_cast<const T*>(is_q ? p.q_norm_weight : p.k_norm_weight);
      scale_by_weight<T>(a, inv, load8(w + 8 * lane));
      scale_by_weight<T>(b, inv, load8(w + half + 8 * lane));
    }
  }

  uint4 out_a = raw_a, out_b = raw_b;
  if (!is_v) {
    const int64_t pos = valid ? p.positions[token] : 0;
    float ca[8], cb[8], sa[8], sb[8];
    if (pos >= 0 && pos < p.max_positions) {
      const float* c = p.cos + pos * p.head_dim + 8 * lane;
      const float* s = p.sin + pos * p.head_dim + 8 * lane;
      load_table8(c, ca);
      load_table8(c + half, cb);
      load_table8(s, sa);
      load_table8(s + half, sb);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) ca[e] = cb[e] = sa[e] = sb[e] = __int_as_float(0x7fc00000);
    }
    float ra[8], rb[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {  // x * cos + rotate_half(x) * sin, cos and sin in the dtype
      ra[e] = rnd<T>(__fadd_rn(rnd<T>(__fmul_rn(a[e], rnd<T>(ca[e]))),
                               rnd<T>(__fmul_rn(-b[e], rnd<T>(sa[e])))));
      rb[e] = rnd<T>(__fadd_rn(rnd<T>(__fmul_rn(b[e], rnd<T>(cb[e]))),
                               rnd<T>(__fmul_rn(a[e], rnd<T>(sb[e])))));
    }
    out_a = pack8<T>(ra);
    out_b = pack8<T>(rb);
    if (valid) {
      store8(row + 8 * lane, out_a);
      store8(row + half + 8 * lane, out_b);
    }
  }

  if (valid && !is_q) {
    const int64_t slot = p.slot_mapping[token];
    if (slot >= 0) {  // a negative slot: a padding token, nothing to store
      const int64_t block = slot / p.block_size, offset = slot % p.block_size;
      T* dst;
      if (is_v) {
        dst = static_cast<T*>(p.v_cache) + block * p.v_stride_block + offset * p.v_stride_slot +
              (int64_t)(head - p.num_heads - p.num_kv_heads) * p.v_stride_head;
      } else {
        dst = static_cast<T*>(p.k_cache) + block * p.k_stride_block + offset * p.k_stride_slot +
              (int64_t)(head - p.num_heads) * p.k_stride_head;
      }
      store8(dst + 8 * lane, out_a);
      store8(dst + half + 8 * lane, out_b);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kSiluThreads) silu_and_mul_kernel(const SiluAndMulParams p) {
  pdl_wait();  // x comes from the previous kernel (launch.h)
  pdl_launch_dependents();
  const int num_vecs = p.intermediate_size / 8;
  const int64_t total = (int64_t)p.num_tokens * num_vecs;
  for (int64_t i = (int64_t)blockIdx.x * kSiluThreads + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * kSiluThreads) {
    const int64_t token = i / num_vecs;
    const int j = (int)(i % num_vecs);
    const T* x = static_cast<const T*>(p.x) + token * p.x_stride_token + 8 * j;
    float gate[8], up[8];
    unpack8<T>(load8(x), gate);
    unpack8<T>(load8(x + p.intermediate_size), up);
    swiglu8<T>(gate, up);
    store8(static_cast<T*>(p.out) + token * p.out_stride_token + 8 * j, pack8<T>(gate));
  }
}

template <typename T>
cudaError_t norm_by_vecs(const RmsNormParams& p, cudaStream_t stream) {
  const int num_vecs = p.hidden_size / 8;
  const int threads = num_vecs >= kNormThreads ? kNormThreads : (num_vecs + 31) / 32 * 32;
  const int per_thread = (num_vecs + threads - 1) / threads;
  const float inv_hidden = 1.f / (float)p.hidden_size;
  const dim3 grid(p.num_tokens);
  if (per_thread <= 1) {
    return launch_kernel(rms_norm_kernel<T, 1>, grid, dim3(threads), 0, stream, p, inv_hidden);
  } else if (per_thread <= 2) {
    return launch_kernel(rms_norm_kernel<T, 2>, grid, dim3(threads), 0, stream, p, inv_hidden);
  } else if (per_thread <= 4) {
    return launch_kernel(rms_norm_kernel<T, 4>, grid, dim3(threads), 0, stream, p, inv_hidden);
  } else if (per_thread <= 8) {
    return launch_kernel(rms_norm_kernel<T, 8>, grid, dim3(threads), 0, stream, p, inv_hidden);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t rotary_launch(const RotaryStoreKvParams& p, cudaStream_t stream) {
  const int lanes = p.head_dim / 16;
  const int64_t threads = (int64_t)p.num_tokens * (p.num_heads + 2 * p.num_kv_heads) * lanes;
  if (threads >= (1LL << 31)) return cudaErrorInvalidValue;
  const int64_t blocks = (threads + kRotaryThreads - 1) / kRotaryThreads;
  return launch_kernel(rotary_store_kv_kernel<T>, dim3((unsigned)blocks), dim3(kRotaryThreads), 0,
                       stream, p, lanes);
}

template <typename T>
cudaError_t silu_launch(const SiluAndMulParams& p, cudaStream_t stream) {
  const int64_t total = (int64_t)p.num_tokens * (p.intermediate_size / 8);
  const int64_t blocks = (total + kSiluThreads - 1) / kSiluThreads;
  const int grid = (int)(blocks < (1 << 20) ? blocks : (1 << 20));  // grid-stride beyond that
  return launch_kernel(silu_and_mul_kernel<T>, dim3(grid), dim3(kSiluThreads), 0, stream, p);
}

bool valid_dtype(int dtype) { return dtype == NANOPD_FP16 || dtype == NANOPD_BF16; }

}  // namespace
}  // namespace nanopd

extern "C" cudaError_t nanopd_rms_norm(const RmsNormParams* p, cudaStream_t stream) {
  using namespace nanopd;
  if (p->num_tokens == 0) return cudaSuccess;
  if (!valid_dtype(p->dtype) || p->num_tokens < 0 || p->hidden_size <= 0 ||
      p->hidden_size % 8 != 0 || p->hidden_size > NANOPD_RMS_NORM_MAX_HIDDEN || !p->out ||
      !p->x || !p->weight) {
    return cudaErrorInvalidValue;
  }
  return p->dtype == NANOPD_BF16 ? norm_by_vecs<__nv_bfloat16>(*p, stream)
                                 : norm_by_vecs<__half>(*p, stream);
}

extern "C" cudaError_t nanopd_rotary_store_kv(const RotaryStoreKvParams* p,
                                              cudaStream_t stream) {
  using namespace nanopd;
  if (p->num_tokens == 0) return cudaSuccess;
  const int lanes = p->head_dim / 16;
  const bool ok = valid_dtype(p->dtype) && p->num_tokens > 0 && p->num_heads > 0 &&
                  p->num_kv_heads > 0 && p->head_dim % 16 == 0 && lanes >= 1 &&
                  lanes <= 32 && (lanes & (lanes - 1)) == 0 && p->block_size > 0 &&
                  p->max_positions > 0 && p->qkv && p->positions && p->cos && p->sin &&
                  p->k_cache && p->v_cache && p->slot_mapping &&
                  (p->q_norm_weight == nullptr) == (p->k_norm_weight == nullptr);
  if (!ok) return cudaErrorInvalidValue;
  return p->dtype == NANOPD_BF16 ? rotary_launch<__nv_bfloat16>(*p, stream)
                                 : rotary_launch<__half>(*p, stream);
}

extern "C" cudaError_t nanopd_silu_and_mul(const SiluAndMulParams* p, cudaStream_t stream) {
  using namespace nanopd;
  if (p->num_tokens == 0) return cudaSuccess;
  if (!valid_dtype(p->dtype) || p->num_tokens < 0 || p->intermediate_size <= 0 ||
      p->intermediate_size % 8 != 0 || !p->out || !p->x) {
    return cudaErrorInvalidValue;
  }
  return p->dtype == NANOPD_BF16 ? silu_launch<__nv_bfloat16>(*p, stream)
                                 : silu_launch<__half>(*p, stream);
}
