// Device helpers of the nanopd kernels: cp.async, ordered read-only loads, mma, 16-bit packing.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

namespace nanopd {

#ifndef NANOPD_L2_PREFETCH  // bytes the L2 fetches around each cp.async miss: 0, 64, 128, 256
#define NANOPD_L2_PREFETCH 128
#endif
#if NANOPD_L2_PREFETCH == 0
#define NANOPD_CP_ASYNC "cp.async.cg.shared.global"
#elif NANOPD_L2_PREFETCH == 64
#define NANOPD_CP_ASYNC "cp.async.cg.shared.global.L2::64B"
#elif NANOPD_L2_PREFETCH == 128
#define NANOPD_CP_ASYNC "cp.async.cg.shared.global.L2::128B"
#elif NANOPD_L2_PREFETCH == 256
#define NANOPD_CP_ASYNC "cp.async.cg.shared.global.L2::256B"
#else
#error "NANOPD_L2_PREFETCH must be 0, 64, 128 or 256"
#endif

// 16 bytes global -> shared, asynchronous, L2 only; zeros instead when !valid (nothing read).
// The L2 prefetch hint makes a miss fetch the whole 128-byte line (measured: 0 and 64 bytes
// change nothing where a warp's 8 consecutive lanes read one whole line anyway).
__device__ __forceinline__ void cp_async16(void* smem_ptr, const void* gmem_ptr, bool valid) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_ptr));
  asm volatile(NANOPD_CP_ASYNC " [%0], [%1], 16, %2;"
               :: "r"(dst), "l"(gmem_ptr), "r"(valid ? 16 : 0) : "memory");
}

// Programmatic dependent launch (csrc/launch.h): wait until the previous kernel in the stream
// has completed and its writes are visible (a no-op if this launch did not use PDL), and let
// the next kernel's blocks launch (once every block of this grid has said so or exited).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Ask the L2 for the 128-byte line of p ahead of a later load (fire and forget).
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" :: "l"(p));
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}

template <int N>  // wait until at most N of this thread's committed groups are pending
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory");
}

// Read-only global loads that the compiler keeps where they are written (volatile asm): a
// kernel's first loads, issued together before any of them is used, cost one round trip.
__device__ __forceinline__ int ld_nc_s32(const int32_t* ptr) {
  int v;
  asm volatile("ld.global.nc.s32 %0, [%1];" : "=r"(v) : "l"(ptr));
  return v;
}

__device__ __forceinline__ uint4 ld_nc_v4(const void* ptr) {
  uint4 v;
  asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(ptr));
  return v;
}

// *ptr += v at GPU scope, acquire and release (MEMBAR.ALL, not __threadfence's MEMBAR.SC):
// writes that precede it, in this thread or in its block before a __syncthreads, are visible
// to a thread that sees the count; returns the old value.
__device__ __forceinline__ int atomic_add_acq_rel_gpu(int32_t* ptr, int v) {
  int old;
  asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;"
               : "=r"(old) : "l"(ptr), "r"(v) : "memory");
  return old;
}

__device__ __forceinline__ float fast_exp2(float x) {  // exp2(-inf) = 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// element e of a (8 x 16-bit) and element e of b, as one register: low half a's, high half b's
__device__ __forceinline__ uint32_t pair_of(const uint4& a, const uint4& b, int e) {
  return __byte_perm(word(a, e / 2), word(b, e / 2), (e & 1) ? 0x7632 : 0x5410);
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  } else {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
}

// element 0 (low half) and 1 (high half) of a 32-bit pair, exactly, as floats
template <typename T>
__device__ __forceinline__ float lo_float(uint32_t w) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __uint_as_float(w << 16);
  } else {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
  }
}

template <typename T>
__device__ __forceinline__ float hi_float(uint32_t w) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __uint_as_float(w & 0xffff0000u);
  } else {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  }
}

// the 8 16-bit elements of u, exactly, as floats
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& u, float (&f)[8]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t w = word(u, i);
    f[2 * i] = lo_float<T>(w);
    f[2 * i + 1] = hi_float<T>(w);
  }
}

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else {
    return __half2float(v);
  }
}

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return __float2half_rn(x);
  }
}

// d += A B, A 16x16 row-major (a0..a3), B 16x8 col-major (b0, b1), fp32 accumulators
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

}  // namespace nanopd
