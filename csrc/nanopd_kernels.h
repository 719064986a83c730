// nanopd CUDA kernels: launcher interface. Plain C, no torch: raw pointers, sizes, strides
// and a stream. csrc/bindings.cpp checks tensors and calls these; anything else may too.
//
// Strides are in elements unless a name ends in _nbytes. Every launcher returns the launch's
// cudaError_t (cudaErrorInvalidValue for arguments it does not support).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { NANOPD_FP16 = 0, NANOPD_BF16 = 1 };

// Decode attention over a paged KV cache: one query token per sequence.
// q, out: [num_seqs, num_heads, head_dim]; k_cache, v_cache: [num_blocks, block_size,
// num_kv_heads, head_dim] (head_dim contiguous, every row 16-byte aligned);
// block_tables: [num_seqs, >= ceil(context_len / block_size)] int32; context_lens: [num_seqs].
// Query head h reads KV head h / (num_heads / num_kv_heads).
//
// Split-K: each sequence's context is cut into at most max_splits chunks of equal size (a
// multiple of 64 tokens, at least min_chunk), one thread block per (KV head, sequence,
// chunk). The split is computed on the device from context_lens, so the launch does not depend
// on any context length: one grid serves every step of a captured CUDA graph. With
// max_splits > 1, a sequence of several chunks leaves per-chunk results in the fp32 workspace
// (partial_out [num_seqs, num_heads, max_splits, head_dim], partial_max and partial_sum
// [num_seqs, num_heads, max_splits]); the last of its blocks to finish (counted in
// counters [num_seqs * num_kv_heads], zero before the launch and zero again after it)
// combines them. No second kernel.
//
// early_kv != 0 promises that the kernel launched just before this one (on the stream) wrote
// no KV slot but each sequence's last (position context_len - 1): a decode step's own store.
// The kernel then fetches its first K/V tiles before waiting for that kernel (launch.h) and
// loads the last slot after the wait. 0: everything is read after the wait.
typedef struct {
  void* out;
  const void* q;
  const void* k_cache;
  const void* v_cache;
  const int32_t* block_tables;
  const int32_t* context_lens;
  float* partial_out;
  float* partial_max;
  float* partial_sum;
  int32_t* counters;
  int64_t q_stride_seq, q_stride_head;
  int64_t out_stride_seq, out_stride_head;
  int64_t k_stride_block, k_stride_slot, k_stride_head;
  int64_t v_stride_block, v_stride_slot, v_stride_head;
  int64_t block_tables_stride;
  int num_seqs, num_heads, num_kv_heads, head_dim, block_size;
  int max_splits, min_chunk;
  int early_kv;
  int warps;  // warps a thread block: 4 (2 blocks an SM at head_dim 128) or 8 (1)
  float scale;
  int dtype;  // NANOPD_FP16 or NANOPD_BF16
} PagedDecodeParams;

cudaError_t nanopd_paged_decode(const PagedDecodeParams* p, cudaStream_t stream);
// Bytes of shared memory one paged_decode block takes (its warps' cp.async rings) in this
// build (NANOPD_DECODE_STAGES), or 0 for a head_dim or warp count it does not have.
int nanopd_paged_decode_smem_nbytes(int head_dim, int warps);

// Write the step's new keys/values [num_tokens, num_kv_heads, head_dim] into the cache slots
// slot_mapping[t] = block * block_size + offset (a negative slot is skipped). Any element
// size; head_dim * elem_nbytes must be a multiple of 16 and rows 16-byte aligned.
typedef struct {
  const void* key;
  const void* value;
  void* k_cache;
  void* v_cache;
  const int64_t* slot_mapping;
  int64_t key_stride_token, key_stride_head;
  int64_t value_stride_token, value_stride_head;
  int64_t k_stride_block, k_stride_slot, k_stride_head;
  int64_t v_stride_block, v_stride_slot, v_stride_head;
  int num_tokens, num_kv_heads, head_dim, block_size, elem_nbytes;
} StoreKvParams;

cudaError_t nanopd_store_kv(const StoreKvParams* p, cudaStream_t stream);

// Copy whole blocks, every layer, K and V: dst[l, kv, dst_ids[i]] = src[l, kv, src_ids[i]].
// Pools are [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]; one block of one
// layer's K (or V) is block_nbytes contiguous bytes (a multiple of 16, 16-byte aligned). src
// may be another GPU's memory, mapped into this process (P2P / CUDA IPC); the kernel runs on
// the stream's (destination) GPU and reads it directly. No dst id may also be a src id.
typedef struct {
  const void* src;
  void* dst;
  const int64_t* src_ids;
  const int64_t* dst_ids;
  int64_t src_stride_layer_nbytes, src_stride_kv_nbytes, src_stride_block_nbytes;
  int64_t dst_stride_layer_nbytes, dst_stride_kv_nbytes, dst_stride_block_nbytes;
  int64_t block_nbytes;
  int num_pairs, num_layers;
} CopyBlocksParams;

cudaError_t nanopd_copy_blocks(const CopyBlocksParams* p, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
