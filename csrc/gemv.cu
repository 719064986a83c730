// GEMV for decode-sized batches: out = x w^T (+ bias) for 1-8 rows of x (csrc/gemv.h).
//
// A decode step at batch 1-8 multiplies a few activation rows by every linear layer's weight:
// the weight is read once and each of its bytes does at most 8 multiply-adds, so the step is
// bound by how fast the weight streams in. At one row cuBLAS read the 1.5B shape's attention
// projections at 0.17-0.31 of the copy bandwidth (bench/decode_profile.py, H200, 2026-12-01);
// this kernel keeps ~24 16-byte loads in flight per thread from the start.
//
// Layout: one warp per R consecutive output columns (rows of w), every lane reading 16-byte
// pieces of those weight rows 256 elements apart, U pieces per row ahead of use, so each lane
// keeps R x U independent 16-byte loads in flight (the weight bypasses L1: it is read once).
// x rows are read through L1 (every warp of the block reads the same x). Each lane keeps fp32
// sums for its (row of x, column) pairs; a warp reduction gives each output, to which the
// bias is added in fp32 before the one rounding to the dtype (cuBLAS's epilogue does the same).
// No shared memory and no block-wide sync: a warp past the last column just returns.
// __launch_bounds__(.., 1) lets ptxas use the registers that many loads in flight need (with
// the default it sank each load next to its use: 2-3 in flight, by the SASS). At 4-8 rows the
// CUDA-core sums cost more than cuBLAS's tensor cores: ops/gemv_ops.py uses it for 1-2 rows.
#include "gemv.cuh"
#include "launch.h"

namespace nanopd {
namespace {

using namespace gemv;

template <typename T, int M, int R>
__global__ void __launch_bounds__(kWarps * 32, 1) gemv_kernel(const GemvParams p) {
  const int lane = threadIdx.x % 32;
  const int n0 = (blockIdx.x * kWarps + threadIdx.x / 32) * R;
  if (n0 >= p.n_dim) return;
  float acc[M][R];
  column_sums<T, M, R>(p, n0, 0, lane, acc);
  store_columns<T, M, R>(p, acc, n0, lane);
}

template <typename T, int M, int R>
cudaError_t launch_cols(const GemvParams& p, cudaStream_t stream) {
  const int64_t warps = (p.n_dim + R - 1) / R;
  const int64_t blocks = (warps + kWarps - 1) / kWarps;
  return launch_kernel(gemv_kernel<T, M, R>, dim3((unsigned)blocks), dim3(kWarps * 32), 0,
                       stream, p);
}

// Columns per warp: 4 for wide layers at 1-2 rows (fewer, longer warps: a warp of 2 columns
// of a 1536-wide row is done after one round of loads), else 2 (enough warps for every SM).
template <typename T, int M>
cudaError_t launch_rows(const GemvParams& p, cudaStream_t stream) {
  if (M <= 2 && p.n_dim >= 8192) return launch_cols<T, M, 4>(p, stream);
  return launch_cols<T, M, 2>(p, stream);
}

template <typename T>
cudaError_t launch(const GemvParams& p, cudaStream_t stream) {
  switch (p.num_rows) {
    case 1: return launch_rows<T, 1>(p, stream);
    case 2: return launch_rows<T, 2>(p, stream);
    case 3: return launch_rows<T, 3>(p, stream);
    case 4: return launch_rows<T, 4>(p, stream);
    case 5: return launch_rows<T, 5>(p, stream);
    case 6: return launch_rows<T, 6>(p, stream);
    case 7: return launch_rows<T, 7>(p, stream);
    case 8: return launch_rows<T, 8>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace
}  // namespace nanopd

extern "C" cudaError_t nanopd_gemv(const GemvParams* p, cudaStream_t stream) {
  if (p->num_rows < 1 || p->num_rows > NANOPD_GEMV_MAX_ROWS || p->n_dim < 1 || p->k_dim < 1 ||
      p->k_dim % 8 != 0 || p->n_dim >= (1 << 30)) {
    return cudaErrorInvalidValue;
  }
  if (p->dtype == NANOPD_BF16) return nanopd::launch<__nv_bfloat16>(*p, stream);
  if (p->dtype == NANOPD_FP16) return nanopd::launch<__half>(*p, stream);
  return cudaErrorInvalidValue;
}
