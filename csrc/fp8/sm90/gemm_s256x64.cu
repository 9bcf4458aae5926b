// One configuration of the grouped FP8 GEMM (grouped_gemm.cuh), in its own translation unit so that
// the CUTLASS instantiations compile in parallel. Swapped (D^T = W X^T): 256 weight rows x 64
// tokens per tile, cooperative (each warpgroup 128 weight rows): up to 64 rows per group.
#include "fp8/sm90/grouped_gemm.cuh"

NMOE_FP8_DEFINE_GEMM_CONFIG(s256x64, 256, 64, false, 1, 1, true)
