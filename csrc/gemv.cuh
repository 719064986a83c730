// GEMV for decode-sized batches, device code shared by gemv.cu (the plain GEMV) and
// gemv_fused.cu (with the next kernel in its epilogue, on pairs of columns). The
// layout and the reasons are in gemv.cu's header and docs/kernels.md ("Linear layers").
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "device_utils.cuh"
#include "fused_math.cuh"  // scale_by_weight, warp_total (a NORM prologue)
#include "gemv.h"

namespace nanopd {
namespace gemv {

#ifndef NANOPD_GEMV_EARLY_W  // 1: a GEMV's first round of weights is loaded before its PDL wait
#define NANOPD_GEMV_EARLY_W 1  // but at 4 columns without NORM (2: everywhere)
#endif

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

// A weight load that the compiler keeps where it is written (volatile): a NORM prologue's
// first round must be out before the block stops at its barrier
__device__ __forceinline__ uint4 load_streaming_pinned(const void* p) {
  uint4 v;
  asm volatile("ld.global.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

constexpr int kSumSlots = NANOPD_GEMV_NORM_MAX_SUMS / 32;  // the sums of a row a lane adds
constexpr int kNormPieces = NANOPD_GEMV_NORM_MAX_SUMS;     // 16-byte pieces of a normed row

// A NORM prologue (gemv.h), by every thread of the block once its first round of weight loads
// is out: its pieces of x and of the norm weight and its share of the sums are loaded
// together; each warp makes each row's inverse RMS (this lane's sums in a fixed order, then
// over the warp); the block writes RMSNorm(x) of its M rows into shared memory, rounded as
// rms_norm rounds, and waits for all of it. Returns the normed rows, k_dim / 8 pieces apart.
template <typename T, int M>
__device__ __forceinline__ const uint4* norm_rows_to_shared(const GemvParams& p,
                                                            const GemvNormParams& nm) {
  static_assert(M <= 2, "a NORM prologue takes 1-2 rows");
  constexpr int kPerThread = M * kNormPieces / (kWarps * 32);
  __shared__ uint4 xs[M * kNormPieces];
  const int lane = threadIdx.x % 32, pieces = p.k_dim / kPiece;
  const T* x = static_cast<const T*>(p.x);
  const T* weight = static_cast<const T*>(nm.weight);
  uint4 xv[kPerThread], wv[kPerThread];
#pragma unroll
  for (int t = 0; t < kPerThread; ++t) {
    const int i = threadIdx.x + t * kWarps * 32, m = i / pieces, j = i % pieces;
    const bool valid = i < M * pieces;
    xv[t] = valid ? *reinterpret_cast<const uint4*>(x + m * p.x_stride_row + j * kPiece)
                  : make_uint4(0, 0, 0, 0);
    wv[t] = valid ? *reinterpret_cast<const uint4*>(weight + j * kPiece) : make_uint4(0, 0, 0, 0);
  }
  float part[M][kSumSlots], inv[M];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int j = 0; j < kSumSlots; ++j) {
      const int i = lane + 32 * j;
      part[m][j] = i < nm.num_sums ? nm.sums[m * nm.num_sums + i] : 0.f;
    }
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < kSumSlots; ++j) s = __fadd_rn(s, part[m][j]);
    s = warp_total(s);
    inv[m] = rsqrtf(__fadd_rn(__fmul_rn(s, 1.f / (float)p.k_dim), nm.eps));  // as rms_norm
  }
#pragma unroll
  for (int t = 0; t < kPerThread; ++t) {
    const int i = threadIdx.x + t * kWarps * 32;
    if (i < M * pieces) {
      float f[8];
      unpack8<T>(xv[t], f);
      scale_by_weight<T>(f, i < pieces ? inv[0] : inv[M - 1], wv[t]);
      xs[i] = pack8<T>(f);
    }
  }
  __syncthreads();
  return xs;
}

struct NoOp {
  __device__ void operator()() const {}
};

// One round of this lane's weight loads: U pieces of each of the R rows from k0, zeros past
// k_dim (no load made). PINNED (volatile asm): kept where written, each load with its own
// registers in the SASS; without, ptxas may sink them next to their use.
template <typename T, int U, int R, bool PINNED>
__device__ __forceinline__ void load_round(const GemvParams& p, const T* const (&w_rows)[R],
                                           int k0, uint4 (&wv)[U][R]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int k = k0 + u * kLaneStride;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      wv[u][r] = k >= p.k_dim ? make_uint4(0, 0, 0, 0)
                 : PINNED     ? load_streaming_pinned(w_rows[r] + k)
                              : load_streaming(w_rows[r] + k);
    }
  }
}

// acc[m][r] += x[m] . w[r] over one round's pieces, in piece order (every kernel's order)
template <typename T, int U, int M, int R>
__device__ __forceinline__ void fma_round(const uint4 (&wv)[U][R], const uint4 (&xv)[U][M],
                                          float (&acc)[M][R]) {
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

// acc[m][r] = this lane's part of x[m] . w_rows[r]; x rows x_stride_row apart. NORM: x[m] is
// a residual row and the sums are over RMSNorm(x[m]) (nm, gemv.h), which the block writes
// into shared memory (norm_rows_to_shared) while its first round of weight loads is in
// flight; every thread of the block must call it (a barrier).
// EARLY (NANOPD_GEMV_EARLY_W): the first round's weight loads are issued before wait(), the
// wait for the kernel that writes x (pdl_wait), so their DRAM trip overlaps it; without it,
// wait() has run before and the first round was only fetched into the L2.
// UNROLL: pieces a round if not the default (unroll<M>(); 6 for NORM at 4 columns).
template <typename T, int M, int R, bool NORM = false, bool EARLY = false, int UNROLL = 0,
          typename Wait = NoOp>
__device__ __forceinline__ void lane_sums(const GemvParams& p, const T* x, int64_t x_stride_row,
                                          const T* const (&w_rows)[R], int lane,
                                          float (&acc)[M][R],
                                          const GemvNormParams* nm = nullptr,
                                          Wait&& wait = {}) {
  // NORM at 4 columns: 6 pieces a round (a 1536-wide row in one), fewer registers held
  // across the prologue's barrier
  constexpr int U = UNROLL > 0 ? UNROLL : NORM && R == 4 ? 6 : unroll<M>();
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = 0.f;
  const uint4* xs = nullptr;  // NORM: the normed rows
  // Each round: every weight load first (pinned for NORM and EARLY: measured, pinning only
  // EARLY's first round let ptxas reuse registers in the later rounds and the step was 4%
  // slower), then the first round's wait (EARLY) and NORM's prologue, then x, then the sums.
  // NORM, EARLY: every lane runs the first round (even with nothing to load past k_dim): its
  // barrier, its wait.
  bool first = NORM || EARLY;
  for (int k0 = lane * kPiece; first || k0 < p.k_dim; k0 += U * kLaneStride) {
    uint4 wv[U][R], xv[U][M];
    load_round<T, U, R, NORM || EARLY>(p, w_rows, k0, wv);
    if constexpr (EARLY) {
      if (first) wait();
    }
    if constexpr (NORM) {
      if (first) xs = norm_rows_to_shared<T, M>(p, *nm);
    }
    first = false;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = k0 + u * kLaneStride;
#pragma unroll
      for (int m = 0; m < M; ++m) {
        if constexpr (NORM) {
          xv[u][m] = k < p.k_dim ? xs[m * (p.k_dim / kPiece) + k / kPiece]
                                 : make_uint4(0, 0, 0, 0);
        } else {
          xv[u][m] = k < p.k_dim ? *reinterpret_cast<const uint4*>(x + m * x_stride_row + k)
                                 : make_uint4(0, 0, 0, 0);
        }
      }
    }
    fma_round<T, U, M, R>(wv, xv, acc);
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
// round loaded (NANOPD_GEMV_EARLY_W; else fetched into the L2) before the wait for the
// previous kernel, then acc[m][r] = the warp's full
// sum x[m] . w_rows[r] (of RMSNorm(x[m]) with NORM), in every lane. Launched with PDL
// (launch.h): x is read after the wait, and so is whatever after_wait() loads;
// before_wait() loads what the predecessor cannot be writing (launch.h).
template <typename T, int M, int R, bool NORM = false, int UNROLL = 0, typename AfterWait = NoOp,
          typename BeforeWait = NoOp>
__device__ __forceinline__ void column_sums(const GemvParams& p, int c0, int pair_stride,
                                            int lane, float (&acc)[M][R],
                                            const GemvNormParams* nm = nullptr,
                                            AfterWait&& after_wait = {},
                                            BeforeWait&& before_wait = {}) {
  const T* w_rows[R];
  weight_rows<T, R>(p, c0, pair_stride, w_rows);
  const auto wait = [&] {
    before_wait();
    pdl_wait();
    pdl_launch_dependents();
    after_wait();
  };
  // not the plain 4-column GEMV: holding its first round across the wait took 193-243
  // registers instead of 138-146, and alone at two rows it was 28% slower
  constexpr bool kEarly = NANOPD_GEMV_EARLY_W == 2 || (NANOPD_GEMV_EARLY_W && (R == 2 || NORM));
  if constexpr (kEarly) {
    lane_sums<T, M, R, NORM, true, UNROLL>(p, static_cast<const T*>(p.x), p.x_stride_row, w_rows,
                                           lane, acc, nm, wait);
  } else {
    prefetch_first_round<T, M, R>(p, w_rows, lane);
    wait();
    lane_sums<T, M, R, NORM, false, UNROLL>(p, static_cast<const T*>(p.x), p.x_stride_row,
                                            w_rows, lane, acc, nm);
  }
  warp_sums(acc);
}

// For each output this lane stores: f(m, n, v) for row m, column n and the warp's sum with
// the bias added in fp32 (not rounded): output (m, r) by lane (m R + r) % 32
template <typename T, int M, int R, typename F>
__device__ __forceinline__ void for_own_columns(const GemvParams& p, const float (&acc)[M][R],
                                                int n0, int lane, F&& f) {
  const T* bias = static_cast<const T*>(p.bias);
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int n = n0 + r;
      if (lane == (m * R + r) % 32 && n < p.n_dim) {
        float v = acc[m][r];
        if (bias != nullptr) v += to_float(bias[n]);
        f(m, r, n, v);
      }
    }
}

// The warp's sums (warp_sums) with the bias added in fp32, one rounding, stored
template <typename T, int M, int R>
__device__ __forceinline__ void store_columns(const GemvParams& p, const float (&acc)[M][R],
                                              int n0, int lane) {
  T* out = static_cast<T*>(p.out);
  for_own_columns<T>(p, acc, n0, lane, [&](int m, int, int n, float v) {
    out[m * p.out_stride_row + n] = from_float<T>(v);
  });
}

}  // namespace gemv
}  // namespace nanopd
