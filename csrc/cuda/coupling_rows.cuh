// Device helpers shared by the version 2 kernels of both couplings (csrc/cuda/coupling_cuda.cu and
// affine_coupling_cuda.cu), which make one pass over a row.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

#include "cuda_utils.cuh"  // Pack (a path from this folder: the CUDA emulation rewrites both headers)

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

// The paper's odd/even masks, as the CPU kernels define them (csrc/cpu/index_maps.h): shift_col sends
// feature first + 2c to shift column c and every other feature to -1, over exactly `updated` columns, and
// gather_index is start, start + 2, ... over every feature of that parity (or empty). Then a pack of V
// features (V even, starting at an even feature) takes V / 2 consecutive shift columns and gives the next
// layer V / 2 consecutive inputs: a row needs neither index map, nor inverse_gather_map's table. The whole
// block reads both maps (from L2: every block reads the same few KB) and agrees on the answer; ends with a
// block barrier.
struct OddEvenMaps {
  int first;  // the first updated feature (0 or 1), or -1: not the odd/even maps
  int start;  // the first gathered feature (0 or 1; 0 when nothing is gathered), or -1
  __device__ bool found() const { return first >= 0 && start >= 0; }
};

__device__ inline OddEvenMaps find_odd_even_maps(const int32_t* __restrict__ shift_col,
                                                 const int32_t* __restrict__ gather_index, int64_t features,
                                                 int64_t updated, int64_t gathered_n) {
  // Bits of the patterns some entry breaks: 1 and 2 shift_col's with first 0 and 1, 4 and 8 gather_index's
  // with start 0 and 1.
  __shared__ int broken;
  if (threadIdx.x == 0) broken = 0;
  __syncthreads();
  int mine = 0;
  for (int64_t j = threadIdx.x; j < features; j += blockDim.x) {
    const int32_t c = shift_col[j], half = static_cast<int32_t>(j >> 1);
    mine |= (c != ((j & 1) == 0 ? half : -1) ? 1 : 0) | (c != ((j & 1) == 1 ? half : -1) ? 2 : 0);
  }
  for (int64_t k = threadIdx.x; k < gathered_n; k += blockDim.x) {
    const int32_t j = gather_index[k];
    mine |= (j != 2 * k ? 4 : 0) | (j != 2 * k + 1 ? 8 : 0);
  }
  if (mine != 0) atomicOr(&broken, mine);
  __syncthreads();
  const int bits = broken;
  OddEvenMaps maps{-1, -1};
  if (!(bits & 1) && updated == (features + 1) / 2) maps.first = 0;
  else if (!(bits & 2) && updated == features / 2) maps.first = 1;
  if (gathered_n == 0) maps.start = 0;
  else if (!(bits & 4) && gathered_n == (features + 1) / 2) maps.start = 0;
  else if (!(bits & 8) && gathered_n == features / 2) maps.start = 1;
  return maps;
}

// The elements of one parity (0: 0, 2, 4, ...; 1: 1, 3, 5, ...) of a pack of an even number V of
// consecutive features: with odd/even maps, the half pack of the next layer's inputs a pack gives.
template <typename T, int V>
__device__ inline Pack<T, V / 2> elements_of_parity(const Pack<T, V>& pack, int parity) {
  Pack<T, V / 2> half;
#pragma unroll
  for (int i = 0; i < V / 2; ++i) half.v[i] = parity == 0 ? pack.v[2 * i] : pack.v[2 * i + 1];
  return half;
}

// Whether every row of a (rows, length) tensor with this data pointer and row stride can be read in
// packs of `elements` elements (host side: the odd/even rows' half packs of shift and gathered).
template <typename scalar_t>
bool rows_in_packs_of(const void* data, int64_t row_stride, int64_t length, int elements) {
  return length % elements == 0 && row_stride % elements == 0 &&
         reinterpret_cast<uintptr_t>(data) % (sizeof(scalar_t) * elements) == 0;
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
