// The roundings of the fused layer kernels, shared by fused.cu and gemv_fused.cu: every
// product and sum of the torch reference through __fmul_rn / __fadd_rn (never contracted into
// an FMA), and each intermediate that torch keeps in the dtype rounded to it (rnd<T>).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#include "device_utils.cuh"

namespace nanopd {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
constexpr bool kIsBf16 = std::is_same_v<T, __nv_bfloat16>;

// x rounded to the dtype (nearest even), as a float
template <typename T>
__device__ __forceinline__ float rnd(float x) {
  if constexpr (kIsBf16<T>) {
    return __bfloat162float(__float2bfloat16_rn(x));
  } else {
    return __half2float(__float2half_rn(x));
  }
}

template <typename T>
__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
  return make_uint4(pack2<T>(f[0], f[1]), pack2<T>(f[2], f[3]), pack2<T>(f[4], f[5]),
                    pack2<T>(f[6], f[7]));
}

template <typename T>
__device__ __forceinline__ uint4 load8(const T* p) {
  return *reinterpret_cast<const uint4*>(p);
}

template <typename T>
__device__ __forceinline__ void store8(T* p, const uint4& v) {
  *reinterpret_cast<uint4*>(p) = v;
}

__device__ __forceinline__ float sum_sq8(const float (&f)[8]) {
  float s = 0.f;
#pragma unroll
  for (int e = 0; e < 8; ++e) s = __fadd_rn(s, __fmul_rn(f[e], f[e]));
  return s;
}

__device__ __forceinline__ float warp_total(float x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}

// Sum over the thread block (blockDim.x a multiple of 32), the same value in every thread.
__device__ __forceinline__ float block_total(float x) {
  __shared__ float s_warp[32];
  __shared__ float s_total;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  x = warp_total(x);
  if (lane == 0) s_warp[warp] = x;
  __syncthreads();
  if (warp == 0) {
    float y = lane < (int)(blockDim.x / 32) ? s_warp[lane] : 0.f;
    y = warp_total(y);
    if (lane == 0) s_total = y;
  }
  __syncthreads();
  return s_total;
}

// normed = round(w * round(x * inv)), element by element
template <typename T>
__device__ __forceinline__ void scale_by_weight(float (&x)[8], float inv, const uint4& w) {
  float wf[8];
  unpack8<T>(w, wf);
#pragma unroll
  for (int e = 0; e < 8; ++e) x[e] = rnd<T>(__fmul_rn(wf[e], rnd<T>(__fmul_rn(x[e], inv))));
}

// gate = round(round(silu(gate)) * up), torch's F.silu(gate) * up: x / (1 + exp(-x)) in
// fp32 (expf, IEEE division)
template <typename T>
__device__ __forceinline__ float swiglu1(float gate, float up) {
  const float silu = rnd<T>(gate / __fadd_rn(1.f, expf(-gate)));
  return rnd<T>(__fmul_rn(silu, up));
}

template <typename T>
__device__ __forceinline__ void swiglu8(float (&gate)[8], const float (&up)[8]) {
#pragma unroll
  for (int e = 0; e < 8; ++e) gate[e] = swiglu1<T>(gate[e], up[e]);
}

}  // namespace
}  // namespace nanopd
