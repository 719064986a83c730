// Argument checks for the torch bindings, without exceptions and without iostreams.
//
// A binding returns its error as a string ("" on success) and the Python wrapper
// (services/worker/ops/cuda_ops.py) raises it. On the device (torch 2.11+cu130, the image's
// g++) a failed TORCH_CHECK killed the process with SIGSEGV (2026-11-28), and so did the first
// version of this file, which threw nothing but built its messages with std::ostringstream
// (2026-12-01): what the two share is iostream formatting inside the extension. So messages
// are plain string concatenation (std::to_string, c10::toString), and nothing here throws.
#pragma once

#include <torch/extension.h>

#include <string>
#include <type_traits>

namespace nanopd {

inline std::string text(const char* s) { return s; }
inline std::string text(const std::string& s) { return s; }
inline std::string text(at::ScalarType t) { return c10::toString(t); }
inline std::string text(const at::Device& d) {
  return d.is_cuda() ? "cuda:" + std::to_string(d.index()) : (d.is_cpu() ? "cpu" : "other");
}
inline std::string text(c10::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}
template <typename N, typename = std::enable_if_t<std::is_arithmetic_v<N>>>
std::string text(N n) {
  return std::to_string(n);
}

class Checks {
 public:
  // Records the first failed requirement; returns `ok` so callers can stop early.
  template <typename... Parts>
  bool require(bool ok, const Parts&... parts) {
    if (!ok && error_.empty()) (error_ += ... += text(parts));
    return ok;
  }

  bool failed() const { return !error_.empty(); }
  const std::string& error() const { return error_; }

  bool on_device(const at::Tensor& t, const char* name, const at::Device& device) {
    return require(t.is_cuda(), name, " must be a CUDA tensor; it is on ", t.device()) &&
           require(t.device() == device, name, " is on ", t.device(), "; expected ", device);
  }

  // Rows (the last dimension) contiguous and every row 16-byte aligned: 16-byte loads.
  bool rows16(const at::Tensor& t, const char* name) {
    if (!require(t.dim() >= 1 && t.stride(-1) == 1, name,
                 " must be contiguous in its last dimension") ||
        !require(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name,
                 " must start 16-byte aligned")) {
      return false;
    }
    for (int64_t i = 0; i + 1 < t.dim(); ++i) {
      if (!require((t.stride(i) * t.element_size()) % 16 == 0 || t.size(i) == 1, name,
                   " stride ", i, " (", t.stride(i), " elements) is not a multiple of 16 bytes")) {
        return false;
      }
    }
    return true;
  }

  void launch(cudaError_t err, const char* what) {
    require(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err),
            err == cudaErrorInvalidValue ? " (unsupported arguments)" : "");
  }

 private:
  std::string error_;
};

}  // namespace nanopd
