// One configuration of the grouped FP8 GEMM (grouped_gemm.cuh), in its own translation unit so that
// the CUTLASS instantiations compile in parallel. Tile 128x128, cooperative, a 1x2 cluster whose
// two CTAs (neighbouring N tiles) share one TMA-multicast activation tile: the expert groups with
// more than 64 rows.
#include "fp8/sm90/grouped_gemm.cuh"

NMOE_FP8_DEFINE_GEMM_CONFIG(n128x128c12, 128, 128, false, 1, 2, false)
