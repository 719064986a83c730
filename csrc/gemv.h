// nanopd GEMV for decode-sized batches: launcher interface (plain C, no torch), as
// nanopd_kernels.h. csrc/gemv_bindings.cpp checks tensors and calls it;
// services/worker/ops/gemv_ops.py is the Python side, with F.linear as its torch reference.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "fused_kernels.h"  // RotaryStoreKvParams
#include "nanopd_kernels.h"  // NANOPD_FP16, NANOPD_BF16

#ifdef __cplusplus
extern "C" {
#endif

enum { NANOPD_GEMV_MAX_ROWS = 8 };

// out[m, n] = round(sum_k x[m, k] w[n, k] + bias[n]), fp32 products and sums, for a few rows
// of x (1 <= num_rows <= NANOPD_GEMV_MAX_ROWS): a decode step's linear layer, which only has
// to stream the weight once. x [num_rows, k_dim] and out [num_rows, n_dim] with row strides;
// w [n_dim, k_dim] row-major (a linear layer's weight) with a row stride; bias [n_dim]
// contiguous or NULL. k_dim a multiple of 8; every row of x and w 16-byte aligned.
typedef struct {
  void* out;
  const void* x;
  const void* w;
  const void* bias;  // NULL: none
  int64_t out_stride_row, x_stride_row, w_stride_row;
  int num_rows, n_dim, k_dim;
  int dtype;  // NANOPD_FP16 or NANOPD_BF16
} GemvParams;

cudaError_t nanopd_gemv(const GemvParams* p, cudaStream_t stream);

// The GEMV of a decode layer with the kernel after it folded into its epilogue
// (csrc/gemv_fused.cu; torch references in services/worker/ops/fused_reference.py), for 1-2
// rows, bitwise the GEMV then that kernel. Epilogues:
//   NANOPD_GEMV_SWIGLU: w [n_dim = 2 I, k_dim] is [gate; up] and out is [rows, I] =
//     silu_and_mul(linear(x)), fused_kernels.h's SiLU-and-mul of the GEMV's rounded outputs.
//   NANOPD_GEMV_ROTARY: out is qkv [rows, n_dim], rotated (no q/k norm) with k and v written
//     into the cache as nanopd_rotary_store_kv does with `rotary` (its qkv = out, num_tokens
//     = rows).
enum { NANOPD_GEMV_SWIGLU = 1, NANOPD_GEMV_ROTARY = 2 };
enum { NANOPD_GEMV_FUSED_MAX_ROWS = 2 };
typedef struct {
  GemvParams gemv;             // n_dim even; with SWIGLU, out is [rows, n_dim / 2]
  int epilogue;                // NANOPD_GEMV_SWIGLU or NANOPD_GEMV_ROTARY
  RotaryStoreKvParams rotary;  // ROTARY: positions, tables, caches, slots, heads
} GemvFusedParams;

cudaError_t nanopd_gemv_fused(const GemvFusedParams* p, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
