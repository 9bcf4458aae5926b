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

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/device_kernel.h>  // CUTLASS_GRID_CONSTANT

#include "pdl.cuh"

namespace nmoe::fp8::sm90 {

template <class Kernel>
__global__ void __launch_bounds__(Kernel::MaxThreadsPerBlock, Kernel::MinBlocksPerMultiprocessor)
    gemm_after_previous_grid(CUTLASS_GRID_CONSTANT typename Kernel::Params const params) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");  // every warp, the scale loader included
#endif
  extern __shared__ char smem[];
  Kernel op;
  op(params, smem);
}

// Launches the kernel of an initialized GemmUniversalAdapter on `stream` (the cluster shape of its
// dispatch policy; the PDL attribute unless NMOE_PDL=0). nullptr, or what failed.
template <class Gemm>
const char* launch_gemm(const Gemm& gemm, cudaStream_t stream) {
  using Kernel = typename Gemm::GemmKernel;
  using Cluster = typename Kernel::DispatchPolicy::ClusterShape;
  using Params = typename Kernel::Params;
  void (*kernel)(Params) = gemm_after_previous_grid<Kernel>;
  constexpr int smem = Kernel::SharedStorageSize;
  static const cudaError_t configured =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (configured != cudaSuccess) return "fp8 gemm: setting the kernel's shared memory size failed";

  const Params params = gemm.params();
  const dim3 cluster(cute::size<0>(Cluster{}), cute::size<1>(Cluster{}), cute::size<2>(Cluster{}));
  const cudaError_t launched = launch_pdl_clusters(kernel, Kernel::get_grid_shape(params), cluster,
                                                   Kernel::get_block_shape(), smem, stream, params);
  return launched == cudaSuccess ? nullptr : "fp8 gemm: CUTLASS kernel launch failed";
}

}  // namespace nmoe::fp8::sm90
