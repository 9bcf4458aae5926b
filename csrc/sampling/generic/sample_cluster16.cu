// The cluster sampler with CTAs of 256 threads (sample_cluster.cuh): its own translation unit, so
// that the two instantiations compile in parallel.
#include "sampling/generic/sample_cluster.cuh"

namespace nmoe::sampling {

const char* cluster_launch_256(const SampleParams& p, int ranks, int chunk, cudaStream_t stream, bool& unavailable) {
  return cluster::launch<256>(p, ranks, chunk, stream, unavailable);
}

}  // namespace nmoe::sampling
