// The streaming form of the fused decode GEMV (gemv_fused.cu) for one row of x and rows of w
// that one round of loads covers (k_dim <= 2048): a grid of at most one wave of resident
// blocks whose warps each take column groups g, g + stride, ... and load the next group's
// weights before they multiply the current one's.
//
// Why: the one-round kernel (gemv_kernel, gemv_fused_kernel) gives each warp one group; a
// layer wider than one wave (gate_up_proj of the 1.5B shape: 1120 blocks, 2 resident an SM)
// runs as 4+ waves of blocks that each issue their loads once, wait a DRAM trip, reduce,
// store and exit before the SM takes the next block, so each block slot streams in bursts;
// with NORM each block also makes the norm again. Here the slots stay full: a warp has one
// group's loads in flight while it finishes the one before, and a block norms x once.
// The sums are made in the same order as gemv.cuh's lane_sums (pieces u = 0.., then the warp
// reduction): the outputs are bitwise the other kernels'. NANOPD_GEMV_STREAM=0 (read at each
// launch) turns it off.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <cstdlib>

#include "gemv_epilogue.cuh"
#include "launch.h"

namespace nanopd {
namespace gemv {

#ifndef NANOPD_GEMV_STREAM_TWO  // 1: the first two groups' weights are loaded before the wait
#define NANOPD_GEMV_STREAM_TWO 1
#endif

constexpr int kStreamMaxK = 8 * kLaneStride;  // one round of 8 pieces a lane: k_dim <= 2048

// acc[0][r] = the warp's sum of x . w_rows[r] over one round (lane_sums' order), every lane
template <typename T, int U, int R>
__device__ __forceinline__ void group_sums(const uint4 (&wv)[U][R], const uint4 (&xv)[U][1],
                                           float (&acc)[1][R]) {
#pragma unroll
  for (int r = 0; r < R; ++r) acc[0][r] = 0.f;
  fma_round<T, U, 1, R>(wv, xv, acc);
  warp_sums(acc);
}

// SWIGLU, ROTARY (one pair a warp) or PLAIN (2 columns a warp), NORM or not, one row of x
template <typename T, int U, int EPI, bool NORM>
__global__ void __launch_bounds__(kThreads, U <= 6 ? 3 : 2)
    gemv_stream_kernel(const GemvFusedParams q) {
  constexpr int R = 2, C = kPaired<EPI> ? 1 : 2;
  const GemvParams& p = q.gemv;
  const int groups = ((kPaired<EPI> ? p.n_dim / 2 : p.n_dim) + C - 1) / C;
  const int pair_stride = EPI == NANOPD_GEMV_SWIGLU  ? p.n_dim / 2
                          : EPI == NANOPD_GEMV_ROTARY ? q.rotary.head_dim / 2
                                                      : 0;
  const int lane = threadIdx.x % 32, stride = gridDim.x * kWarps;
  int g = blockIdx.x * kWarps + threadIdx.x / 32;
  // every warp, even one without a group, loads (a clamped row) and norms: the barrier
  const T* w_rows[R];
  uint4 wa[U][R], wb[U][R];
  weight_rows<T, R>(p, min(g, groups - 1) * C, pair_stride, w_rows);
  load_round<T, U, R, true>(p, w_rows, lane * kPiece, wa);  // before the wait: the weights are old
  // and the second group's too (NANOPD_GEMV_STREAM_TWO, SWIGLU: gate_up): two trips in
  // flight over the wait and the NORM prologue, not one (elsewhere it spilled)
  constexpr bool kTwo = NANOPD_GEMV_STREAM_TWO && EPI == NANOPD_GEMV_SWIGLU;
  if (kTwo && g + stride < groups) {
    weight_rows<T, R>(p, (g + stride) * C, pair_stride, w_rows);
    load_round<T, U, R, true>(p, w_rows, lane * kPiece, wb);
  }
  pdl_wait();
  pdl_launch_dependents();
  uint4 xv[U][1];  // this lane's pieces of x, the same for every group
  if constexpr (NORM) {
    const uint4* xs = norm_rows_to_shared<T, 1>(p, q.norm);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = lane * kPiece + u * kLaneStride;
      xv[u][0] = k < p.k_dim ? xs[k / kPiece] : make_uint4(0, 0, 0, 0);
    }
  } else {
    const T* x = static_cast<const T*>(p.x);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = lane * kPiece + u * kLaneStride;
      xv[u][0] = k < p.k_dim ? *reinterpret_cast<const uint4*>(x + k) : make_uint4(0, 0, 0, 0);
    }
  }
  const auto finish = [&](const uint4(&wv)[U][R], int group) {
    float acc[1][R];
    group_sums<T, U, R>(wv, xv, acc);
    if constexpr (EPI == NANOPD_GEMV_SWIGLU) {
      store_swiglu<T, 1, R>(p, acc, group * C, lane);
    } else if constexpr (EPI == NANOPD_GEMV_ROTARY) {
      RotaryInputs<1, 1> in;
      load_rotary_inputs<T, 1, R>(q, group * C, lane, in);
      store_rotary<T, 1, R>(q, acc, group * C, lane, in);
    } else {
      store_columns<T, 1, R>(p, acc, group * C, lane);
    }
  };
  // two buffers, named at compile time (each loop below takes both in turn); a step returns
  // whether group g (advanced by it) is still one of this block's
  const auto load = [&](int group, uint4(&wv)[U][R]) {
    weight_rows<T, R>(p, group * C, pair_stride, w_rows);
    load_round<T, U, R, false>(p, w_rows, lane * kPiece, wv);
  };
  if constexpr (kTwo) {
    // a buffer's next group goes out once its sums are made
    const auto step = [&](uint4(&wv)[U][R]) {
      finish(wv, g);
      g += stride;
      if (g >= groups) return false;
      if (g + stride < groups) load(g + stride, wv);
      return true;
    };
    if (g < groups) {
      while (step(wa) && step(wb)) {
      }
    }
  } else {
    // the next group's loads go out before the sums
    const auto step = [&](uint4(&cur)[U][R], uint4(&nxt)[U][R]) {
      const int next = g + stride;
      if (next < groups) load(next, nxt);
      finish(cur, g);
      g = next;
      return g < groups;
    };
    if (g < groups) {
      while (step(wa, wb) && step(wb, wa)) {
      }
    }
  }
}

// Resident blocks of gemv_stream_kernel<T, U, EPI, NORM> on this device, all SMs (asked once
// per kernel and device: the cache is per instantiation, as the kernels' occupancies differ)
template <typename T, int U, int EPI, bool NORM>
int resident_blocks() {
  const auto kernel = gemv_stream_kernel<T, U, EPI, NORM>;
  constexpr int kMaxDevices = 64;
  static int cached[kMaxDevices] = {};  // 0: not asked yet (a race only asks twice)
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) return 0;
  if (cached[device] == 0) {
    int per_sm = 0, sms = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0) !=
            cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      return 0;
    }
    cached[device] = per_sm * sms;
  }
  return cached[device];
}

inline bool stream_allowed() {  // NANOPD_GEMV_STREAM not "0", read at each launch (A/B runs)
  const char* v = std::getenv("NANOPD_GEMV_STREAM");
  return v == nullptr || v[0] != '0';
}

template <typename T, int U, int EPI, bool NORM>
cudaError_t launch_stream_u(const GemvFusedParams& q, cudaStream_t stream, bool* launched) {
  constexpr int C = kPaired<EPI> ? 1 : 2;
  const int64_t groups = ((kPaired<EPI> ? q.gemv.n_dim / 2 : q.gemv.n_dim) + C - 1) / C;
  const int64_t resident = resident_blocks<T, U, EPI, NORM>();
  // worth it only where each warp gets more than one group: else the one-group kernel
  if (resident <= 0 || groups <= resident * kWarps) return cudaSuccess;
  *launched = true;
  return launch_kernel(gemv_stream_kernel<T, U, EPI, NORM>, dim3((unsigned)resident),
                       dim3(kThreads), 0, stream, q);
}

// The streaming kernel if it takes q (one row, not ADD, k_dim <= 2048, more groups than warps
// of one wave): *launched says whether it ran
template <typename T, int M, int EPI, bool NORM>
cudaError_t launch_stream(const GemvFusedParams& q, cudaStream_t stream, bool* launched) {
  *launched = false;
  if constexpr (M != 1 || EPI == NANOPD_GEMV_ADD) {
    return cudaSuccess;
  } else {
    const int k = q.gemv.k_dim;
    if (!stream_allowed() || k > kStreamMaxK) return cudaSuccess;
    if (k <= 4 * kLaneStride) return launch_stream_u<T, 4, EPI, NORM>(q, stream, launched);
    if (k <= 6 * kLaneStride) return launch_stream_u<T, 6, EPI, NORM>(q, stream, launched);
    return launch_stream_u<T, 8, EPI, NORM>(q, stream, launched);
  }
}

}  // namespace gemv
}  // namespace nanopd
