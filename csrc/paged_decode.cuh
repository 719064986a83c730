// Paged decode attention, device code (see docs/kernels.md for the layout and the reasons).
//
// One thread block = one (KV head, sequence, chunk of the context), WARPS warps (4 or 8, the
// launcher's choice: PagedDecodeParams.warps). Each warp walks 16-token tiles of the chunk
// (tile w, w + WARPS, ...) and keeps its own online-softmax state for all ROWS query heads of
// the KV head's group (ROWS = 8 or 16, unused rows are zero queries).
// Both products run on tensor cores, mma.sync m16n8k16 with fp32 accumulation, FA2-style:
//   S[rows, 16 tokens] = Q[rows, D] K^T    (two n-tiles of 8 tokens, D/16 k-steps)
//   O[rows, D]        += P[rows, 16] V     (D/8 n-tiles of 8 dims, one k-step)
// and S's accumulator fragment is P's operand fragment as it stands.
// Every K and V byte is read from global memory once per group, 16 bytes at a time, by cp.async
// into a per-warp ring of kStages tiles (two tiles in flight while one is computed), and every
// 8 consecutive lanes of a load instruction read one whole 128-byte line (the first version,
// whose lanes each fetched their own fragments, made 1- and 2-sector L2 requests and was bound
// by the L2 at 0.58 of the copy bandwidth, by ncu). The order of head_dim inside an mma is free (a dot product does not care;
// the output columns are ours to name), so fragment slots are assigned to fit the loads:
//   K: thread (g = lane / 4, t = lane % 4) consumes token g (and 8 + g), dims 8t + 32c .. +7;
//      registers x, y feed k-step 2c and z, w k-step 2c + 1. Q is loaded the same way. The
//      warp loads K rows whole into a row-major tile whose 16-byte pieces are XOR-swizzled,
//      so that the fragment reads are conflict-free; a __syncwarp orders copies and reads.
//   V: thread (g, t) consumes tokens 2t, 2t + 1, 2t + 8, 2t + 9, dims 8g + 64h .. +7, loaded
//      the same way as K (whole rows, swizzled tile); byte permutes pair the two tokens of one
//      dim into a B register. n-tile j <-> dims 64 (j / 8) + 8 n + j % 8.
#pragma once

#include <stdint.h>

#include "paged_decode_split.cuh"

namespace nanopd {

template <typename T, int HEAD_DIM, int ROWS, int WARPS>
__global__ void __launch_bounds__(WARPS * 32)
    paged_decode_kernel(const PagedDecodeParams p) {
  static_assert(HEAD_DIM % 64 == 0 && (ROWS == 8 || ROWS == 16), "unsupported shape");
  static_assert(WARPS >= 1 && WARPS <= 8, "1-8 warps a block");
  constexpr int KC = HEAD_DIM / 32;  // 16-byte K pieces per token row per thread
  constexpr int VC = HEAD_DIM / 64;  // 16-byte V pieces per token row per thread
  constexpr int NT = HEAD_DIM / 8;   // n-tiles of O
  constexpr int RH = ROWS / 8;       // row halves a thread holds: row g (and g + 8)
  constexpr int PIECES = pieces_per_tile<HEAD_DIM>();
  constexpr int SO = HEAD_DIM + 1;   // padded row of the cross-warp buffer
  static_assert(ROWS * SO * 4 <= kStages * PIECES * 32 * 16, "combine buffer must fit");

  // the ring: 128-byte aligned, or the static arrays below, which come first (272 bytes), put
  // each 128-byte piece of a warp's loads across two shared-memory lines, and the L2 then saw
  // two requests for every sector (twice the sectors of the K/V bytes, by ncu; 0.86 -> 0.98
  // of the copy bandwidth at batch 128 / 8k when aligned)
  extern __shared__ __align__(128) uint4 smem[];
  __shared__ float s_max[WARPS][ROWS];
  __shared__ float s_sum[WARPS][ROWS];

  const int kv_head = blockIdx.x, seq = blockIdx.y, split = blockIdx.z;
  const int ctx = ld_nc_s32(p.context_lens + seq);  // first: everything else waits on it
  const int group = p.num_heads / p.num_kv_heads;
  const int head0 = kv_head * group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  constexpr int kStride = WARPS * kTile;  // tokens between a warp's consecutive tiles

  // One round trip before the first K/V copy, not three: the context length and the
  // block-table entries of this warp's first kStages tiles are loaded together (Q after the
  // wait for the previous kernel, which writes it). The
  // entries are a guess, those of the chunk that starts at split * min_chunk: right for split
  // 0 and whenever the chunk is min_chunk (ctx <= max_splits * min_chunk: the short contexts,
  // where latency is all there is); otherwise reloaded below. A guessed index stays inside the
  // table's row stride, so it reads no memory outside the table; -1 marks one not read.
  const int32_t* table = p.block_tables + seq * p.block_tables_stride;
  const int guess_first = split * p.min_chunk + warp * kTile;
  int blk[kStages];
#pragma unroll
  for (int i = 0; i < kStages; ++i) {
    const int idx = (guess_first + i * kStride) / p.block_size;
    blk[i] = idx < p.block_tables_stride ? ld_nc_s32(table + idx) : -1;
  }
  const int chunk = chunk_tokens(ctx, p.max_splits, p.min_chunk);  // ctx <= 0: unused
  const int num_parts = (ctx + chunk - 1) / chunk;  // <= max_splits by construction
  const int begin = split * chunk;
  const int end = min(ctx, begin + chunk);
  const int first = begin + warp * kTile;  // this warp's tiles: first, first + kStride, ..
  const int num_tiles = first < end ? (end - first + kStride - 1) / kStride : 0;
  const bool live = ctx > 0 && begin < ctx;
  // early_kv: the previous kernel wrote at most each sequence's last slot (position ctx - 1,
  // a decode step's own store), so the first tiles are fetched before the wait, that slot
  // left out and loaded after it (fix_last_row)
  const bool early = p.early_kv != 0 && live;
  auto fix_table = [&] {
#pragma unroll
    for (int i = 0; i < kStages; ++i) {  // the guess was wrong (long contexts): a second trip
      if (i < num_tiles && (first != guess_first || blk[i] < 0)) {
        blk[i] = __ldg(table + (first + i * kStride) / p.block_size);
      }
    }
  };

  // A tile in shared memory: K then V, each [16 rows][RP 16-byte pieces], row-major, loaded
  // whole rows at a time (each 8 consecutive lanes read 128 contiguous bytes: full-line L2
  // requests) and swizzled so that the fragment reads below are conflict-free:
  //   K: piece q of row r at r * RP + (q ^ 4 (r & 1))     (reads: rows g, 4 pieces t + 4c)
  //   V: piece q of row r at r * RP + (q ^ 2 (r / 2 % 4)) (reads: rows 2t.., pieces g + 8h)
  // Rows past the context are zero-filled, not read.
  uint4* ring = smem + warp * (kStages * PIECES * 32);  // stage i: ring + i * PIECES * 32
  const T* kbase = static_cast<const T*>(p.k_cache) + kv_head * p.k_stride_head;
  const T* vbase = static_cast<const T*>(p.v_cache) + kv_head * p.v_stride_head;
  constexpr int RP = HEAD_DIM / 8;          // 16-byte pieces per row
  constexpr int RPI = 32 / RP;              // rows per warp load instruction
  constexpr int LI = kTile / RPI;           // load instructions per tile, each of K and V
  constexpr int VT = 2 * KC * 32;           // the V tile's first slot (K's has 16 * RP = VT)
  static_assert(16 * RP == VT && VT + 16 * RP == PIECES * 32, "tile layout");
  const int ld_row = lane / RP;             // this lane's row (+ RPI * k) and piece of a load
  const int ld_piece = lane % RP;
  const int k_off = ld_row * (int)p.k_stride_slot + 8 * ld_piece;
  const int v_off = ld_row * (int)p.v_stride_slot + 8 * ld_piece;
  const int k_src_row[2] = {g * RP, (8 + g) * RP};   // K rows this lane consumes
  const int k_swz = (g & 1) << 2;                    // its pieces t + (4c ^ k_swz)
  const int vrow[4] = {2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9};  // V rows it consumes
  auto k_slot = [&](int row) { return row * RP + (ld_piece ^ ((row & 1) << 2)); };
  auto v_slot = [&](int row) { return VT + row * RP + (ld_piece ^ (((row >> 1) & 3) << 1)); };

  // tile i of this warp (in KV block `block`) into stage i % kStages, then commit; before the
  // wait (early) without the row of position ctx - 1
  auto issue = [&](int i, int64_t block, bool before_wait) {
    if (i < num_tiles) {
      const int t0 = first + i * kStride;
      const int off = t0 % p.block_size;
      const T* kt = kbase + block * p.k_stride_block + off * (int)p.k_stride_slot;
      const T* vt = vbase + block * p.v_stride_block + off * (int)p.v_stride_slot;
      uint4* st = ring + (i % kStages) * PIECES * 32;
#pragma unroll
      for (int k = 0; k < LI; ++k) {
        const int row = RPI * k + ld_row;
        if (before_wait && t0 + row == ctx - 1) continue;
        const bool valid = t0 + row < ctx;
        cp_async16(st + k_slot(row), kt + k_off + RPI * k * (int)p.k_stride_slot, valid);
        cp_async16(st + v_slot(row), vt + v_off + RPI * k * (int)p.v_stride_slot, valid);
      }
    }
    cp_async_commit();  // possibly empty: keeps one group per tile index
  };
  // the row that early issuing left out, if it is in one of this warp's early tiles: loaded
  // through the L2 (the previous kernel wrote it) and stored where its copy would have landed
  auto fix_last_row = [&] {
    const int rel = ctx - 1 - first, i = rel / kStride, row = rel % kStride;
    if (rel < 0 || ctx - 1 >= end || row >= kTile || i >= kStages - 1 || ld_row != row % RPI) {
      return;
    }
    const int t0 = first + i * kStride, off = t0 % p.block_size, k = row / RPI;
    int64_t block = blk[0];  // blk[i], kept in registers
#pragma unroll
    for (int j = 1; j < kStages - 1; ++j) block = j == i ? blk[j] : block;
    const T* kt = kbase + block * p.k_stride_block + off * (int)p.k_stride_slot;
    const T* vt = vbase + block * p.v_stride_block + off * (int)p.v_stride_slot;
    const uint4 kv = __ldcg(reinterpret_cast<const uint4*>(
        kt + k_off + RPI * k * (int)p.k_stride_slot));
    const uint4 vv = __ldcg(reinterpret_cast<const uint4*>(
        vt + v_off + RPI * k * (int)p.v_stride_slot));
    uint4* st = ring + i * PIECES * 32;
    st[k_slot(row)] = kv, st[v_slot(row)] = vv;
  };

  // context lengths and block tables are the step's inputs, copied in before its first kernel;
  // q and the KV cache come from the previous kernel: read (and anything written) only after
  // the wait (programmatic dependent launch, launch.h), but for early_kv's tiles. One copy of
  // the first tiles' issue code serves both orders (13% less SASS than a copy each; the same
  // speed, bench/results/README.md "twelfth round")
  if (!early) pdl_wait();
  if (live) {
    fix_table();
#pragma unroll
    for (int i = 0; i < kStages - 1; ++i) issue(i, blk[i], early);
  }
  if (early) pdl_wait();
  pdl_launch_dependents();
  // Q fragments: query heads head0 + g (and head0 + g + 8); rows past the group are zero
  const T* q = static_cast<const T*>(p.q) + seq * p.q_stride_seq + head0 * p.q_stride_head;
  uint4 qf[RH][KC];
#pragma unroll
  for (int r = 0; r < RH; ++r) {
    const int row = g + 8 * r;
#pragma unroll
    for (int c = 0; c < KC; ++c) {
      qf[r][c] = row < group ? ld_nc_v4(q + row * p.q_stride_head + 8 * t + 32 * c)
                             : make_uint4(0, 0, 0, 0);
    }
  }
  if (early) fix_last_row();

  T* out = static_cast<T*>(p.out) + seq * p.out_stride_seq + head0 * p.out_stride_head;
  if (ctx <= 0) {  // nothing to attend to (a padding row of a CUDA graph batch): zeros
    if (split == 0) {
      for (int i = threadIdx.x; i < group * HEAD_DIM; i += blockDim.x) {
        out[(i / HEAD_DIM) * p.out_stride_head + i % HEAD_DIM] = from_float<T>(0.f);
      }
    }
    return;
  }
  if (begin >= ctx) return;

  const float scale_log2 = p.scale * kLog2e;
  float m[RH], l[RH], o[NT][2 * RH];  // o[j][2r], o[j][2r + 1]: row g + 8r, n-tile j
#pragma unroll
  for (int r = 0; r < RH; ++r) m[r] = -INFINITY, l[r] = 0.f;
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int i = 0; i < 2 * RH; ++i) o[j][i] = 0.f;

  // the block id of the next tile to issue, read one tile ahead so that issuing a tile never
  // waits on a global load of the block table
  int next_block = blk[kStages - 1];
  for (int i = 0; i < num_tiles; ++i) {
    __syncwarp();  // every lane is done reading the stage that tile i - 1 used
    const int j = i + kStages - 1, block = next_block;  // into that stage
    if (j + 1 < num_tiles) {
      next_block = __ldg(table + (first + (j + 1) * kStride) / p.block_size);
    }
    issue(j, block, false);
    cp_async_wait<kStages - 1>();  // this lane's copies of tile i have landed
    __syncwarp();                  // and every other lane's (K rows are shared)
    const int t0 = first + i * kStride;
    const uint4* st = ring + (i % kStages) * PIECES * 32;

    // S = Q K^T: s[n][0..1] row g, tokens 8n + 2t, +1; s[n][2..3] the same for row g + 8
    float s[2][4];
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
      for (int c = 0; c < KC; ++c) {
        const uint4 qa = qf[0][c], qb = qf[RH - 1][c];
        const uint4 k = st[k_src_row[n] + t + ((4 * c) ^ k_swz)];
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
      const int piece = (g + 8 * h) ^ (2 * t);  // rows 2t, 2t+1, 2t+8, 2t+9: swizzle 2t
      const uint4 v0 = st[VT + vrow[0] * RP + piece], v1 = st[VT + vrow[1] * RP + piece];
      const uint4 v2 = st[VT + vrow[2] * RP + piece], v3 = st[VT + vrow[3] * RP + piece];
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

  if (num_parts == 1) {
    for (int i = threadIdx.x; i < group * HEAD_DIM; i += blockDim.x) {
      const int row = i / HEAD_DIM, d = i % HEAD_DIM;
      float sum, acc;
      combine_warps<HEAD_DIM, ROWS, WARPS>(smem, s_max, s_sum, row, d, sum, acc);
      out[row * p.out_stride_head + d] = from_float<T>(acc / sum);
    }
    return;
  }
  const int64_t prow = ((int64_t)seq * p.num_heads + head0) * p.max_splits + split;
  for (int i = threadIdx.x; i < group * HEAD_DIM; i += blockDim.x) {
    const int row = i / HEAD_DIM, d = i % HEAD_DIM;
    float sum, acc;
    const float mx = combine_warps<HEAD_DIM, ROWS, WARPS>(smem, s_max, s_sum, row, d, sum, acc);
    const int64_t k = prow + (int64_t)row * p.max_splits;
    p.partial_out[k * HEAD_DIM + d] = acc / sum;
    if (d == 0) p.partial_max[k] = mx, p.partial_sum[k] = sum;
  }

  // The last block of this (sequence, KV head) to finish combines every chunk's result. One
  // thread counts for the block, after a barrier: its release covers every thread's writes
  __shared__ int s_last;
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t* counter = p.counters + seq * p.num_kv_heads + kv_head;
    s_last = atomic_add_acq_rel_gpu(counter, 1) == num_parts - 1;  // acquire: the others' too
    if (s_last) *counter = 0;  // every block has counted: ready for the next launch
  }
  __syncthreads();
  if (!s_last) return;
  if ((reinterpret_cast<uintptr_t>(p.partial_out) & 15) == 0) {
    combine_splits<T, HEAD_DIM, ROWS, WARPS, true>(p, seq, head0, group, num_parts, out);
  } else {
    combine_splits<T, HEAD_DIM, ROWS, WARPS, false>(p, seq, head0, group, num_parts, out);
  }
}

}  // namespace nanopd
