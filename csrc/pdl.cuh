// Programmatic dependent launch (sm90+): a kernel launched with launch_pdl may be scheduled while
// the kernel before it on the stream is still running, so its launch and prologue overlap that
// kernel's tail instead of following it. A decode step is some 2000 short kernels in a row, each
// a few microseconds, where that gap is a large part of the time.
//
// The contract: every kernel launched with launch_pdl calls pdl_enter() before anything else, or
// at least before it reads anything an earlier kernel may write and before it writes global
// memory (the MLA absorption kernels fetch their weights first, which no kernel writes).
// griddepcontrol.wait blocks until the previous grid has completed and its writes are visible, so
// nothing after it can read stale inputs or overwrite memory the previous kernel still reads; then
// launch_dependents lets the next kernel be scheduled (it waits in its own pdl_enter). Both
// instructions are no-ops in a kernel launched without the attribute. NMOE_PDL=0 in the
// environment turns the attribute off (read once per process), for an A/B run.
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <utility>

namespace nmoe {

__device__ __forceinline__ void pdl_enter() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

inline bool pdl_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("NMOE_PDL");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return enabled;
}

// kernel<<<grid, block, smem, stream>>>(args...) with the programmatic-serialization attribute, as
// thread-block clusters of `cluster` CTAs when that is more than one.
template <typename... KernelArgs, typename... Args>
cudaError_t launch_pdl_clusters(void (*kernel)(KernelArgs...), dim3 grid, dim3 cluster, dim3 block, size_t smem,
                                cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attr[2];
  unsigned n = 0;
  if (pdl_enabled()) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cluster.x * cluster.y * cluster.z > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = cluster.x;
    attr[n].val.clusterDim.y = cluster.y;
    attr[n++].val.clusterDim.z = cluster.z;
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = n;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

template <typename... KernelArgs, typename... Args>
cudaError_t launch_pdl(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                       Args&&... args) {
  return launch_pdl_clusters(kernel, grid, dim3(1, 1, 1), block, smem, stream, std::forward<Args>(args)...);
}

}  // namespace nmoe
