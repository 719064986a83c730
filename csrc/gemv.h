// nanopd GEMV for decode-sized batches: launcher interface (plain C, no torch), as
// nanopd_kernels.h. csrc/gemv_bindings.cpp checks tensors and calls it;
// services/worker/ops/gemv_ops.py is the Python side, with F.linear as its torch reference.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

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

// The GEMV with its x made first, in shared memory, by the kernel that a decode layer would
// otherwise run before it (torch references in services/worker/ops/fused_reference.py):
//   NANOPD_GEMV_ADD_NORM: x = fused_add_rms_norm(x, residual) of gemv.x [rows, k_dim] with
//     norm_weight [k_dim] and eps (fused_kernels.h's roundings); with residual != NULL
//     (strided [rows, k_dim]) the new residual round(x + residual) is also written to
//     residual_out (strided [rows, k_dim], not aliasing x or residual); with residual NULL
//     x itself is normalized (the first layer) and nothing else is written.
//   NANOPD_GEMV_SWIGLU: x = silu_and_mul(gemv.x) of gemv.x [rows, 2 k_dim] (gate, then up).
// rows * k_dim * element size at most NANOPD_GEMV_PROLOGUE_MAX_NBYTES (shared memory).
enum { NANOPD_GEMV_ADD_NORM = 1, NANOPD_GEMV_SWIGLU = 2 };
enum { NANOPD_GEMV_PROLOGUE_MAX_NBYTES = 160 * 1024 };
typedef struct {
  GemvParams gemv;
  int mode;
  const void* residual;      // ADD_NORM: NULL or [rows, k_dim]
  void* residual_out;        // ADD_NORM with residual: [rows, k_dim]
  const void* norm_weight;   // ADD_NORM: [k_dim], contiguous
  int64_t residual_stride_row, residual_out_stride_row;
  float eps;
} GemvPrologueParams;

cudaError_t nanopd_gemv_prologue(const GemvPrologueParams* p, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
