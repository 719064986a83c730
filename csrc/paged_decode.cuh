// Paged decode attention, device code (see docs/kernels.md for the layout and the reasons).
//
// One thread block = one (KV head, sequence, partition), kWarps warps. Each warp walks 16-token
// tiles of the partition (tile w, w + kWarps, ...) and keeps its own online-softmax state for
// all ROWS query heads of the KV head's group (ROWS = 8 or 16, unused rows are zero queries).
// Both products run on tensor cores, mma.sync m16n8k16 with fp32 accumulation, FA2-style:
//   S[rows, 16 tokens] = Q[rows, D] K^T    (two n-tiles of 8 tokens, D/16 k-steps)
//   O[rows, D]        += P[rows, 16] V     (D/8 n-tiles of 8 dims, one k-step)
// and S's accumulator fragment is P's operand fragment as it stands.
// Every K and V byte is read from global memory once per group, 16 bytes at a time, by cp.async
// into a per-warp ring of kStages tiles (two tiles in flight while one is computed). The order
// of head_dim inside an mma is free (a dot product does not care; the output columns are ours
// to name), so each thread fetches 8 consecutive dims of a row and the fragment slots are
// assigned to fit those loads, not the other way round:
//   K: thread (g = lane / 4, t = lane % 4) loads token g (and 8 + g), dims 8t + 32c .. +7;
//      registers x, y feed k-step 2c and z, w k-step 2c + 1. Q is loaded the same way.
//   V: it loads tokens 2t, 2t + 1, 2t + 8, 2t + 9, dims 8g + 64h .. +7; byte permutes pair
//      the two tokens of one dim into a B register. n-tile j <-> dims 64 (j / 8) + 8 n + j % 8.
#pragma once

#include <stdint.h>

#include "device_utils.cuh"
#include "nanopd_kernels.h"

namespace nanopd {

constexpr int kWarps = 4;
constexpr int kTile = 16;   // tokens per warp iteration: one mma k-step of P V
constexpr int kStages = 3;  // tiles per warp in the cp.async ring: two in flight while one is used
constexpr float kLog2e = 1.4426950408889634f;

// Shared memory of one thread block: per warp kStages tiles of 16-byte pieces, [piece][lane].
template <int HEAD_DIM>
__host__ __device__ constexpr int pieces_per_tile() {
  return 2 * (HEAD_DIM / 32) + 4 * (HEAD_DIM / 64);
}
template <int HEAD_DIM>
__host__ __device__ constexpr int decode_smem_nbytes() {
  return kWarps * kStages * pieces_per_tile<HEAD_DIM>() * 32 * 16;
}

template <typename T, int HEAD_DIM, int ROWS>
__global__ void __launch_bounds__(kWarps * 32)
    paged_decode_kernel(const PagedDecodeParams p) {
  static_assert(HEAD_DIM % 64 == 0 && (ROWS == 8 || ROWS == 16), "unsupported shape");
  constexpr int KC = HEAD_DIM / 32;  // 16-byte K pieces per token row per thread
  constexpr int VC = HEAD_DIM / 64;  // 16-byte V pieces per token row per thread
  constexpr int NT = HEAD_DIM / 8;   // n-tiles of O
  constexpr int RH = ROWS / 8;       // row halves a thread holds: row g (and g + 8)
  constexpr int PIECES = pieces_per_tile<HEAD_DIM>();
  constexpr int SO = HEAD_DIM + 1;   // padded row of the cross-warp buffer
  static_assert(ROWS * SO * 4 <= kStages * PIECES * 32 * 16, "combine buffer must fit");

  extern __shared__ uint4 smem[];
  __shared__ float s_max[kWarps][ROWS];
  __shared__ float s_sum[kWarps][ROWS];

  const int kv_head = blockIdx.x, seq = blockIdx.y, part = blockIdx.z;
  const int group = p.num_heads / p.num_kv_heads;
  const int head0 = kv_head * group;
  const int ctx = p.context_lens[seq];
  const int begin = part * p.partition_size;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  T* out = static_cast<T*>(p.out) + seq * p.out_stride_seq + head0 * p.out_stride_head;
  const bool too_long = (int64_t)ctx > (int64_t)p.max_partitions * p.partition_size;
  if (ctx <= 0 || too_long) {  // nothing to attend to: zeros; a grid too small: NaN, loudly
    if (part == 0) {
      const T fill = from_float<T>(too_long ? NAN : 0.f);
      for (int i = threadIdx.x; i < group * HEAD_DIM; i += blockDim.x) {
        out[(i / HEAD_DIM) * p.out_stride_head + i % HEAD_DIM] = fill;
      }
    }
    return;
  }
  if (begin >= ctx) return;
  const int end = min(ctx, begin + p.partition_size);
  const int num_parts = (ctx + p.partition_size - 1) / p.partition_size;

  // Q fragments: query heads head0 + g (and head0 + g + 8); rows past the group are zero
  const T* q = static_cast<const T*>(p.q) + seq * p.q_stride_seq + head0 * p.q_stride_head;
  uint4 qf[RH][KC];
#pragma unroll
  for (int r = 0; r < RH; ++r) {
    const int row = g + 8 * r;
#pragma unroll
    for (int c = 0; c < KC; ++c) {
      qf[r][c] = row < group
                     ? *reinterpret_cast<const uint4*>(q + row * p.q_stride_head + 8 * t + 32 * c)
                     : make_uint4(0, 0, 0, 0);
    }
  }

  // Each lane copies its own fragment pieces of a tile into its own shared-memory slots
  // (cp.async, no registers held while in flight) and later reads back only those: no
  // barrier, no bank conflicts. Rows past the context are zero-filled, not read.
  uint4* ring = smem + warp * (kStages * PIECES * 32) + lane;
  const T* kbase = static_cast<const T*>(p.k_cache) + kv_head * p.k_stride_head;
  const T* vbase = static_cast<const T*>(p.v_cache) + kv_head * p.v_stride_head;
  const int32_t* table = p.block_tables + seq * p.block_tables_stride;
  const int vrow[4] = {2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9};
  int k_off[2], v_off[4];  // element offsets inside a tile (a block is far below 2^31)
#pragma unroll
  for (int n = 0; n < 2; ++n) k_off[n] = (8 * n + g) * (int)p.k_stride_slot + 8 * t;
#pragma unroll
  for (int i = 0; i < 4; ++i) v_off[i] = vrow[i] * (int)p.v_stride_slot + 8 * g;
  const int first = begin + warp * kTile;  // this warp's tiles: first, first + kWarps * kTile, ..
  const int num_tiles = first < end ? (end - first + kWarps * kTile - 1) / (kWarps * kTile) : 0;

  auto issue = [&](int i) {  // tile i of this warp into stage i % kStages, then commit
    if (i < num_tiles) {
      const int t0 = first + i * kWarps * kTile;
      const int64_t block = __ldg(table + t0 / p.block_size);
      const int off = t0 % p.block_size;
      const T* kt = kbase + block * p.k_stride_block + off * (int)p.k_stride_slot;
      const T* vt = vbase + block * p.v_stride_block + off * (int)p.v_stride_slot;
      uint4* st = ring + (i % kStages) * PIECES * 32;
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int c = 0; c < KC; ++c)
          cp_async16(st + (n * KC + c) * 32, kt + k_off[n] + 32 * c, t0 + 8 * n + g < ctx);
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int h = 0; h < VC; ++h)
          cp_async16(st + (2 * KC + r * VC + h) * 32, vt + v_off[r] + 64 * h, t0 + vrow[r] < ctx);
    }
    cp_async_commit();  // possibly empty: keeps one group per tile index
  };

  const float scale_log2 = p.scale * kLog2e;
  float m[RH], l[RH], o[NT][2 * RH];  // o[j][2r], o[j][2r + 1]: row g + 8r, n-tile j
#pragma unroll
  for (int r = 0; r < RH; ++r) m[r] = -INFINITY, l[r] = 0.f;
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int i = 0; i < 2 * RH; ++i) o[j][i] = 0.f;

#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) issue(i);
  for (int i = 0; i < num_tiles; ++i) {
    issue(i + kStages - 1);  // into the stage tile i - 1 used: its reads are done
    cp_async_wait<kStages - 1>();  // tile i has landed
    const int t0 = first + i * kWarps * kTile;
    const uint4* st = ring + (i % kStages) * PIECES * 32;

    // S = Q K^T: s[n][0..1] row g, tokens 8n + 2t, +1; s[n][2..3] the same for row g + 8
    float s[2][4];
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
      for (int c = 0; c < KC; ++c) {
        const uint4 qa = qf[0][c], qb = qf[RH - 1][c], k = st[(n * KC + c) * 32];
        mma16816<T>(s[n], qa.x, RH > 1 ? qb.x : 0u, qa.y, RH > 1 ? qb.y : 0u, k.x, k.y);
        mma16816<T>(s[n], qa.z, RH > 1 ? qb.z : 0u, qa.w, RH > 1 ? qb.w : 0u, k.z, k.w);
      }
    }
    const bool ragged = t0 + kTile > ctx;
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool valid = !ragged || t0 + 8 * n + 2 * t + (e & 1) < ctx;
        s[n][e] = valid ? s[n][e] * scale_log2 : -INFINITY;
      }

    // online softmax per row; a tile's first token is valid, so every new max is finite
    uint32_t pa[4];
#pragma unroll
    for (int r = 0; r < RH; ++r) {
      float mx = fmaxf(fmaxf(s[0][2 * r], s[0][2 * r + 1]), fmaxf(s[1][2 * r], s[1][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[r], mx);
      const float alpha = fast_exp2(m[r] - m_new);
      m[r] = m_new;
      float p0[2], p1[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        p0[e] = fast_exp2(s[0][2 * r + e] - m_new);
        p1[e] = fast_exp2(s[1][2 * r + e] - m_new);
      }
      l[r] = l[r] * alpha + (p0[0] + p0[1]) + (p1[0] + p1[1]);
#pragma unroll
      for (int j = 0; j < NT; ++j) o[j][2 * r] *= alpha, o[j][2 * r + 1] *= alpha;
      pa[r] = pack2<T>(p0[0], p0[1]);      // a0 (row g) / a1 (row g + 8): tokens 2t, 2t + 1
      pa[2 + r] = pack2<T>(p1[0], p1[1]);  // a2 / a3: tokens 8 + 2t, 8 + 2t + 1
    }
    if (RH == 1) pa[1] = pa[3] = 0u;

    // O += P V (V rows past the context were zero-filled: 0 * garbage NaN cannot happen)
#pragma unroll
    for (int h = 0; h < VC; ++h) {
      const uint4 v0 = st[(2 * KC + 0 * VC + h) * 32], v1 = st[(2 * KC + 1 * VC + h) * 32];
      const uint4 v2 = st[(2 * KC + 2 * VC + h) * 32], v3 = st[(2 * KC + 3 * VC + h) * 32];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int j = 8 * h + e;
        float d[4] = {o[j][0], o[j][1], o[j][2 * RH - 2], o[j][2 * RH - 1]};
        if (RH == 1) d[2] = d[3] = 0.f;  // rows g + 8 are padding: keep no state for them
        mma16816<T>(d, pa[0], pa[1], pa[2], pa[3], pair_of(v0, v1, e), pair_of(v2, v3, e));
#pragma unroll
        for (int k = 0; k < 2 * RH; ++k) o[j][k] = d[k];
      }
    }
  }
  cp_async_wait<0>();  // only empty groups can be left; the ring is reused below
  __syncwarp();        // and every lane is done reading its slots of it

  // combine the warps: each leaves (max, sum, unnormalized out) per row; out over its own ring
  float* s_out = reinterpret_cast<float*>(smem + warp * (kStages * PIECES * 32));
#pragma unroll
  for (int r = 0; r < RH; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    const int row = g + 8 * r;
    if (t == 0) s_max[warp][row] = m[r], s_sum[warp][row] = l[r];
#pragma unroll
    for (int j = 0; j < NT; ++j) {  // o[j][2r]: dim phys(2t, j); o[j][2r + 1]: dim phys(2t + 1, j)
      const int d = 64 * (j / 8) + 16 * t + j % 8;
      s_out[row * SO + d] = o[j][2 * r];
      s_out[row * SO + d + 8] = o[j][2 * r + 1];
    }
  }
  __syncthreads();

  const bool direct = num_parts == 1;
  const int64_t prow = ((int64_t)seq * p.num_heads + head0) * p.max_partitions + part;
  for (int i = threadIdx.x; i < group * HEAD_DIM; i += blockDim.x) {
    const int row = i / HEAD_DIM, d = i % HEAD_DIM;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, s_max[w][row]);
    float sum = 0.f, acc = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float a = fast_exp2(s_max[w][row] - mx);  // a warp without tiles: -inf -> 0
      const float* w_out = reinterpret_cast<const float*>(smem + w * (kStages * PIECES * 32));
      sum += a * s_sum[w][row];
      acc += a * w_out[row * SO + d];
    }
    if (direct) {
      out[row * p.out_stride_head + d] = from_float<T>(acc / sum);
    } else {
      const int64_t k = prow + (int64_t)row * p.max_partitions;
      p.partial_out[k * HEAD_DIM + d] = acc / sum;
      if (d == 0) p.partial_max[k] = mx, p.partial_sum[k] = sum;
    }
  }
}

// One warp per (query head, sequence), for sequences of several partitions:
// out = sum_p w_p out_p / sum_p w_p with w_p = sum_p * 2^(max_p - max over p)
template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(32) paged_decode_reduce_kernel(const PagedDecodeParams p) {
  const int head = blockIdx.x, seq = blockIdx.y;
  const int num_parts = (p.context_lens[seq] + p.partition_size - 1) / p.partition_size;
  if (num_parts <= 1 || num_parts > p.max_partitions) return;  // written by the first kernel
  const int64_t base = ((int64_t)seq * p.num_heads + head) * p.max_partitions;
  float mx = -INFINITY;
  for (int i = 0; i < num_parts; ++i) mx = fmaxf(mx, p.partial_max[base + i]);
  T* out = static_cast<T*>(p.out) + seq * p.out_stride_seq + head * p.out_stride_head;
  for (int d = 4 * threadIdx.x; d < HEAD_DIM; d += 4 * 32) {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    float sum = 0.f;
    for (int i = 0; i < num_parts; ++i) {
      const float w = p.partial_sum[base + i] * fast_exp2(p.partial_max[base + i] - mx);
      const float4 v = *reinterpret_cast<const float4*>(p.partial_out + (base + i) * HEAD_DIM + d);
      sum += w;
      acc.x += w * v.x, acc.y += w * v.y, acc.z += w * v.z, acc.w += w * v.w;
    }
    const float inv = 1.f / sum;
    out[d] = from_float<T>(acc.x * inv);
    out[d + 1] = from_float<T>(acc.y * inv);
    out[d + 2] = from_float<T>(acc.z * inv);
    out[d + 3] = from_float<T>(acc.w * inv);
  }
}

}  // namespace nanopd
