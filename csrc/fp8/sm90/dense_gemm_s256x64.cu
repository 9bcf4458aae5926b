// One configuration of the dense decode FP8 GEMM (dense_gemm.cuh), in its own translation unit so
// that the CUTLASS instantiations compile in parallel: 256 weight rows x 64 tokens per tile.
#include "fp8/sm90/dense_gemm.cuh"

NMOE_FP8_DEFINE_DENSE_CONFIG(s256x64, 64)
