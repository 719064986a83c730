// The epilogues of the fused decode-batch GEMVs (gemv_fused.cu, gemv_stream.cuh): what a
// warp does with its sums of its columns or pairs of columns (gemv.h, GemvFusedParams).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "fused_math.cuh"  // rnd, swiglu1, warp_total
#include "gemv.cuh"

namespace nanopd {
namespace gemv {

#ifndef NANOPD_GEMV_EARLY_INPUTS  // 1: ROTARY's bias, tables and slots read before the PDL wait
#define NANOPD_GEMV_EARLY_INPUTS 1
#endif

constexpr int kThreads = kWarps * 32;

// Calls f(m, j, i, a, b) for each pair (m, j) this lane stores: pair i of n_dim / 2, its
// columns a and b (weight_rows' pairing by pair_stride P)
template <int M, int C, typename F>
__device__ __forceinline__ void for_own_pair_slots(const GemvParams& p, int c0, int lane,
                                                   int pair_stride, F&& f) {
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int j = 0; j < C; ++j) {
      const int i = c0 + j;
      if (lane != (m * C + j) % 32 || i >= p.n_dim / 2) continue;
      const int a = (i / pair_stride) * 2 * pair_stride + i % pair_stride;
      f(m, j, i, a, a + pair_stride);
    }
}

// For each pair of outputs this lane stores: f(m, i, a, b, va, vb) for row m, pair i and
// its columns a and b (for_own_pair_slots) and their values with the bias added and rounded,
// as the plain GEMV's outputs (store_columns)
template <typename T, int M, int R, typename F>
__device__ __forceinline__ void for_own_pairs(const GemvParams& p, const float (&acc)[M][R],
                                              int c0, int lane, int pair_stride, F&& f) {
  constexpr int C = R / 2;
  const T* bias = static_cast<const T*>(p.bias);
  for_own_pair_slots<M, C>(p, c0, lane, pair_stride, [&](int m, int j, int i, int a, int b) {
    float va = acc[m][j], vb = acc[m][j + C];
    if (bias != nullptr) va += to_float(bias[a]), vb += to_float(bias[b]);
    f(m, i, a, b, rnd<T>(va), rnd<T>(vb));
  });
}

// SWIGLU's epilogue: output (m, i) = silu(gate) * up of the pair's gate and up values
template <typename T, int M, int R>
__device__ __forceinline__ void store_swiglu(const GemvParams& p, const float (&acc)[M][R],
                                             int c0, int lane) {
  T* out = static_cast<T*>(p.out);
  for_own_pairs<T>(p, acc, c0, lane, p.n_dim / 2,
                   [&](int m, int i, int, int, float gate, float up) {
                     out[m * p.out_stride_row + i] = from_float<T>(swiglu1<T>(gate, up));
                   });
}

// What ROTARY's epilogue reads besides the sums, for the pairs this lane stores (the pair
// (m, j) of a warp's C by lane (m C + j) % 32): the bias of both columns, the cos and sin of
// the token's position (NaN past the tables, as rotary_store_kv), the slot (-1 for q heads).
// All of it is there before the kernel starts: bias and tables are the model's, positions
// and slots are the step's inputs, written before its first kernel (launch.h's chain: when a
// kernel starts, every kernel before its predecessor has finished). So it is loaded before
// the wait for the predecessor (load_rotary_inputs), its L2 trips (positions, then the
// tables) off the end of the kernel.
template <int M, int C>
struct RotaryInputs {
  float bias[M][C][2], cos[M][C][2], sin[M][C][2];
  int64_t slot[M][C];
};

template <typename T, int M, int R>
__device__ __forceinline__ void load_rotary_inputs(const GemvFusedParams& q, int c0, int lane,
                                                   RotaryInputs<M, R / 2>& in) {
  const GemvParams& p = q.gemv;
  const RotaryStoreKvParams& rp = q.rotary;
  const int half = rp.head_dim / 2;
  const T* bias = static_cast<const T*>(p.bias);
  for_own_pair_slots<M, R / 2>(p, c0, lane, half, [&](int m, int j, int i, int a, int b) {
    const int head = i / half, d = i % half;
    in.bias[m][j][0] = bias != nullptr ? to_float(bias[a]) : 0.f;
    in.bias[m][j][1] = bias != nullptr ? to_float(bias[b]) : 0.f;
    in.slot[m][j] = head < rp.num_heads ? -1 : rp.slot_mapping[m];
    const int64_t pos = rp.positions[m];
    if (head < rp.num_heads + rp.num_kv_heads && pos >= 0 && pos < rp.max_positions) {
      const float* c = rp.cos + pos * rp.head_dim + d;
      const float* s = rp.sin + pos * rp.head_dim + d;
      in.cos[m][j][0] = c[0], in.cos[m][j][1] = c[half];
      in.sin[m][j][0] = s[0], in.sin[m][j][1] = s[half];
    } else {  // v heads use none of them
      in.cos[m][j][0] = in.cos[m][j][1] = __int_as_float(0x7fc00000);
      in.sin[m][j][0] = in.sin[m][j][1] = __int_as_float(0x7fc00000);
    }
  });
}

// ROTARY's epilogue: pair (m, i) is columns a = head D + d and b = a + D/2 of token m,
// rotated (q and k heads) with rotary_store_kv's roundings, stored, and (k and v heads)
// written into the token's slot; the bias, tables and slot from load_rotary_inputs
template <typename T, int M, int R>
__device__ __forceinline__ void store_rotary(const GemvFusedParams& q, const float (&acc)[M][R],
                                             int c0, int lane,
                                             const RotaryInputs<M, R / 2>& in) {
  constexpr int C = R / 2;
  const GemvParams& p = q.gemv;
  const RotaryStoreKvParams& rp = q.rotary;
  const int half = rp.head_dim / 2;
  T* out = static_cast<T*>(p.out);
  const bool has_bias = p.bias != nullptr;
  for_own_pair_slots<M, C>(p, c0, lane, half, [&](int m, int j, int i, int a, int b) {
    const int head = i / half, d = i % half;
    const bool is_v = head >= rp.num_heads + rp.num_kv_heads;
    // as for_own_pairs: the bias added in fp32, then the GEMV's rounding
    float va = rnd<T>(has_bias ? acc[m][j] + in.bias[m][j][0] : acc[m][j]);
    float vb = rnd<T>(has_bias ? acc[m][j + C] + in.bias[m][j][1] : acc[m][j + C]);
    if (!is_v) {
      const float ca = in.cos[m][j][0], cb = in.cos[m][j][1];
      const float sa = in.sin[m][j][0], sb = in.sin[m][j][1];
      const float ra = rnd<T>(__fadd_rn(rnd<T>(__fmul_rn(va, rnd<T>(ca))),
                                        rnd<T>(__fmul_rn(-vb, rnd<T>(sa)))));
      const float rb = rnd<T>(__fadd_rn(rnd<T>(__fmul_rn(vb, rnd<T>(cb))),
                                        rnd<T>(__fmul_rn(va, rnd<T>(sb)))));
      va = ra, vb = rb;
    }
    out[m * p.out_stride_row + a] = from_float<T>(va);
    out[m * p.out_stride_row + b] = from_float<T>(vb);
    const int64_t slot = in.slot[m][j];
    if (slot >= 0) {  // a negative slot: a padding token, nothing to store
      const int64_t block = slot / rp.block_size, offset = slot % rp.block_size;
      T* dst = is_v ? static_cast<T*>(rp.v_cache) + block * rp.v_stride_block +
                          offset * rp.v_stride_slot +
                          (int64_t)(head - rp.num_heads - rp.num_kv_heads) * rp.v_stride_head
                    : static_cast<T*>(rp.k_cache) + block * rp.k_stride_block +
                          offset * rp.k_stride_slot +
                          (int64_t)(head - rp.num_heads) * rp.k_stride_head;
      dst[d] = from_float<T>(va);
      dst[d + half] = from_float<T>(vb);
    }
  });
}

// ADD's epilogue (gemv.h): this warp's columns of the residual (out) become round(round(sum
// + bias) + residual), from res, the old values its storing lanes loaded after the wait; then
// the block's sum of squares of its new values, warps in order, into sums[m, block]. Every
// warp of the block gets here (the block sum waits for all of them).
template <typename T, int M, int R>
__device__ __forceinline__ void store_add(const GemvFusedParams& q, const float (&acc)[M][R],
                                          const float (&res)[M][R], int n0, int lane) {
  const GemvParams& p = q.gemv;
  T* out = static_cast<T*>(p.out);
  float sq[M];
#pragma unroll
  for (int m = 0; m < M; ++m) sq[m] = 0.f;
  for_own_columns<T>(p, acc, n0, lane, [&](int m, int r, int n, float v) {
    const float sum = rnd<T>(__fadd_rn(rnd<T>(v), res[m][r]));
    out[m * p.out_stride_row + n] = from_float<T>(sum);
    sq[m] = __fadd_rn(sq[m], __fmul_rn(sum, sum));
  });
  __shared__ float s_warp[M][kWarps];
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const float w = warp_total(sq[m]);
    if (lane == 0) s_warp[m][warp] = w;
  }
  __syncthreads();
  if (threadIdx.x < M) {
    float t = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) t = __fadd_rn(t, s_warp[threadIdx.x][w]);
    q.sums[threadIdx.x * gridDim.x + blockIdx.x] = t;
  }
}

// ADD's old residual values, for the lanes that store them (store_add), read after the wait
template <typename T, int M, int R>
__device__ __forceinline__ void load_residual(const GemvParams& p, int n0, int lane,
                                              float (&res)[M][R]) {
  const T* out = static_cast<const T*>(p.out);
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int n = n0 + r;
      res[m][r] = lane == (m * R + r) % 32 && n < p.n_dim
                      ? to_float(out[m * p.out_stride_row + n]) : 0.f;
    }
}

template <int EPI>
constexpr bool kPaired = EPI == NANOPD_GEMV_SWIGLU || EPI == NANOPD_GEMV_ROTARY;

}  // namespace gemv
}  // namespace nanopd
