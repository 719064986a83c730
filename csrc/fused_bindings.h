// What fused_bindings.cpp shares with the other bindings: the checks of a rotary + KV-store
// call's tensors, which the GEMV with the rotation in its epilogue takes too
// (gemv_bindings.cpp).
#pragma once

#include <torch/extension.h>

#include <string>

#include "binding_checks.h"
#include "fused_kernels.h"

namespace nanopd {

// Checks qkv [num_tokens, (H + 2 KVH) D], positions, cos/sin, the q/k norm weights (both
// empty: none), the caches and slot_mapping as rotary_store_kv takes them; fills p. Returns
// "" or the error (also in c).
std::string check_rotary(Checks& c, RotaryStoreKvParams& p, at::Tensor& qkv,
                         const at::Tensor& positions, const at::Tensor& cos,
                         const at::Tensor& sin, const at::Tensor& q_norm_weight,
                         const at::Tensor& k_norm_weight, double eps, at::Tensor& k_cache,
                         at::Tensor& v_cache, const at::Tensor& slot_mapping, int64_t num_heads,
                         int64_t num_kv_heads, int64_t head_dim);

}  // namespace nanopd
