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

// The GEMV of a decode layer with the kernels around it folded in (csrc/gemv_fused.cu; torch
// references in services/worker/ops/fused_reference.py), for 1-2 rows. Epilogues:
//   NANOPD_GEMV_SWIGLU: w [n_dim = 2 I, k_dim] is [gate; up] and out is [rows, I] =
//     silu_and_mul(linear(x)), fused_kernels.h's SiLU-and-mul of the GEMV's rounded outputs.
//   NANOPD_GEMV_ROTARY: out is qkv [rows, n_dim], rotated (no q/k norm) with k and v written
//     into the cache as nanopd_rotary_store_kv does with `rotary` (its qkv = out, num_tokens
//     = rows).
//   NANOPD_GEMV_ADD: out is the residual stream [rows, n_dim], read and written in place:
//     out = round(round(linear(x)) + out), the rounding of fused_add_rms_norm's add; and
//     `sums` [rows, ceil(n_dim / NANOPD_GEMV_SUM_COLUMNS)] gets, for each run of that many
//     columns, the sum of squares of its new values (fp32, a fixed order): what the next
//     GEMV's NORM prologue needs of that row.
//   NANOPD_GEMV_PLAIN: out = linear(x), as nanopd_gemv (for a NORM prologue alone).
// SWIGLU and ROTARY are bitwise the GEMV then that kernel; ADD's new residual is bitwise the
// add's.
// A NORM prologue (norm.sums not NULL; any epilogue but ADD; k_dim at most 4096): x is a
// residual stream row after an ADD epilogue and the GEMV multiplies RMSNorm(x) instead:
// round(weight * round(x * inv)) with inv = rsqrt(sum / k_dim + eps), the sum over the row's
// norm.num_sums sums of squares (at most NANOPD_GEMV_NORM_MAX_SUMS), as nanopd_rms_norm
// rounds (its sum in another order).
enum { NANOPD_GEMV_SWIGLU = 1, NANOPD_GEMV_ROTARY = 2, NANOPD_GEMV_ADD = 3,
       NANOPD_GEMV_PLAIN = 4 };
enum { NANOPD_GEMV_FUSED_MAX_ROWS = 2 };
enum { NANOPD_GEMV_SUM_COLUMNS = 8 };      // ADD: columns per sum of squares (a thread block's)
enum { NANOPD_GEMV_NORM_MAX_SUMS = 512 };  // NORM: sums a row, at most (a hidden size <= 4096)
typedef struct {
  const float* sums;   // [rows, num_sums] (row stride num_sums); NULL: no norm, x as given
  const void* weight;  // [k_dim] contiguous, in the dtype: the RMSNorm's weight
  int num_sums;
  float eps;
} GemvNormParams;
typedef struct {
  GemvParams gemv;             // n_dim even for SWIGLU (out [rows, n_dim / 2]) and ROTARY
  int epilogue;                // NANOPD_GEMV_SWIGLU, _ROTARY, _ADD or _PLAIN
  RotaryStoreKvParams rotary;  // ROTARY: positions, tables, caches, slots, heads
  GemvNormParams norm;         // the NORM prologue (sums NULL: none)
  float* sums;                 // ADD: [rows, ceil(n_dim / NANOPD_GEMV_SUM_COLUMNS)], written
} GemvFusedParams;

cudaError_t nanopd_gemv_fused(const GemvFusedParams* p, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
