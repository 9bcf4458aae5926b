// The cluster sampler with CTAs of 512 threads (sample_cluster.cuh): its own translation unit, so
// that the two instantiations compile in parallel (the dispatch is in sample_dispatch.cu).
#include "sampling/generic/sample_cluster.cuh"

namespace nmoe::sampling {

const char* cluster_launch_512(const SampleParams& p, int ranks, int chunk, cudaStream_t stream, bool& unavailable) {
  return cluster::launch<512>(p, ranks, chunk, stream, unavailable);
}

}  // namespace nmoe::sampling
