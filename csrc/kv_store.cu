// store_kv: write the step's new K/V rows into their paged-cache slots, 16 bytes per thread.
// Torch reference: services/worker/ops/attention.py store_kv (index_copy_ into the slots).
#include <stdint.h>

#include "nanopd_kernels.h"

namespace {

constexpr int kThreads = 256;

// One thread moves one 16-byte piece of one (token, kv head) row of K and the same of V.
__global__ void __launch_bounds__(kThreads) store_kv_kernel(const StoreKvParams p,
                                                            int pieces_per_row) {
  const int num_pieces = p.num_tokens * p.num_kv_heads * pieces_per_row;  // < 2^31: checked
  for (int i = blockIdx.x * kThreads + threadIdx.x; i < num_pieces; i += gridDim.x * kThreads) {
    const int piece = i % pieces_per_row;
    const int row = i / pieces_per_row;
    const int head = row % p.num_kv_heads;
    const int64_t token = row / p.num_kv_heads;
    const int64_t slot = p.slot_mapping[token];
    if (slot < 0) continue;  // a padding token: nothing to store
    const int64_t block = slot / p.block_size, offset = slot % p.block_size;
    const int64_t piece_nbytes = 16LL * piece;
    const char* k_src = static_cast<const char*>(p.key) +
                        (token * p.key_stride_token + head * p.key_stride_head) * p.elem_nbytes;
    const char* v_src = static_cast<const char*>(p.value) +
                        (token * p.value_stride_token + head * p.value_stride_head) * p.elem_nbytes;
    char* k_dst = static_cast<char*>(p.k_cache) +
                  (block * p.k_stride_block + offset * p.k_stride_slot + head * p.k_stride_head) *
                      p.elem_nbytes;
    char* v_dst = static_cast<char*>(p.v_cache) +
                  (block * p.v_stride_block + offset * p.v_stride_slot + head * p.v_stride_head) *
                      p.elem_nbytes;
    const uint4 k = *reinterpret_cast<const uint4*>(k_src + piece_nbytes);
    const uint4 v = *reinterpret_cast<const uint4*>(v_src + piece_nbytes);
    *reinterpret_cast<uint4*>(k_dst + piece_nbytes) = k;
    *reinterpret_cast<uint4*>(v_dst + piece_nbytes) = v;
  }
}

}  // namespace

extern "C" cudaError_t nanopd_store_kv(const StoreKvParams* p, cudaStream_t stream) {
  if (p->num_tokens == 0) return cudaSuccess;
  const int row_nbytes = p->head_dim * p->elem_nbytes;
  if (p->elem_nbytes <= 0 || row_nbytes % 16 != 0 || p->block_size <= 0 ||
      p->num_kv_heads <= 0) {
    return cudaErrorInvalidValue;
  }
  const int pieces_per_row = row_nbytes / 16;
  const int64_t num_pieces = (int64_t)p->num_tokens * p->num_kv_heads * pieces_per_row;
  if (num_pieces >= (1LL << 31)) return cudaErrorInvalidValue;
  const int64_t blocks = (num_pieces + kThreads - 1) / kThreads;
  const int grid = (int)(blocks < 65536 ? blocks : 65536);  // grid-stride beyond that
  store_kv_kernel<<<grid, kThreads, 0, stream>>>(*p, pieces_per_row);
  return cudaGetLastError();
}
