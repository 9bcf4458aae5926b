// One configuration of the grouped FP8 GEMM (grouped_gemm.cuh), in its own translation unit so that
// the CUTLASS instantiations compile in parallel. Swapped: 256 weight rows x 16 tokens per tile,
// cooperative: up to 16 rows per group.
#include "fp8/sm90/grouped_gemm.cuh"

NMOE_FP8_DEFINE_GEMM_CONFIG(s256x16, 256, 16, false, 1, 1, true)
