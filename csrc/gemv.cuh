// GEMV for decode-sized batches, device code shared by gemv.cu (the plain GEMV) and
// gemv_fused.cu (with the next kernel in its epilogue, on pairs of columns). The
// layout and the reasons are in gemv.cu's header and docs/kernels.md ("Linear layers").
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "device_utils.cuh"
#include "gemv.h"

namespace nanopd {
namespace gemv {

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

// The weight row of each of this warp's R columns (a column past the end re-reads the last
// one, unused). Plain (pair_stride 0): the R consecutive columns from c0. Paired (an epilogue
// that combines two outputs: SwiGLU's gate and up, rotary's two halves of a head): R / 2
// pairs from pair c0, pair i being columns a = (i / P) 2P + i % P and a + P for P =
// pair_stride, the first R / 2 rows the a's, the others the b's.
template <typename T, int R>
__device__ __forceinline__ void weight_rows(const GemvParams& p, int c0, int pair_stride,
                                            const T* (&w_rows)[R]) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
    int n;
    if (pair_stride > 0) {
      const int i = min(c0 + r % (R / 2), p.n_dim / 2 - 1);
      n = (i / pair_stride) * 2 * pair_stride + i % pair_stride + (r < R / 2 ? 0 : pair_stride);
    } else {
      n = min(c0 + r, p.n_dim - 1);
    }
    w_rows[r] = static_cast<const T*>(p.w) + n * p.w_stride_row;
  }
}

// The weights are the model's, written long before: their first round is fetched into the L2
// while the kernel that writes x may still run (launch.h)
template <typename T, int M, int R>
__device__ __forceinline__ void prefetch_first_round(const GemvParams& p,
                                                     const T* const (&w_rows)[R], int lane) {
  constexpr int U = unroll<M>();
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int k = lane * kPiece + u * kLaneStride;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (k < p.k_dim) prefetch_l2(w_rows[r] + k);
    }
  }
}

// acc[m][r] = this lane's part of x[m] . w_rows[r]; x rows x_stride_row apart
template <typename T, int M, int R>
__device__ __forceinline__ void lane_sums(const GemvParams& p, const T* x, int64_t x_stride_row,
                                          const T* const (&w_rows)[R], int lane,
                                          float (&acc)[M][R]) {
  constexpr int U = unroll<M>();
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
        xv[u][m] = valid ? *reinterpret_cast<const uint4*>(x + m * x_stride_row + k)
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
}

// The warp's sum for each (row, column), in every lane
template <int M, int R>
__device__ __forceinline__ void warp_sums(float (&acc)[M][R]) {
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int o = 16; o > 0; o /= 2) acc[m][r] += __shfl_xor_sync(0xffffffffu, acc[m][r], o);
}

// The kernels' common body: this warp's R weight rows from column (or pair) c0, their first
// round prefetched before the wait for the previous kernel, then acc[m][r] = the warp's full
// sum x[m] . w_rows[r], in every lane. Launched with PDL (launch.h): x is read after the wait.
template <typename T, int M, int R>
__device__ __forceinline__ void column_sums(const GemvParams& p, int c0, int pair_stride,
                                            int lane, float (&acc)[M][R]) {
  const T* w_rows[R];
  weight_rows<T, R>(p, c0, pair_stride, w_rows);
  prefetch_first_round<T, M, R>(p, w_rows, lane);
  pdl_wait();
  pdl_launch_dependents();
  lane_sums<T, M, R>(p, static_cast<const T*>(p.x), p.x_stride_row, w_rows, lane, acc);
  warp_sums(acc);
}

// The warp's sums (warp_sums) with the bias added in fp32, one rounding, stored: output
// (m, r) by lane (m R + r) % 32
template <typename T, int M, int R>
__device__ __forceinline__ void store_columns(const GemvParams& p, const float (&acc)[M][R],
                                              int n0, int lane) {
  T* out = static_cast<T*>(p.out);
  const T* bias = static_cast<const T*>(p.bias);
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int n = n0 + r;
      if (lane == (m * R + r) % 32 && n < p.n_dim) {
        float v = acc[m][r];
        if (bias != nullptr) v += to_float(bias[n]);
        out[m * p.out_stride_row + n] = from_float<T>(v);
      }
    }
}

}  // namespace gemv
}  // namespace nanopd
