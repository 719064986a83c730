// Paged decode attention, device code: the split of each context into chunks and the
// combining of the chunks' results (the kernel is in paged_decode.cuh; docs/kernels.md).
#pragma once

#include <stdint.h>

#include "device_utils.cuh"
#include "nanopd_kernels.h"

namespace nanopd {

#ifndef NANOPD_DECODE_STAGES  // overridable at build time for tuning runs (csrc/build.py -D)
#define NANOPD_DECODE_STAGES 3
#endif
#ifndef NANOPD_COMBINE_PAIRS  // combine_splits' loads in flight per thread at head_dim 128
#define NANOPD_COMBINE_PAIRS 16
#endif
constexpr int kTile = 16;  // tokens per warp iteration: one mma k-step of P V
constexpr int kStages = NANOPD_DECODE_STAGES;  // tiles per warp in the cp.async ring
constexpr int kChunkAlign = 64;  // chunk sizes are multiples of this many tokens
constexpr int kMaxSplits = 256;  // chunks per sequence at most (the launcher checks)
constexpr float kLog2e = 1.4426950408889634f;
static_assert(kStages >= 2, "unsupported tuning");

// Tokens per chunk of a sequence of ctx tokens: the context in at most max_splits equal
// chunks, a multiple of kChunkAlign, at least min_chunk. Host and device agree on it.
__host__ __device__ __forceinline__ int chunk_tokens(int ctx, int max_splits, int min_chunk) {
  const int per = (ctx + max_splits - 1) / max_splits;
  const int aligned = (per + kChunkAlign - 1) / kChunkAlign * kChunkAlign;
  return aligned > min_chunk ? aligned : min_chunk;
}

// Shared memory of one thread block: per warp kStages tiles of 16-byte pieces, [piece][lane].
template <int HEAD_DIM>
__host__ __device__ constexpr int pieces_per_tile() {
  return 2 * (HEAD_DIM / 32) + 4 * (HEAD_DIM / 64);
}
template <int HEAD_DIM, int WARPS>
__host__ __device__ constexpr int decode_smem_nbytes() {
  return WARPS * kStages * pieces_per_tile<HEAD_DIM>() * 32 * 16;
}

// The block's warps each left (max, sum, unnormalized out) per row in shared memory: their
// combination for (row, d), returning the max; sum and acc out (out = acc / sum).
template <int HEAD_DIM, int ROWS, int WARPS>
__device__ __forceinline__ float combine_warps(const uint4* smem, const float (*s_max)[ROWS],
                                               const float (*s_sum)[ROWS], int row, int d,
                                               float& sum, float& acc) {
  constexpr int SO = HEAD_DIM + 1;
  constexpr int WARP_NBYTES = kStages * pieces_per_tile<HEAD_DIM>() * 32 * 16;
  float mx = -INFINITY;
#pragma unroll
  for (int w = 0; w < WARPS; ++w) mx = fmaxf(mx, s_max[w][row]);
  sum = 0.f, acc = 0.f;
#pragma unroll
  for (int w = 0; w < WARPS; ++w) {
    const float a = fast_exp2(s_max[w][row] - mx);  // a warp without tiles: -inf -> 0
    const float* w_out = reinterpret_cast<const float*>(
        reinterpret_cast<const char*>(smem) + w * WARP_NBYTES);
    sum += a * s_sum[w][row];
    acc += a * w_out[row * SO + d];
  }
  return mx;
}

// out = sum_k w_k out_k / sum_k w_k over a sequence's chunks, w_k = sum_k 2^(max_k - max), in
// the last block of the (sequence, KV head) to finish. Each thread owns E float4 slices (row,
// 4 dims) of the group's output and takes the chunks KB at a time, in chunk order (the same
// bits every run), with every load of a round issued before any is used: up to KB chunks cost
// one L2 round trip, not one per row and phase. Rounds rescale by the running max. VEC: the
// workspace is 16-byte aligned (torch's allocations are), so a slice is one 16-byte load.
template <typename T, int HEAD_DIM, int ROWS, int WARPS, bool VEC>
__device__ __forceinline__ void combine_splits(const PagedDecodeParams& p, int seq, int head0,
                                               int group, int num_parts, T* out) {
  constexpr int NTH = WARPS * 32, V4 = HEAD_DIM / 4;  // threads; float4 slices of a row
  constexpr int E = (ROWS * V4 + NTH - 1) / NTH;
  // (slice, chunk) pairs in flight, 6 registers each: head_dim 64 stays within the 128
  // registers of 4 blocks per SM; at 128, shared memory allows 2 blocks, registers 255
  constexpr int PAIRS = HEAD_DIM > 64 ? NANOPD_COMBINE_PAIRS : 8;
  constexpr int KB = E >= PAIRS ? 1 : PAIRS / E;  // chunks per round
  const int64_t base = ((int64_t)seq * p.num_heads + head0) * p.max_splits;
  float m[E], l[E];
  float4 acc[E];
#pragma unroll
  for (int n = 0; n < E; ++n) m[n] = -INFINITY, l[n] = 0.f, acc[n] = make_float4(0, 0, 0, 0);
  for (int k0 = 0; k0 < num_parts; k0 += KB) {
    float pm[E][KB], ps[E][KB];
    float4 po[E][KB];
#pragma unroll
    for (int n = 0; n < E; ++n) {
      const int v = threadIdx.x + NTH * n, row = v / V4;
#pragma unroll
      for (int j = 0; j < KB; ++j) {
        const bool on = row < group && k0 + j < num_parts;
        const int64_t k = base + (int64_t)row * p.max_splits + k0 + j;
        pm[n][j] = on ? __ldcg(p.partial_max + k) : -INFINITY;
        ps[n][j] = on ? __ldcg(p.partial_sum + k) : 0.f;
        const float* src = p.partial_out + k * HEAD_DIM + 4 * (v % V4);
        po[n][j] = !on ? make_float4(0, 0, 0, 0)
                   : VEC ? __ldcg(reinterpret_cast<const float4*>(src))
                             : make_float4(__ldcg(src), __ldcg(src + 1), __ldcg(src + 2),
                                           __ldcg(src + 3));
      }
    }
#pragma unroll
    for (int n = 0; n < E; ++n) {
      float mx = m[n];
#pragma unroll
      for (int j = 0; j < KB; ++j) mx = fmaxf(mx, pm[n][j]);
      const float a = fast_exp2(m[n] - mx);  // the first round: 2^-inf = 0
      m[n] = mx, l[n] *= a;
      acc[n].x *= a, acc[n].y *= a, acc[n].z *= a, acc[n].w *= a;
#pragma unroll
      for (int j = 0; j < KB; ++j) {  // chunks past num_parts: 0 * 2^-inf = 0
        const float w = ps[n][j] * fast_exp2(pm[n][j] - mx);
        l[n] += w;
        acc[n].x += w * po[n][j].x, acc[n].y += w * po[n][j].y;
        acc[n].z += w * po[n][j].z, acc[n].w += w * po[n][j].w;
      }
    }
  }
#pragma unroll
  for (int n = 0; n < E; ++n) {
    const int v = threadIdx.x + NTH * n, row = v / V4, d = 4 * (v % V4);
    if (row >= group) continue;
    const float inv = 1.f / l[n];
    T* o = out + row * p.out_stride_head + d;
    o[0] = from_float<T>(acc[n].x * inv), o[1] = from_float<T>(acc[n].y * inv);
    o[2] = from_float<T>(acc[n].z * inv), o[3] = from_float<T>(acc[n].w * inv);
  }
}

}  // namespace nanopd
