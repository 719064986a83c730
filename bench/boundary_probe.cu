// What a kernel boundary costs inside a CUDA graph, by how the next kernel learns that its
// input is ready (bench/results/README.md, "tenth round"). A chain of STAGES small kernels, each of G
// blocks: every block reads the whole 1536-float vector its predecessor wrote, reduces it, and
// writes its own 8 floats of the next vector. Modes:
//   plain  no programmatic dependent launch: each kernel starts when the one before has ended
//   pdl    PDL: griddepcontrol.wait, then launch_dependents (what csrc/ does now)
//   flag   PDL launch, but no griddepcontrol.wait: block 0's thread 0 of each block spins on
//          the predecessor's counter (ld.acquire.gpu) until all its G blocks have counted
//          (red.release.gpu after their writes); then launch_dependents
// Every spin gives up after 2^24 polls (seconds) and marks an error: a wait has a timeout.
//   nvcc -arch=sm_90 -O3 -o /tmp/boundary_probe bench/boundary_probe.cu && /tmp/boundary_probe
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

namespace {

constexpr int kVec = 1536, kThreads = 256, kStages = 140, kReplays = 200;

struct Args {
  const float* in;
  float* out;
  const int* wait_on;  // the predecessor's counter (flag mode), or null
  int wait_count;      // its blocks
  int* signal;         // this kernel's counter (flag mode), or null
  int mode;            // 0 plain, 1 pdl, 2 flag
  int* error;
};

__device__ int ld_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__global__ void __launch_bounds__(kThreads) stage(const Args a) {
  if (a.mode == 1) {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  } else if (a.mode == 2) {
    if (a.wait_on != nullptr && threadIdx.x == 0) {
      long long spins = 0;
      while (ld_acquire(a.wait_on) < a.wait_count) {
        if (++spins > (1 << 24)) {
          atomicExch(a.error, 1);
          break;
        }
      }
    }
    __syncthreads();
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  }
  float s = 0.f;
  for (int i = threadIdx.x; i < kVec; i += kThreads) s += __ldcg(a.in + i);
  for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
  __shared__ float part[kThreads / 32];
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x < 8) {
    float t = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) t += part[w];
    a.out[(blockIdx.x * 8 + threadIdx.x) % kVec] = t * 1e-3f + 1.f;
  }
  if (a.signal != nullptr) {
    __syncthreads();
    if (threadIdx.x == 0) {
      asm volatile("red.release.gpu.global.add.s32 [%0], 1;" :: "l"(a.signal) : "memory");
    }
  }
}

#define CHECK(x)                                                                  \
  do {                                                                            \
    cudaError_t e_ = (x);                                                         \
    if (e_ != cudaSuccess) {                                                      \
      std::fprintf(stderr, "%s: %s (line %d)\n", #x, cudaGetErrorString(e_), __LINE__); \
      std::exit(1);                                                               \
    }                                                                             \
  } while (0)

// microseconds per kernel of a graph of kStages kernels of `blocks` blocks in `mode`
float time_chain(int mode, int blocks, float* bufs, int* counters, int* error) {
  cudaStream_t stream;
  CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraph_t graph;
  CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  CHECK(cudaMemsetAsync(counters, 0, sizeof(int) * kStages, stream));
  for (int s = 0; s < kStages; ++s) {
    Args a{bufs + s * kVec, bufs + (s + 1) * kVec, nullptr, 0, nullptr, mode, error};
    if (mode == 2) {
      a.wait_on = s > 0 ? counters + s - 1 : nullptr;
      a.wait_count = blocks;
      a.signal = counters + s;
    }
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(blocks), config.blockDim = dim3(kThreads), config.stream = stream;
    cudaLaunchAttribute attribute[1];
    if (mode != 0 && s > 0) {  // the first follows the memset: an ordinary launch
      attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attribute[0].val.programmaticStreamSerializationAllowed = 1;
      config.attrs = attribute, config.numAttrs = 1;
    }
    CHECK(cudaLaunchKernelEx(&config, stage, a));
  }
  CHECK(cudaStreamEndCapture(stream, &graph));
  cudaGraphExec_t exec;
  CHECK(cudaGraphInstantiate(&exec, graph, 0));
  for (int i = 0; i < 20; ++i) CHECK(cudaGraphLaunch(exec, stream));
  cudaEvent_t t0, t1;
  CHECK(cudaEventCreate(&t0));
  CHECK(cudaEventCreate(&t1));
  CHECK(cudaEventRecord(t0, stream));
  for (int i = 0; i < kReplays; ++i) CHECK(cudaGraphLaunch(exec, stream));
  CHECK(cudaEventRecord(t1, stream));
  CHECK(cudaStreamSynchronize(stream));
  float ms = 0.f;
  CHECK(cudaEventElapsedTime(&ms, t0, t1));
  CHECK(cudaGraphExecDestroy(exec));
  CHECK(cudaGraphDestroy(graph));
  CHECK(cudaStreamDestroy(stream));
  return ms * 1e3f / (kReplays * kStages);
}

}  // namespace

int main() {
  float* bufs;
  int *counters, *error;
  CHECK(cudaMalloc(&bufs, sizeof(float) * kVec * (kStages + 1)));
  CHECK(cudaMemset(bufs, 0, sizeof(float) * kVec * (kStages + 1)));
  CHECK(cudaMalloc(&counters, sizeof(int) * kStages));
  CHECK(cudaMalloc(&error, sizeof(int)));
  CHECK(cudaMemset(error, 0, sizeof(int)));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("{\"device\": \"%s\", \"sms\": %d, \"stages\": %d, \"us_per_kernel\": {",
              prop.name, prop.multiProcessorCount, kStages);
  const char* names[3] = {"plain", "pdl", "flag"};
  const int sizes[4] = {8, 132, 192, 264};
  static float ref[4][kVec], got[kVec];
  int mismatches = 0;  // the last vector of each chain against the plain chain's
  for (int m = 0; m < 3; ++m) {
    std::printf("%s\"%s\": {", m ? ", " : "", names[m]);
    for (int b = 0; b < 4; ++b) {
      const float us = time_chain(m, sizes[b], bufs, counters, error);
      std::printf("%s\"%d\": %.3f", b ? ", " : "", sizes[b], us);
      float* dst = m == 0 ? ref[b] : got;
      CHECK(cudaMemcpy(dst, bufs + kStages * kVec, sizeof(float) * kVec,
                       cudaMemcpyDeviceToHost));
      for (int i = 0; m > 0 && i < kVec; ++i) mismatches += got[i] != ref[b][i];
      CHECK(cudaMemset(bufs, 0, sizeof(float) * kVec * (kStages + 1)));
    }
    std::printf("}");
  }
  std::printf(", \"mismatches\": %d", mismatches);
  int err = 0;
  CHECK(cudaMemcpy(&err, error, sizeof(int), cudaMemcpyDeviceToHost));
  std::printf("}, \"spin_timeouts\": %d}\n", err);
  return err || mismatches;
}
