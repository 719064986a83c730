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
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "device_utils.cuh"
#include "gemv.h"
#include "launch.h"

namespace nanopd {
namespace {

constexpr int kWarps = 4;  // 128 threads: small layers still spread over every SM
constexpr int kPiece = 8;  // elements per 16-byte load
constexpr int kLaneStride = 32 * kPiece;  // elements between a lane's consecutive pieces

template <int M>
__host__ __device__ constexpr int unroll() {  // pieces per weight row in flight: fewer as x takes registers
  return M == 1 ? 8 : (M <= 4 ? 4 : 2);
}

__device__ __forceinline__ uint4 load_streaming(const void* p) {
  uint4 v;
  asm("ld.global.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

template <typename T, int M, int R>
__global__ void __launch_bounds__(kWarps * 32, 1) gemv_kernel(const GemvParams p) {
  constexpr int U = unroll<M>();
  const int lane = threadIdx.x % 32;
  const int n0 = (blockIdx.x * kWarps + threadIdx.x / 32) * R;
  if (n0 >= p.n_dim) return;
  const T* x = static_cast<const T*>(p.x);
  const T* w_rows[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {  // a column past the end re-reads the last one, unused
    w_rows[r] = static_cast<const T*>(p.w) + min(n0 + r, p.n_dim - 1) * p.w_stride_row;
  }
  // the weights are the model's, written long before: their first round is fetched into the
  // L2 while the kernel that writes x may still run (launch.h); x is read after the wait
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int k = lane * kPiece + u * kLaneStride;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (k < p.k_dim) prefetch_l2(w_rows[r] + k);
    }
  }
  pdl_wait();
  pdl_launch_dependents();
  float acc[M][R];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = 0.f;

  for (int k0 = lane * kPiece; k0 < p.k_dim; k0 += U * kLaneStride) {
    uint4 wv[U][R], xv[U][M];
#pragma unroll
    for (int u = 0; u < U; ++u) {  // every load of this round first, then the arithmetic
      const int k = k0 + u * kLaneStride;
      const bool valid = k < p.k_dim;  // loads past k_dim are not made: zeros instead
#pragma unroll
      for (int r = 0; r < R; ++r) {
        wv[u][r] = valid ? load_streaming(w_rows[r] + k) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int m = 0; m < M; ++m) {
        xv[u][m] = valid ? *reinterpret_cast<const uint4*>(x + m * p.x_stride_row + k)
                         : make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float wf[R][8];
#pragma unroll
      for (int r = 0; r < R; ++r) unpack8<T>(wv[u][r], wf[r]);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        float xf[8];
        unpack8<T>(xv[u][m], xf);
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[m][r] = fmaf(xf[e], wf[r][e], acc[m][r]);
      }
    }
  }

  T* out = static_cast<T*>(p.out);
  const T* bias = static_cast<const T*>(p.bias);
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float v = acc[m][r];
#pragma unroll
      for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
      const int n = n0 + r;
      if (lane == (m * R + r) % 32 && n < p.n_dim) {
        if (bias != nullptr) v += to_float(bias[n]);
        out[m * p.out_stride_row + n] = from_float<T>(v);
      }
    }
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
