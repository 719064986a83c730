// copy_blocks: whole KV blocks, every layer, K and V, from one pool into another, one launch.
// Torch reference: dst_pool[:, :, dst_ids] = src_pool[:, :, src_ids] (ModelRunner.copy_blocks).
//
// The source may be another GPU's pool mapped into this process (the cuda_ipc transport): the
// kernel runs on the destination GPU and reads the peer's memory directly over NVLink / PCIe,
// so there is no gather on the peer, no staging buffer and no scatter. One thread block per
// (layer, k|v, pair) chunk of block_nbytes contiguous bytes; each thread keeps kUnroll 16-byte
// loads in flight before it stores them, which is what hides the peer's read latency.
#include <stdint.h>

#include "nanopd_kernels.h"

namespace {

constexpr int kThreads = 128;
constexpr int kUnroll = 4;  // 128 threads x 4 x 16 bytes = 8 KiB in flight per thread block

__global__ void __launch_bounds__(kThreads) copy_blocks_kernel(const CopyBlocksParams p) {
  const int64_t chunk = blockIdx.x;  // consecutive chunks: one layer's K, consecutive pairs
  const int pair = (int)(chunk % p.num_pairs);
  const int lk = (int)(chunk / p.num_pairs);
  const int layer = lk / 2, kv = lk % 2;
  const char* src = static_cast<const char*>(p.src) + layer * p.src_stride_layer_nbytes +
                    kv * p.src_stride_kv_nbytes + p.src_ids[pair] * p.src_stride_block_nbytes;
  char* dst = static_cast<char*>(p.dst) + layer * p.dst_stride_layer_nbytes +
              kv * p.dst_stride_kv_nbytes + p.dst_ids[pair] * p.dst_stride_block_nbytes;
  const uint4* s = reinterpret_cast<const uint4*>(src);
  uint4* d = reinterpret_cast<uint4*>(dst);
  const int num_vecs = (int)(p.block_nbytes / 16);
  for (int base = threadIdx.x; base < num_vecs; base += kThreads * kUnroll) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * kThreads;
      if (i < num_vecs) v[u] = s[i];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * kThreads;
      if (i < num_vecs) d[i] = v[u];
    }
  }
}

}  // namespace

extern "C" cudaError_t nanopd_copy_blocks(const CopyBlocksParams* p, cudaStream_t stream) {
  if (p->num_pairs == 0 || p->num_layers == 0) return cudaSuccess;
  const int64_t num_chunks = (int64_t)p->num_pairs * p->num_layers * 2;
  if (p->num_pairs < 0 || p->num_layers < 0 || p->block_nbytes <= 0 ||
      p->block_nbytes % 16 != 0 || p->block_nbytes / 16 >= (1LL << 31) ||
      num_chunks >= (1LL << 31)) {
    return cudaErrorInvalidValue;
  }
  copy_blocks_kernel<<<(unsigned)num_chunks, kThreads, 0, stream>>>(*p);
  return cudaGetLastError();
}
