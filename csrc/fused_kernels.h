// nanopd fused decoder-layer kernels: launcher interface (plain C, no torch), as
// nanopd_kernels.h. csrc/fused_bindings.cpp checks tensors and calls these.
//
// Each kernel replaces a chain of small torch kernels and reproduces its roundings (the torch
// references live in services/worker/ops/fused_reference.py). fp16 and bf16 only; every row
// that is read or written 16 bytes at a time (8 elements) must start 16-byte aligned. Strides
// are in elements. Every launcher returns the launch's cudaError_t (cudaErrorInvalidValue for
// arguments it does not support). Nothing here reads a device value on the host: every launch
// may be captured in a CUDA graph.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "nanopd_kernels.h"  // NANOPD_FP16, NANOPD_BF16

#ifdef __cplusplus
extern "C" {
#endif

enum { NANOPD_RMS_NORM_MAX_HIDDEN = 32768 };

// RMSNorm of each row of x [num_tokens, hidden_size] (HF's roundings: fp32 statistics, the
// normalized row rounded to the dtype, then multiplied by weight [hidden_size] in the dtype):
//   out = round(weight * round(x * rsqrt(mean(x^2) + eps)))
// With residual != NULL, the fused residual add first, in place:
//   residual = round(x + residual);  out = the RMSNorm of the new residual
// out may be x. hidden_size a multiple of 8, at most NANOPD_RMS_NORM_MAX_HIDDEN.
typedef struct {
  void* out;
  const void* x;
  void* residual;  // NULL: plain RMSNorm
  const void* weight;
  int64_t out_stride_token, x_stride_token, residual_stride_token;
  int num_tokens, hidden_size;
  float eps;
  int dtype;  // NANOPD_FP16 or NANOPD_BF16
} RmsNormParams;

cudaError_t nanopd_rms_norm(const RmsNormParams* p, cudaStream_t stream);

// Rotary embedding of q and k in place in the fused projection output
// qkv [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim] (q heads, then k, then v), then
// the rotated k and the v of each token written into the cache slot slot_mapping[t]
// (= block * block_size + offset; a negative slot stores nothing: a padding token).
// With q_norm_weight and k_norm_weight (both or neither, [head_dim] each), each q and k head
// is first RMS-normalized over head_dim as RMSNorm does (eps). The rotation is rotate-half
// (non-interleaved) over the fp32 tables cos, sin [max_positions, head_dim] (contiguous),
// cast to the dtype, with torch's roundings (each product, then the sum):
//   out[i] = round(round(x[i] * c[i]) + round(-x[i + D/2] * s[i]))       i <  D/2
//   out[i] = round(round(x[i] * c[i]) + round( x[i - D/2] * s[i]))       i >= D/2
// A position outside [0, max_positions) rotates into NaN (never an out-of-bounds read).
// head_dim / 16 must be a power of two up to 32 (head_dim 16, 32, 64, 128, 256, 512).
// v is left as it is in qkv. Caches [num_blocks, block_size, num_kv_heads, head_dim].
typedef struct {
  void* qkv;
  const int64_t* positions;
  const float* cos;
  const float* sin;
  const void* q_norm_weight;  // NULL: no per-head norm
  const void* k_norm_weight;
  void* k_cache;
  void* v_cache;
  const int64_t* slot_mapping;
  int64_t qkv_stride_token;
  int64_t k_stride_block, k_stride_slot, k_stride_head;
  int64_t v_stride_block, v_stride_slot, v_stride_head;
  int64_t max_positions;
  int num_tokens, num_heads, num_kv_heads, head_dim, block_size;
  float eps;
  int dtype;
} RotaryStoreKvParams;

cudaError_t nanopd_rotary_store_kv(const RotaryStoreKvParams* p, cudaStream_t stream);

// SwiGLU of x [num_tokens, 2 * intermediate_size] (gate, then up) into
// out [num_tokens, intermediate_size], as torch computes F.silu(gate) * up in the dtype:
//   out = round(round(gate / (1 + exp(-gate))) * up)
// intermediate_size a multiple of 8.
typedef struct {
  void* out;
  const void* x;
  int64_t out_stride_token, x_stride_token;
  int num_tokens, intermediate_size;
  int dtype;
} SiluAndMulParams;

cudaError_t nanopd_silu_and_mul(const SiluAndMulParams* p, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
