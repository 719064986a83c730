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

#ifdef __cplusplus
}
#endif
