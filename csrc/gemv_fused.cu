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
// the inverse RMS. The epilogues are in gemv_epilogue.cuh. One row of a layer wider than a
// wave of blocks goes to gemv_stream.cuh's kernel instead; ADD at one row of a long k_dim
// (down_proj) loads 16 or 18 pieces a round (NANOPD_GEMV_DEEP_ADD, NANOPD_GEMV_DEEP18), the
// same sums in the same order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "gemv_epilogue.cuh"
#include "gemv_stream.cuh"
#include "launch.h"

namespace nanopd {
namespace {

using namespace gemv;

#ifndef NANOPD_GEMV_DEEP_ADD  // 1: ADD at one row and k_dim >= kDeepK keeps 32 loads in flight
#define NANOPD_GEMV_DEEP_ADD 1
#endif
constexpr int kDeepK = 16 * kLaneStride;  // 4096
#ifndef NANOPD_GEMV_DEEP18  // 1: 18 pieces a round where that saves DEEP_ADD a round
#define NANOPD_GEMV_DEEP18 1
#endif

// One warp per C pairs of columns (SWIGLU, ROTARY) or R columns (ADD, PLAIN). NORM at 2
// columns: at most 168 registers (3 blocks an SM); its pinned loads cannot sink, which is
// what (.., 1) prevents in the others (gemv.cu's header)
template <typename T, int M, int R, int EPI, bool NORM, int UNROLL = 0>
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
    column_sums<T, M, R, NORM, UNROLL>(p, c0, 0, lane, acc, nm,
                                       [&] { load_residual<T, M, R>(p, c0, lane, res); });
    store_add<T, M, R>(q, acc, res, c0, lane);
  } else if constexpr (EPI == NANOPD_GEMV_ROTARY) {
    RotaryInputs<M, R / 2> in;  // loaded before the wait (NANOPD_GEMV_EARLY_INPUTS)
    const auto load_inputs = [&] { load_rotary_inputs<T, M, R>(q, c0, lane, in); };
#if NANOPD_GEMV_EARLY_INPUTS
    column_sums<T, M, R, NORM>(p, c0, pair_stride, lane, acc, nm, NoOp{}, load_inputs);
#else
    column_sums<T, M, R, NORM>(p, c0, pair_stride, lane, acc, nm);
    load_inputs();
#endif
    store_rotary<T, M, R>(q, acc, c0, lane, in);
  } else {
    column_sums<T, M, R, NORM>(p, c0, pair_stride, lane, acc, nm);
    if constexpr (EPI == NANOPD_GEMV_SWIGLU) {
      store_swiglu<T, M, R>(p, acc, c0, lane);
    } else {
      store_columns<T, M, R>(p, acc, c0, lane);
    }
  }
}

template <typename T, int M, int R, int EPI, bool NORM, int UNROLL = 0>
cudaError_t launch_cols(const GemvFusedParams& q, cudaStream_t stream) {
  constexpr int C = kPaired<EPI> ? R / 2 : R;
  const int64_t units = kPaired<EPI> ? q.gemv.n_dim / 2 : q.gemv.n_dim;
  const int64_t warps = (units + C - 1) / C;
  const int64_t blocks = (warps + kWarps - 1) / kWarps;
  return launch_kernel(gemv_fused_kernel<T, M, R, EPI, NORM, UNROLL>, dim3((unsigned)blocks),
                       dim3(kThreads), 0, stream, q);
}

// Columns per warp as gemv.cu: 4 for wide layers, else 2; ADD always 2 (a block's 8 columns
// per sum, NANOPD_GEMV_SUM_COLUMNS)
template <typename T, int M, int EPI, bool NORM>
cudaError_t launch_rows(const GemvFusedParams& q, cudaStream_t stream) {
  static_assert(kWarps * 2 == NANOPD_GEMV_SUM_COLUMNS, "ADD's sums are per block");
  bool streamed = false;  // wider than one wave, one row: gemv_stream.cuh
  const cudaError_t err = launch_stream<T, M, EPI, NORM>(q, stream, &streamed);
  if (err != cudaSuccess || streamed) return err;
  if constexpr (EPI != NANOPD_GEMV_ADD) {
    if (q.gemv.n_dim >= 8192) return launch_cols<T, M, 4, EPI, NORM>(q, stream);
  } else if constexpr (M == 1 && !NORM && NANOPD_GEMV_DEEP_ADD) {
    // a long row (down_proj): 16 pieces a round, not 8, so half as many DRAM round trips
    // one after the other (the same sums in the same order); 18 where that makes one round
    // fewer (the 1.5B shape's 35 pieces a lane: 2 rounds, not 3; 212 registers, no spill)
    if (q.gemv.k_dim >= kDeepK) {
      const int pieces = (q.gemv.k_dim + kLaneStride - 1) / kLaneStride;
      if (NANOPD_GEMV_DEEP18 && (pieces + 17) / 18 < (pieces + 15) / 16) {
        return launch_cols<T, M, 2, EPI, NORM, 18>(q, stream);
      }
      return launch_cols<T, M, 2, EPI, NORM, 16>(q, stream);
    }
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
