// Device helpers shared by the version 2 kernels of both couplings (csrc/cuda/coupling_cuda.cu and
// affine_coupling_cuda.cu), which make one pass over a row.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace nice_ext {

// slot[j] = k where gather_index[k] = j, else -1, for every feature j. Returns whether gather_index
// names a feature twice (slot then keeps the largest of its k): the forward allows it, and then
// recomputes the gathered copy in a second pass; the backward's schema forbids it (a device assert).
// Ends with a block barrier.
__device__ inline bool inverse_gather_map(const int32_t* __restrict__ gather_index, int64_t gathered_n,
                                          int64_t features, int32_t* slot) {
  __shared__ int repeats;
  if (threadIdx.x == 0) repeats = 0;
  for (int64_t j = threadIdx.x; j < features; j += blockDim.x) slot[j] = -1;
  __syncthreads();
  for (int64_t k = threadIdx.x; k < gathered_n; k += blockDim.x) {
    const int32_t j = gather_index[k];
    CUDA_KERNEL_ASSERT(j >= 0 && j < features && "gather_index out of range");
    // atomicMax, not a store: two threads writing one slot (a repeated feature) would be a data race
    // (compute-sanitizer's racecheck reports it), and the kept k would depend on the schedule.
    atomicMax(&slot[j], static_cast<int32_t>(k));
  }
  __syncthreads();
  for (int64_t k = threadIdx.x; k < gathered_n; k += blockDim.x) {
    if (slot[gather_index[k]] != k) atomicOr(&repeats, 1);  // another k took its feature's slot
  }
  __syncthreads();
  return repeats != 0;
}

// The backward kernels' table: inverse_gather_map in the block's shared memory (table), where a feature
// gathered twice is an error. The gradients of its two columns would need adding up: the schema forbids
// it and the CPU kernels refuse it, so stop here (a device assert) rather than drop one of them.
__device__ inline const int32_t* backward_gather_slots(const int32_t* __restrict__ gather_index, int64_t gathered_n,
                                                       int64_t features, unsigned char* table) {
  int32_t* slot = reinterpret_cast<int32_t*>(table);
  const bool repeats = inverse_gather_map(gather_index, gathered_n, features, slot);
  CUDA_KERNEL_ASSERT(!repeats && "gather_index names a feature twice");
  (void)repeats;  // unused where device asserts are compiled out
  return slot;
}

}  // namespace nice_ext
