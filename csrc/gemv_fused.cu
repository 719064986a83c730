// The decode-batch GEMV with the kernels around it folded in (csrc/gemv.h, GemvFusedParams):
//   SWIGLU: out = silu_and_mul(linear(x))                   (gate_up_proj)
//   ROTARY: out = qkv, rotated, k and v stored in the cache   (qkv_proj without q/k norm)
//   ADD:    residual += linear(x), and its sums of squares    (o_proj, down_proj)
//   NORM (a prologue, any but ADD): linear(RMSNorm(x))        (qkv_proj, gate_up_proj)
// A decode step of one sequence spent ~2 us on each of the small kernels between its GEMVs
// inside a CUDA graph, plus a kernel boundary (bench/decode_profile.py, H200). The GEMV's loop
// is gemv.cu's (gemv.cuh); what changes is which columns a warp takes and what it does with
// its sums:
// - SWIGLU: the gate and the up column of the same output (weight_rows with pairs), so a
//   warp's epilogue combines its own two sums: the gate_up output is never written;
// - ROTARY: columns d and d + D/2 of a head, rotated (q and k heads) as fused.cu's
//   rotary_store_kv does; k and v are written into their cache slots;
// - ADD + NORM split fused_add_rms_norm around the GEMVs: the add and the sums of squares
//   (each block's 8 columns, in a fixed order, no atomics) in the epilogue of the GEMV
//   before; in the GEMV after, once its first round of weight loads is out, each block adds
//   those few hundred sums and writes RMSNorm(x) into shared memory, where its warps read x.
//   Measured slower and dropped (H200, 2026-12-02, docs/kernels.md "Linear layers"): the
//   whole norm made per block before the first weight load, the norm made per warp from the
//   whole row, and this split with the norm in registers (more registers: fewer blocks).
// SWIGLU and ROTARY are bitwise the two kernels they replace, ADD's residual is bitwise the
// add's, and NORM's x differs from rms_norm's only where the other order of the sum moves
// the inverse RMS.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "fused_math.cuh"  // rnd, swiglu1
#include "gemv.cuh"
#include "launch.h"

namespace nanopd {
namespace {

using namespace gemv;

constexpr int kThreads = kWarps * 32;

// For each pair of outputs this lane stores: f(m, i, a, b, va, vb) for row m, pair i (of
// n_dim / 2), its columns a and b (weight_rows' pairing by pair_stride P) and their values
// with the bias added and rounded, as the plain GEMV's outputs (store_columns)
template <typename T, int M, int R, typename F>
__device__ __forceinline__ void for_own_pairs(const GemvParams& p, const float (&acc)[M][R],
                                              int c0, int lane, int pair_stride, F&& f) {
  constexpr int C = R / 2;
  const T* bias = static_cast<const T*>(p.bias);
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int j = 0; j < C; ++j) {
      const int i = c0 + j;
      if (lane != (m * C + j) % 32 || i >= p.n_dim / 2) continue;
      const int a = (i / pair_stride) * 2 * pair_stride + i % pair_stride, b = a + pair_stride;
      float va = acc[m][j], vb = acc[m][j + C];
      if (bias != nullptr) va += to_float(bias[a]), vb += to_float(bias[b]);
      f(m, i, a, b, rnd<T>(va), rnd<T>(vb));
    }
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

// ROTARY's epilogue: pair (m, i) is columns a = head D + d and b = a + D/2 of token m,
// rotated (q and k heads) with rotary_store_kv's roundings, stored, and (k and v heads)
// written into the token's slot
template <typename T, int M, int R>
__device__ __forceinline__ void store_rotary(const GemvFusedParams& q, const float (&acc)[M][R],
                                             int c0, int lane) {
  const GemvParams& p = q.gemv;
  const RotaryStoreKvParams& rp = q.rotary;
  const int half = rp.head_dim / 2;
  T* out = static_cast<T*>(p.out);
  for_own_pairs<T>(p, acc, c0, lane, half, [&](int m, int i, int a, int b, float va,
                                               float vb) {
    const int head = i / half, d = i % half;
    const bool is_q = head < rp.num_heads;
    const bool is_v = head >= rp.num_heads + rp.num_kv_heads;
    if (!is_v) {
      const int64_t pos = rp.positions[m];
      float ca, cb, sa, sb;
      if (pos >= 0 && pos < rp.max_positions) {
        const float* c = rp.cos + pos * rp.head_dim + d;
        const float* s = rp.sin + pos * rp.head_dim + d;
        ca = c[0], cb = c[half], sa = s[0], sb = s[half];
      } else {
        ca = cb = sa = sb = __int_as_float(0x7fc00000);  // NaN, as rotary_store_kv
      }
      const float ra = rnd<T>(__fadd_rn(rnd<T>(__fmul_rn(va, rnd<T>(ca))),
                                        rnd<T>(__fmul_rn(-vb, rnd<T>(sa)))));
      const float rb = rnd<T>(__fadd_rn(rnd<T>(__fmul_rn(vb, rnd<T>(cb))),
                                        rnd<T>(__fmul_rn(va, rnd<T>(sb)))));
      va = ra, vb = rb;
    }
    out[m * p.out_stride_row + a] = from_float<T>(va);
    out[m * p.out_stride_row + b] = from_float<T>(vb);
    const int64_t slot = is_q ? -1 : rp.slot_mapping[m];
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

// One warp per C pairs of columns (SWIGLU, ROTARY) or R columns (ADD, PLAIN). NORM at 2
// columns: at most 168 registers (3 blocks an SM); its pinned loads cannot sink, which is
// what (.., 1) prevents in the others (gemv.cu's header)
template <typename T, int M, int R, int EPI, bool NORM>
__global__ void __launch_bounds__(kThreads, NORM && R == 2 ? 3 : 1)
    gemv_fused_kernel(const GemvFusedParams q) {
  const GemvParams& p = q.gemv;
  constexpr int C = kPaired<EPI> ? R / 2 : R;
  const int units = kPaired<EPI> ? p.n_dim / 2 : p.n_dim;
  const int lane = threadIdx.x % 32;
  const int c0 = (blockIdx.x * kWarps + threadIdx.x / 32) * C;
  // ADD's block sum and NORM's prologue need every warp: one past the end reads the last
  // column, unused
  if (EPI != NANOPD_GEMV_ADD && !NORM && c0 >= units) return;
  const int pair_stride = EPI == NANOPD_GEMV_SWIGLU  ? p.n_dim / 2
                          : EPI == NANOPD_GEMV_ROTARY ? q.rotary.head_dim / 2
                                                      : 0;
  const GemvNormParams* nm = NORM ? &q.norm : nullptr;
  float acc[M][R];
  if constexpr (EPI == NANOPD_GEMV_ADD) {
    float res[M][R];
    column_sums<T, M, R, NORM>(p, c0, 0, lane, acc, nm,
                               [&] { load_residual<T, M, R>(p, c0, lane, res); });
    store_add<T, M, R>(q, acc, res, c0, lane);
  } else {
    column_sums<T, M, R, NORM>(p, c0, pair_stride, lane, acc, nm);
    if constexpr (EPI == NANOPD_GEMV_SWIGLU) {
      store_swiglu<T, M, R>(p, acc, c0, lane);
    } else if constexpr (EPI == NANOPD_GEMV_ROTARY) {
      store_rotary<T, M, R>(q, acc, c0, lane);
    } else {
      store_columns<T, M, R>(p, acc, c0, lane);
    }
  }
}

template <typename T, int M, int R, int EPI, bool NORM>
cudaError_t launch_cols(const GemvFusedParams& q, cudaStream_t stream) {
  constexpr int C = kPaired<EPI> ? R / 2 : R;
  const int64_t units = kPaired<EPI> ? q.gemv.n_dim / 2 : q.gemv.n_dim;
  const int64_t warps = (units + C - 1) / C;
  const int64_t blocks = (warps + kWarps - 1) / kWarps;
  return launch_kernel(gemv_fused_kernel<T, M, R, EPI, NORM>, dim3((unsigned)blocks),
                       dim3(kThreads), 0, stream, q);
}

// Columns per warp as gemv.cu: 4 for wide layers, else 2; ADD always 2 (a block's 8 columns
// per sum, NANOPD_GEMV_SUM_COLUMNS)
template <typename T, int M, int EPI, bool NORM>
cudaError_t launch_rows(const GemvFusedParams& q, cudaStream_t stream) {
  static_assert(kWarps * 2 == NANOPD_GEMV_SUM_COLUMNS, "ADD's sums are per block");
  if constexpr (EPI != NANOPD_GEMV_ADD) {
    if (q.gemv.n_dim >= 8192) return launch_cols<T, M, 4, EPI, NORM>(q, stream);
  }
  return launch_cols<T, M, 2, EPI, NORM>(q, stream);
}

template <typename T, int EPI, bool NORM>
cudaError_t launch_epilogue(const GemvFusedParams& q, cudaStream_t stream) {
  switch (q.gemv.num_rows) {
    case 1: return launch_rows<T, 1, EPI, NORM>(q, stream);
    case 2: return launch_rows<T, 2, EPI, NORM>(q, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T, bool NORM>
cudaError_t launch_norm(const GemvFusedParams& q, cudaStream_t stream) {
  switch (q.epilogue) {
    case NANOPD_GEMV_SWIGLU: return launch_epilogue<T, NANOPD_GEMV_SWIGLU, NORM>(q, stream);
    case NANOPD_GEMV_ROTARY: return launch_epilogue<T, NANOPD_GEMV_ROTARY, NORM>(q, stream);
    case NANOPD_GEMV_ADD:  // its input is never normed (o_proj, down_proj): not built
      if constexpr (NORM) return cudaErrorInvalidValue;
      else return launch_epilogue<T, NANOPD_GEMV_ADD, false>(q, stream);
    default: return launch_epilogue<T, NANOPD_GEMV_PLAIN, NORM>(q, stream);
  }
}

template <typename T>
cudaError_t launch(const GemvFusedParams& q, cudaStream_t stream) {
  if (q.norm.sums != nullptr) return launch_norm<T, true>(q, stream);
  return launch_norm<T, false>(q, stream);
}

}  // namespace
}  // namespace nanopd

extern "C" cudaError_t nanopd_gemv_fused(const GemvFusedParams* q, cudaStream_t stream) {
  const GemvParams& p = q->gemv;
  const RotaryStoreKvParams& r = q->rotary;
  const bool rotary_ok =  // as rotary_store_kv's checks, for the rows of this GEMV
      r.qkv == p.out && r.num_tokens == p.num_rows && r.num_heads > 0 && r.num_kv_heads > 0 &&
      r.head_dim >= 2 && r.head_dim % 2 == 0 &&
      (int64_t)(r.num_heads + 2 * r.num_kv_heads) * r.head_dim == p.n_dim &&
      r.block_size > 0 && r.max_positions > 0 && r.positions && r.cos && r.sin && r.k_cache &&
      r.v_cache && r.slot_mapping && r.q_norm_weight == nullptr;
  const GemvNormParams& nm = q->norm;
  const bool norm_ok = nm.sums == nullptr || (nm.weight != nullptr && nm.num_sums >= 1 &&
                                              nm.num_sums <= NANOPD_GEMV_NORM_MAX_SUMS &&
                                              p.k_dim <= NANOPD_GEMV_NORM_MAX_SUMS *
                                                             NANOPD_GEMV_SUM_COLUMNS &&
                                              nm.eps >= 0.f);
  const bool paired = q->epilogue == NANOPD_GEMV_SWIGLU || q->epilogue == NANOPD_GEMV_ROTARY;
  if (q->epilogue < NANOPD_GEMV_SWIGLU || q->epilogue > NANOPD_GEMV_PLAIN ||
      (q->epilogue == NANOPD_GEMV_ROTARY && !rotary_ok) ||
      (q->epilogue == NANOPD_GEMV_ADD && q->sums == nullptr) || !norm_ok ||
      p.num_rows < 1 || p.num_rows > NANOPD_GEMV_FUSED_MAX_ROWS || p.n_dim < 1 ||
      (paired && (p.n_dim < 2 || p.n_dim % 2 != 0)) || p.k_dim < 1 || p.k_dim % 8 != 0 ||
      p.n_dim >= (1 << 30)) {
    return cudaErrorInvalidValue;
  }
  if (p.dtype == NANOPD_BF16) return nanopd::launch<__nv_bfloat16>(*q, stream);
  if (p.dtype == NANOPD_FP16) return nanopd::launch<__half>(*q, stream);
  return cudaErrorInvalidValue;
}
