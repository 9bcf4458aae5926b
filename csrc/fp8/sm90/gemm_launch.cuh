// Launching nmoe's CUTLASS GEMMs with programmatic dependent launch (csrc/pdl.cuh).
//
// CUTLASS 4.2's sm90 GEMM kernels place their own griddepcontrol instructions (compiled in only
// with CUTLASS_ENABLE_GDC_FOR_SM90, defined below): the producer warps wait before their TMA loads,
// the consumers trigger the next grid once their main loop is done. But in the blockwise-scaled
// kernels the warp that loads the scales (MainloopAux) does not wait, so under PDL it could read
// the activation scales before the quant kernel before it has written them. So the GEMM runs
// inside gemm_after_previous_grid, which waits in every thread first, as pdl_enter does in
// nmoe's own kernels; CUTLASS's later waits then return at once. What is gained: the GEMM's CTAs
// are resident and past their launch when the previous kernel ends, and the kernel after the GEMM
// is scheduled during its epilogue (CUTLASS's trigger), not after its last CTA has exited.
#pragma once

#ifndef CUTLASS_ENABLE_GDC_FOR_SM90
#define CUTLASS_ENABLE_GDC_FOR_SM90 1
#endif

#include <cuda_runtime.h>

#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/device_kernel.h>  // CUTLASS_GRID_CONSTANT

#include "pdl.cuh"

namespace nmoe::fp8::sm90 {

// No prologue: the plain GEMMs.
struct NoPrologue {
  __device__ void operator()() const {}
};

// `prologue()` runs in every thread of every CTA after the wait and before the GEMM (a
// __syncthreads between): the grouped GEMMs write their per-group arrays there (grouped_gemm.cuh).
template <class Kernel, class Prologue>
__global__ void __launch_bounds__(Kernel::MaxThreadsPerBlock, Kernel::MinBlocksPerMultiprocessor)
    gemm_after_previous_grid(CUTLASS_GRID_CONSTANT typename Kernel::Params const params,
                             CUTLASS_GRID_CONSTANT Prologue const prologue) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");  // every warp, the scale loader included
#endif
  if constexpr (!std::is_same_v<Prologue, NoPrologue>) {
    prologue();
    __syncthreads();  // the CTA's writes are visible to all its threads (and it reads only its own)
  }
  extern __shared__ char smem[];
  Kernel op;
  op(params, smem);
}

// Launches the kernel of an initialized GemmUniversalAdapter on `stream` (the cluster shape of its
// dispatch policy; the PDL attribute unless NMOE_PDL=0). nullptr, or what failed.
template <class Gemm, class Prologue = NoPrologue>
const char* launch_gemm(const Gemm& gemm, cudaStream_t stream, const Prologue& prologue = {}) {
  using Kernel = typename Gemm::GemmKernel;
  using Cluster = typename Kernel::DispatchPolicy::ClusterShape;
  using Params = typename Kernel::Params;
  void (*kernel)(Params, Prologue) = gemm_after_previous_grid<Kernel, Prologue>;
  constexpr int smem = Kernel::SharedStorageSize;
  static const cudaError_t configured =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (configured != cudaSuccess) return "fp8 gemm: setting the kernel's shared memory size failed";

  cudaLaunchAttribute attr[2];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cute::size<0>(Cluster{});
  attr[0].val.clusterDim.y = cute::size<1>(Cluster{});
  attr[0].val.clusterDim.z = cute::size<2>(Cluster{});
  attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[1].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  Params params = gemm.params();  // a mutable copy: cudaLaunchKernelEx takes the arguments' addresses
  config.gridDim = Kernel::get_grid_shape(params);
  config.blockDim = Kernel::get_block_shape();
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = pdl_enabled() ? 2 : 1;
  const cudaError_t launched = cudaLaunchKernelEx(&config, kernel, params, prologue);
  return launched == cudaSuccess ? nullptr : "fp8 gemm: CUTLASS kernel launch failed";
}

}  // namespace nmoe::fp8::sm90
