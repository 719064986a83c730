// Paged decode attention: instantiations and the launcher (kernels in paged_decode.cuh).
#include "launch.h"
#include "paged_decode.cuh"

namespace nanopd {
namespace {

constexpr int kMaxDevices = 64;

template <typename T, int HEAD_DIM, int ROWS, int WARPS>
cudaError_t launch(const PagedDecodeParams& p, cudaStream_t stream) {
  const dim3 grid(p.num_kv_heads, p.num_seqs, p.max_splits);
  constexpr int smem_nbytes = decode_smem_nbytes<HEAD_DIM, WARPS>();
  auto kernel = paged_decode_kernel<T, HEAD_DIM, ROWS, WARPS>;
  // above 48 KiB of dynamic shared memory needs an opt-in, once per kernel and device
  static bool opted_in[kMaxDevices] = {};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device >= kMaxDevices || !opted_in[device]) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_nbytes);
    if (err != cudaSuccess) return err;
    if (device < kMaxDevices) opted_in[device] = true;  // a race only repeats the call
  }
  return launch_kernel(kernel, grid, dim3(WARPS * 32), smem_nbytes, stream, p);
}

// 4 warps a block (up to 2 an SM at head_dim 128: shared memory), the bandwidth build for
// large batches; 8 warps (1 an SM) for few sequences: half the tiles a warp, and 16 chunks a
// combine round instead of 8 (cuda_ops.choose_warps picks)
template <typename T, int HEAD_DIM, int ROWS>
cudaError_t by_warps(const PagedDecodeParams& p, cudaStream_t stream) {
  switch (p.warps) {
    case 4: return launch<T, HEAD_DIM, ROWS, 4>(p, stream);
    case 8: return launch<T, HEAD_DIM, ROWS, 8>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T, int HEAD_DIM>
cudaError_t by_group(const PagedDecodeParams& p, cudaStream_t stream) {
  const int group = p.num_heads / p.num_kv_heads;
  if (group <= 8) return by_warps<T, HEAD_DIM, 8>(p, stream);
  if (group <= 16) return by_warps<T, HEAD_DIM, 16>(p, stream);
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t by_head_dim(const PagedDecodeParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return by_group<T, 64>(p, stream);
    case 128: return by_group<T, 128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace
}  // namespace nanopd

extern "C" cudaError_t nanopd_paged_decode(const PagedDecodeParams* p, cudaStream_t stream) {
  using namespace nanopd;
  if (p->num_seqs == 0) return cudaSuccess;
  const bool ok = p->num_kv_heads > 0 && p->num_heads % p->num_kv_heads == 0 &&
                  p->block_size > 0 && p->block_size % kTile == 0 &&
                  p->min_chunk > 0 && p->min_chunk % kChunkAlign == 0 &&
                  p->max_splits >= 1 && p->max_splits <= kMaxSplits &&
                  (p->warps == 4 || p->warps == 8) &&
                  p->num_seqs <= 65535 &&
                  (p->max_splits == 1 ||
                   (p->partial_out && p->partial_max && p->partial_sum && p->counters));
  if (!ok) return cudaErrorInvalidValue;
  switch (p->dtype) {
    case NANOPD_FP16: return by_head_dim<__half>(*p, stream);
    case NANOPD_BF16: return by_head_dim<__nv_bfloat16>(*p, stream);
    default: return cudaErrorInvalidValue;
  }
}

extern "C" int nanopd_paged_decode_smem_nbytes(int head_dim, int warps) {
  using namespace nanopd;
  if (head_dim == 64 && warps == 4) return decode_smem_nbytes<64, 4>();
  if (head_dim == 64 && warps == 8) return decode_smem_nbytes<64, 8>();
  if (head_dim == 128 && warps == 4) return decode_smem_nbytes<128, 4>();
  if (head_dim == 128 && warps == 8) return decode_smem_nbytes<128, 8>();
  return 0;
}
