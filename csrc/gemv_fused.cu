// The decode-batch GEMV with the kernel before it folded in (csrc/gemv.h, GemvPrologueParams):
//   ADD_NORM: out = linear(fused_add_rms_norm(x, residual))  (qkv_proj, gate_up_proj)
//   SWIGLU:   out = linear(silu_and_mul(gate_up))              (down_proj)
// A decode step of one sequence spends ~2 us on each of those small kernels inside a CUDA
// graph (bench/decode_profile.py, H200); here each thread block makes the GEMV's x itself, in
// shared memory, with the roundings of fused.cu (fused_math.cuh), and then runs the GEMV's
// loop (gemv.cuh) on it. x is a few KB, so making it once per block costs little next to the
// block's weight rows; only block 0 writes the new residual (to its own buffer: the other
// blocks still read the old one). The weights' first round is prefetched before the kernel
// waits for its predecessor (programmatic dependent launch, launch.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "fused_math.cuh"
#include "gemv.cuh"
#include "launch.h"

namespace nanopd {
namespace {

using namespace gemv;

constexpr int kThreads = kWarps * 32;

// xs[m] = RMSNorm(x[m] + residual[m]) (or of x[m] alone), residual_out[m] = x[m] + residual[m]
// in block 0. Every thread of the block takes part (block_total has barriers).
template <typename T, int M>
__device__ __forceinline__ void add_norm_into(const GemvPrologueParams& q, T* xs) {
  const GemvParams& p = q.gemv;
  const int pieces = p.k_dim / kPiece;
  const float inv_k = __frcp_rn((float)p.k_dim);  // = the host's 1.f / hidden of rms_norm
  const T* weight = static_cast<const T*>(q.norm_weight);
  const bool write_residual = q.residual != nullptr && blockIdx.x == 0;
  for (int m = 0; m < M; ++m) {
    const T* x = static_cast<const T*>(p.x) + m * p.x_stride_row;
    const T* res = q.residual == nullptr
                       ? nullptr
                       : static_cast<const T*>(q.residual) + m * q.residual_stride_row;
    T* res_out = write_residual ? static_cast<T*>(q.residual_out) + m * q.residual_out_stride_row
                                : nullptr;
    T* row = xs + m * p.k_dim;
    float sum_sq = 0.f;
    for (int i = threadIdx.x; i < pieces; i += kThreads) {
      float f[8];
      unpack8<T>(load8(x + kPiece * i), f);
      if (res != nullptr) {  // the new residual: round(x + residual), the row to normalize
        float r[8];
        unpack8<T>(load8(res + kPiece * i), r);
#pragma unroll
        for (int e = 0; e < 8; ++e) f[e] = rnd<T>(__fadd_rn(f[e], r[e]));
      }
      const uint4 v = pack8<T>(f);
      store8(row + kPiece * i, v);
      if (res_out != nullptr) store8(res_out + kPiece * i, v);
      sum_sq = __fadd_rn(sum_sq, sum_sq8(f));
    }
    const float total = block_total(sum_sq);
    const float inv = rsqrtf(__fadd_rn(__fmul_rn(total, inv_k), q.eps));
    for (int i = threadIdx.x; i < pieces; i += kThreads) {  // this thread's own pieces
      float f[8];
      unpack8<T>(load8(row + kPiece * i), f);
      scale_by_weight<T>(f, inv, load8(weight + kPiece * i));
      store8(row + kPiece * i, pack8<T>(f));
    }
  }
}

// xs[m] = silu(gate[m]) * up[m] of x[m] = [gate | up], each k_dim wide
template <typename T, int M>
__device__ __forceinline__ void swiglu_into(const GemvParams& p, T* xs) {
  const int pieces = p.k_dim / kPiece;
  for (int m = 0; m < M; ++m) {
    const T* x = static_cast<const T*>(p.x) + m * p.x_stride_row;
    for (int i = threadIdx.x; i < pieces; i += kThreads) {
      float gate[8], up[8];
      unpack8<T>(load8(x + kPiece * i), gate);
      unpack8<T>(load8(x + p.k_dim + kPiece * i), up);
      swiglu8<T>(gate, up);
      store8(xs + m * p.k_dim + kPiece * i, pack8<T>(gate));
    }
  }
}

template <typename T, int M, int R, int MODE>
__global__ void __launch_bounds__(kThreads, 1) gemv_prologue_kernel(const GemvPrologueParams q) {
  extern __shared__ uint4 smem[];  // x: [M][k_dim] of T
  T* xs = reinterpret_cast<T*>(smem);
  const GemvParams& p = q.gemv;
  const int lane = threadIdx.x % 32;
  const int n0 = (blockIdx.x * kWarps + threadIdx.x / 32) * R;
  const bool has_columns = n0 < p.n_dim;  // a warp without stays for the prologue's barriers
  const T* w_rows[R];
  weight_rows<T, R>(p, has_columns ? n0 : 0, w_rows);
  if (has_columns) prefetch_first_round<T, M, R>(p, w_rows, lane);
  pdl_wait();  // x (and the residual) come from the previous kernel
  pdl_launch_dependents();
  if constexpr (MODE == NANOPD_GEMV_ADD_NORM) {
    add_norm_into<T, M>(q, xs);
  } else {
    swiglu_into<T, M>(p, xs);
  }
  __syncthreads();
  if (!has_columns) return;
  float acc[M][R];
  lane_sums<T, M, R>(p, xs, p.k_dim, w_rows, lane, acc);
  store_columns<T, M, R>(p, acc, n0, lane);
}

template <typename T, int M, int R, int MODE>
cudaError_t launch_cols(const GemvPrologueParams& q, cudaStream_t stream) {
  const GemvParams& p = q.gemv;
  const int64_t warps = (p.n_dim + R - 1) / R;
  const int64_t blocks = (warps + kWarps - 1) / kWarps;
  const int smem_nbytes = M * p.k_dim * (int)sizeof(T);
  auto kernel = gemv_prologue_kernel<T, M, R, MODE>;
  if (smem_nbytes > 48 * 1024) {  // above 48 KiB of dynamic shared memory needs an opt-in
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_nbytes);
    if (err != cudaSuccess) return err;
  }
  return launch_kernel(kernel, dim3((unsigned)blocks), dim3(kThreads), smem_nbytes, stream, q);
}

template <typename T, int M, int MODE>
cudaError_t launch_rows(const GemvPrologueParams& q, cudaStream_t stream) {
  if (q.gemv.n_dim >= 8192) return launch_cols<T, M, 4, MODE>(q, stream);  // as gemv.cu
  return launch_cols<T, M, 2, MODE>(q, stream);
}

template <typename T, int MODE>
cudaError_t launch_mode(const GemvPrologueParams& q, cudaStream_t stream) {
  switch (q.gemv.num_rows) {
    case 1: return launch_rows<T, 1, MODE>(q, stream);
    case 2: return launch_rows<T, 2, MODE>(q, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t launch(const GemvPrologueParams& q, cudaStream_t stream) {
  if (q.mode == NANOPD_GEMV_ADD_NORM) return launch_mode<T, NANOPD_GEMV_ADD_NORM>(q, stream);
  if (q.mode == NANOPD_GEMV_SWIGLU) return launch_mode<T, NANOPD_GEMV_SWIGLU>(q, stream);
  return cudaErrorInvalidValue;
}

}  // namespace
}  // namespace nanopd

extern "C" cudaError_t nanopd_gemv_prologue(const GemvPrologueParams* q, cudaStream_t stream) {
  const GemvParams& p = q->gemv;
  const int64_t smem_nbytes = (int64_t)p.num_rows * p.k_dim * 2;
  if (p.num_rows < 1 || p.num_rows > 2 || p.n_dim < 1 || p.k_dim < 1 || p.k_dim % 8 != 0 ||
      p.n_dim >= (1 << 30) || smem_nbytes > NANOPD_GEMV_PROLOGUE_MAX_NBYTES ||
      (q->mode == NANOPD_GEMV_ADD_NORM &&
       (q->norm_weight == nullptr || (q->residual != nullptr && q->residual_out == nullptr)))) {
    return cudaErrorInvalidValue;
  }
  if (p.dtype == NANOPD_BF16) return nanopd::launch<__nv_bfloat16>(*q, stream);
  if (p.dtype == NANOPD_FP16) return nanopd::launch<__half>(*q, stream);
  return cudaErrorInvalidValue;
}
