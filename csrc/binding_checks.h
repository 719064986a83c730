// Argument checks for the torch bindings, without exceptions.
//
// A binding returns its error as a string ("" on success) and the Python wrapper
// (services/worker/ops/cuda_ops.py) raises it. Nothing here throws: on the device
// (2026-11-28) a failed TORCH_CHECK, i.e. a C++ exception leaving this extension, killed the
// whole process with SIGSEGV instead of raising, and a worker must survive a bad argument.
#pragma once

#include <torch/extension.h>

#include <sstream>
#include <string>

namespace nanopd {

class Checks {
 public:
  // Records the first failed requirement; returns `ok` so callers can stop early.
  template <typename... Parts>
  bool require(bool ok, const Parts&... parts) {
    if (!ok && error_.empty()) {
      std::ostringstream s;
      (s << ... << parts);
      error_ = s.str();
    }
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
