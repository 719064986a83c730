// Python bindings of the nanopd kernels: check tensors, then call the plain launchers.
// Built by csrc/build.py; called through services/worker/ops/cuda_ops.py. Each binding
// returns "" or the error (binding_checks.h says why nothing here throws).
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/PeerToPeerAccess.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "binding_checks.h"
#include "nanopd_kernels.h"

namespace {

using nanopd::Checks;
using Named = std::pair<const at::Tensor*, const char*>;

std::string paged_decode(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const at::Tensor& block_tables,
                         const at::Tensor& context_lens, at::Tensor& partial_out,
                         at::Tensor& partial_max, at::Tensor& partial_sum, at::Tensor& counters,
                         double scale, int64_t max_splits, int64_t min_chunk,
                         bool early_kv, int64_t warps) {
  Checks c;
  const at::Device device = q.device();
  for (auto [t, name] : {Named{&q, "q"}, {&out, "out"}, {&k_cache, "k_cache"},
                         {&v_cache, "v_cache"}, {&block_tables, "block_tables"},
                         {&context_lens, "context_lens"}}) {
    if (!c.on_device(*t, name, device)) return c.error();
  }
  const auto dtype = q.scalar_type();
  c.require(dtype == at::kHalf || dtype == at::kBFloat16,
            "paged_decode takes float16 or bfloat16; q is ", dtype);
  c.require(out.scalar_type() == dtype && k_cache.scalar_type() == dtype &&
                v_cache.scalar_type() == dtype,
            "q, out, k_cache and v_cache must share one dtype");
  c.require(q.dim() == 3 && out.sizes() == q.sizes(),
            "q and out must be [num_seqs, num_heads, head_dim] of one shape");
  c.require(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
            "k_cache and v_cache must be [num_blocks, block_size, num_kv_heads, head_dim]");
  if (c.failed()) return c.error();
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  c.require(k_cache.size(3) == head_dim, "cache head_dim ", k_cache.size(3), " != q's ",
            head_dim);
  c.require(head_dim == 64 || head_dim == 128, "head_dim ", head_dim,
            " is not built (64 or 128)");
  c.require(num_kv_heads > 0 && num_heads % num_kv_heads == 0 &&
                num_heads / num_kv_heads <= 16,
            num_heads, " query heads over ", num_kv_heads,
            " KV heads: groups of at most 16 are built");
  c.require(block_size % 16 == 0, "block_size ", block_size, " must be a multiple of 16");
  c.require(max_splits >= 1 && max_splits <= 256, "max_splits ", max_splits,
            " must be in [1, 256]");
  c.require(min_chunk > 0 && min_chunk % 64 == 0, "min_chunk ", min_chunk,
            " must be a positive multiple of 64");
  c.require(num_seqs <= 65535, num_seqs, " sequences; at most 65535 per launch");
  c.require(warps == 4 || warps == 8, "warps ", warps, " is not built (4 or 8)");
  for (auto [t, name] : {Named{&q, "q"}, {&out, "out"}, {&k_cache, "k_cache"},
                         {&v_cache, "v_cache"}}) {
    c.rows16(*t, name);
  }
  c.require(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 &&
                block_tables.size(0) >= num_seqs && block_tables.stride(1) == 1,
            "block_tables must be int32 [>= num_seqs, max_blocks], rows contiguous");
  c.require(context_lens.scalar_type() == at::kInt && context_lens.dim() == 1 &&
                context_lens.size(0) >= num_seqs && context_lens.is_contiguous(),
            "context_lens must be contiguous int32 [>= num_seqs]");
  if (max_splits > 1) {
    for (auto [t, name] : {Named{&partial_out, "partial_out"}, {&partial_max, "partial_max"},
                           {&partial_sum, "partial_sum"}}) {
      if (!c.on_device(*t, name, device)) return c.error();
      c.require(t->scalar_type() == at::kFloat && t->is_contiguous(), name,
                " must be contiguous float32");
    }
    c.require(partial_out.sizes() == at::IntArrayRef({num_seqs, num_heads, max_splits,
                                                     head_dim}) &&
                  partial_max.sizes() == at::IntArrayRef({num_seqs, num_heads, max_splits}) &&
                  partial_sum.sizes() == partial_max.sizes(),
              "workspace must be [num_seqs, num_heads, max_splits(, head_dim)]");
    if (!c.on_device(counters, "counters", device)) return c.error();
    c.require(counters.scalar_type() == at::kInt && counters.is_contiguous() &&
                  counters.numel() >= num_seqs * num_kv_heads,
              "counters must be contiguous int32 with >= num_seqs * num_kv_heads zeros");
  }
  if (c.failed()) return c.error();
  PagedDecodeParams p{};
  p.out = out.data_ptr();
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.block_tables = block_tables.data_ptr<int32_t>();
  p.context_lens = context_lens.data_ptr<int32_t>();
  if (max_splits > 1) {
    p.partial_out = partial_out.data_ptr<float>();
    p.partial_max = partial_max.data_ptr<float>();
    p.partial_sum = partial_sum.data_ptr<float>();
    p.counters = counters.data_ptr<int32_t>();
  }
  p.q_stride_seq = q.stride(0), p.q_stride_head = q.stride(1);
  p.out_stride_seq = out.stride(0), p.out_stride_head = out.stride(1);
  p.k_stride_block = k_cache.stride(0), p.k_stride_slot = k_cache.stride(1);
  p.k_stride_head = k_cache.stride(2);
  p.v_stride_block = v_cache.stride(0), p.v_stride_slot = v_cache.stride(1);
  p.v_stride_head = v_cache.stride(2);
  p.block_tables_stride = block_tables.stride(0);
  p.num_seqs = (int)num_seqs, p.num_heads = (int)num_heads, p.num_kv_heads = (int)num_kv_heads;
  p.head_dim = (int)head_dim, p.block_size = (int)block_size;
  p.max_splits = (int)max_splits, p.min_chunk = (int)min_chunk;
  p.early_kv = early_kv ? 1 : 0;
  p.warps = (int)warps;
  p.scale = (float)scale;
  p.dtype = dtype == at::kHalf ? NANOPD_FP16 : NANOPD_BF16;
  const c10::cuda::CUDAGuard guard(device);
  c.launch(nanopd_paged_decode(&p, at::cuda::getCurrentCUDAStream()), "paged_decode");
  return c.error();
}

std::string store_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache,
                     at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  Checks c;
  const at::Device device = k_cache.device();
  for (auto [t, name] : {Named{&key, "key"}, {&value, "value"}, {&k_cache, "k_cache"},
                         {&v_cache, "v_cache"}, {&slot_mapping, "slot_mapping"}}) {
    if (!c.on_device(*t, name, device)) return c.error();
  }
  c.require(key.dim() == 3 && value.sizes() == key.sizes(),
            "key and value must be [num_tokens, num_kv_heads, head_dim] of one shape");
  if (c.failed()) return c.error();
  c.require(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() &&
                k_cache.size(2) == key.size(1) && k_cache.size(3) == key.size(2),
            "caches must be [num_blocks, block_size, num_kv_heads, head_dim] matching key");
  c.require(key.scalar_type() == k_cache.scalar_type() &&
                value.scalar_type() == k_cache.scalar_type() &&
                v_cache.scalar_type() == k_cache.scalar_type(),
            "key, value and the caches must share one dtype");
  c.require(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                slot_mapping.size(0) == key.size(0) && slot_mapping.is_contiguous(),
            "slot_mapping must be contiguous int64 [num_tokens]");
  if (c.failed()) return c.error();
  for (auto [t, name] : {Named{&key, "key"}, {&value, "value"}, {&k_cache, "k_cache"},
                         {&v_cache, "v_cache"}}) {
    c.rows16(*t, name);
  }
  if (c.failed()) return c.error();
  StoreKvParams p{};
  p.key = key.data_ptr(), p.value = value.data_ptr();
  p.k_cache = k_cache.data_ptr(), p.v_cache = v_cache.data_ptr();
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.key_stride_token = key.stride(0), p.key_stride_head = key.stride(1);
  p.value_stride_token = value.stride(0), p.value_stride_head = value.stride(1);
  p.k_stride_block = k_cache.stride(0), p.k_stride_slot = k_cache.stride(1);
  p.k_stride_head = k_cache.stride(2);
  p.v_stride_block = v_cache.stride(0), p.v_stride_slot = v_cache.stride(1);
  p.v_stride_head = v_cache.stride(2);
  p.num_tokens = (int)key.size(0), p.num_kv_heads = (int)key.size(1);
  p.head_dim = (int)key.size(2), p.block_size = (int)k_cache.size(1);
  p.elem_nbytes = (int)key.element_size();
  const c10::cuda::CUDAGuard guard(device);
  c.launch(nanopd_store_kv(&p, at::cuda::getCurrentCUDAStream()), "store_kv");
  return c.error();
}

std::string copy_blocks(const at::Tensor& src_pool, at::Tensor& dst_pool,
                        const at::Tensor& src_ids, const at::Tensor& dst_ids) {
  Checks c;
  const at::Device device = dst_pool.device();
  for (auto [t, name] : {Named{&dst_pool, "dst_pool"}, {&src_ids, "src_ids"},
                         {&dst_ids, "dst_ids"}}) {
    if (!c.on_device(*t, name, device)) return c.error();
  }
  c.require(src_pool.is_cuda(), "src_pool must be a CUDA tensor; it is on ", src_pool.device());
  c.require(src_pool.dim() == 6 && dst_pool.dim() == 6,
            "pools must be [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]");
  c.require(src_pool.scalar_type() == dst_pool.scalar_type(), "pools differ in dtype");
  if (c.failed()) return c.error();
  for (int64_t i : {0, 1, 3, 4, 5}) {
    c.require(src_pool.size(i) == dst_pool.size(i), "pools differ in dimension ", i, ": ",
              src_pool.sizes(), " vs ", dst_pool.sizes());
  }
  for (auto [t, name] : {Named{&src_pool, "src_pool"}, {&dst_pool, "dst_pool"}}) {
    c.require(t->stride(5) == 1 && t->stride(4) == t->size(5) &&
                  t->stride(3) == t->size(4) * t->size(5),
              name, ": each block of a layer's K or V must be contiguous");
    c.rows16(*t, name);
  }
  c.require(src_ids.scalar_type() == at::kLong && dst_ids.scalar_type() == at::kLong &&
                src_ids.dim() == 1 && src_ids.sizes() == dst_ids.sizes() &&
                src_ids.is_contiguous() && dst_ids.is_contiguous(),
            "src_ids and dst_ids must be contiguous int64 [num_pairs] of one length");
  if (c.failed()) return c.error();
  if (src_pool.device() != device &&
      !c.require(at::cuda::get_p2p_access(device.index(), src_pool.device().index()), "GPU ",
                 device.index(), " cannot read GPU ", src_pool.device().index(),
                 "'s memory (no peer access); copy through the host instead")) {
    return c.error();
  }
  const int64_t es = src_pool.element_size();
  CopyBlocksParams p{};
  p.src = src_pool.data_ptr(), p.dst = dst_pool.data_ptr();
  p.src_ids = src_ids.data_ptr<int64_t>(), p.dst_ids = dst_ids.data_ptr<int64_t>();
  p.src_stride_layer_nbytes = src_pool.stride(0) * es;
  p.src_stride_kv_nbytes = src_pool.stride(1) * es;
  p.src_stride_block_nbytes = src_pool.stride(2) * es;
  p.dst_stride_layer_nbytes = dst_pool.stride(0) * es;
  p.dst_stride_kv_nbytes = dst_pool.stride(1) * es;
  p.dst_stride_block_nbytes = dst_pool.stride(2) * es;
  p.block_nbytes = src_pool.size(3) * src_pool.size(4) * src_pool.size(5) * es;
  p.num_pairs = (int)src_ids.size(0), p.num_layers = (int)src_pool.size(0);
  const c10::cuda::CUDAGuard guard(device);
  c.launch(nanopd_copy_blocks(&p, at::cuda::getCurrentCUDAStream()), "copy_blocks");
  return c.error();
}

}  // namespace

void add_fused_bindings(pybind11::module_& m);  // fused_bindings.cpp
void add_gemv_bindings(pybind11::module_& m);   // gemv_bindings.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "nanopd CUDA kernels (csrc/); call them through services/worker/ops/cuda_ops.py";
  m.def("paged_decode", &paged_decode, "decode attention over the paged KV cache");
  m.def("paged_decode_smem_nbytes", &nanopd_paged_decode_smem_nbytes,
        "shared memory of one paged_decode block in this build (0: no such kernel)");
  m.def("store_kv", &store_kv, "write new K/V rows into their cache slots");
  m.def("copy_blocks", &copy_blocks, "copy whole KV blocks (all layers, K and V) between pools");
  add_fused_bindings(m);
  add_gemv_bindings(m);
}
