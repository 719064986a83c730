// Kernel launches with programmatic dependent launch (PDL, sm_90+), host side.
//
// A decode step is a chain of short kernels, each of which would otherwise start only once the
// one before has finished and its launch has gone through (~1-2 us a boundary inside a CUDA
// graph, by bench/decode_profile.py). Launched with PDL, a kernel's blocks may start while the
// previous kernel still runs: each of our kernels first does what needs nothing of its
// predecessor (index loads, weight prefetches; device_utils.cuh `pdl_wait`), then waits for the
// predecessor's completion and memory (`griddepcontrol.wait`) before it reads anything the
// predecessor wrote, and writes nothing before that wait. It lets its own successor launch
// early with `pdl_launch_dependents`. Without the attribute (older GPUs, NANOPD_PDL=0, or a
// launch that follows a kernel of torch's) both are no-ops and launches serialize as usual.
// CUDA graphs capture the programmatic edges.
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>

namespace nanopd {

// PDL for launches on the current device: compute capability 9.0 or later and NANOPD_PDL not
// "0" (read once per process).
inline bool pdl_allowed() {
  static const bool env_on = [] {
    const char* v = std::getenv("NANOPD_PDL");
    return v == nullptr || v[0] != '0';
  }();
  if (!env_on) return false;
  constexpr int kMaxDevices = 64;
  static int major[kMaxDevices] = {};  // 0: not asked yet (a race only asks twice)
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) return false;
  if (major[device] == 0 &&
      cudaDeviceGetAttribute(&major[device], cudaDevAttrComputeCapabilityMajor, device) !=
          cudaSuccess) {
    return false;
  }
  return major[device] >= 9;
}

// kernel<<<grid, block, smem_nbytes, stream>>>(args...), with PDL where allowed.
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_nbytes,
                          cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid, config.blockDim = block;
  config.dynamicSmemBytes = smem_nbytes, config.stream = stream;
  cudaLaunchAttribute attribute[1];
  if (pdl_allowed()) {
    attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[0].val.programmaticStreamSerializationAllowed = 1;
    config.attrs = attribute, config.numAttrs = 1;
  }
  const cudaError_t err = cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
  return err != cudaSuccess ? err : cudaGetLastError();
}

}  // namespace nanopd
