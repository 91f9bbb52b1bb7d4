// Small helpers shared by the CUDA kernels of nice_ext.
#pragma once

#include <ATen/cuda/CUDAContext.h>

#include <cstdint>
#include <type_traits>

namespace nice_ext {

// Enough resident blocks to fill the device (blocks_per_sm per multiprocessor), never more than needed.
inline int64_t grid_for(int64_t work_items, int blocks_per_sm) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>(work_items, sms * blocks_per_sm));
}

// The launchers report errors instead of throwing (see nice_ext.h): nullptr, or the CUDA error's text.
inline const char* launch_error() {
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

// ---------------------------------------------------------------------------------------------------
// Version 2 row kernels (benchmarks/NOTES.md): a warp per row, kWarpsPerBlock rows per block, and each
// lane moving Pack<T, V> (V consecutive elements, 16 bytes when V = kVectorBytes / sizeof(T)) per access.
// ---------------------------------------------------------------------------------------------------
constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kRowBlockThreads = kWarpSize * kWarpsPerBlock;
constexpr int kVectorBytes = 16;

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Whether the pointer is a multiple of bytes (the size of the packs it is to be read in).
inline bool aligned_to(const void* pointer, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(pointer) % static_cast<uintptr_t>(bytes) == 0;
}

// The widest pack (in elements of scalar_t) every row of a (batch, row_length) tensor can be read in:
// kVectorBytes / sizeof(scalar_t) when the row length, the row stride and the data pointer all allow it,
// else 1 (odd lengths, slices at odd offsets).
template <typename scalar_t>
int row_pack_width(const void* data, int64_t row_stride, int64_t row_length) {
  constexpr int wide = kVectorBytes / sizeof(scalar_t);
  const bool fits = row_length % wide == 0 && row_stride % wide == 0 && aligned_to(data, kVectorBytes);
  return fits ? wide : 1;
}

// Whether every row of a (batch, row_length) tensor can be read in packs of 16 bytes. (TensorLike is
// at::Tensor; a template parameter keeps this header free of ATen's tensor headers, for the emulation's
// selftest.)
template <typename scalar_t, typename TensorLike>
bool rows_aligned_for_packs(const TensorLike& t) {
  constexpr int wide = kVectorBytes / sizeof(scalar_t);
  return row_pack_width<scalar_t>(t.const_data_ptr(), t.stride(0), t.size(1)) == wide;
}

// Calls launch(std::integral_constant<int, V>()) with V = width, which row_pack_width (and any other
// alignment the kernel needs) chose: the pack width as a template argument.
template <typename scalar_t, typename F>
void with_pack_width(int width, F&& launch) {
  constexpr int wide = kVectorBytes / sizeof(scalar_t);
  if (width == wide) {
    launch(std::integral_constant<int, wide>());
  } else {
    launch(std::integral_constant<int, 1>());
  }
}

// For kernels that sum over a row, whose order must not depend on the layout: calls
// launch(std::integral_constant<int, V>(), std::bool_constant<kAligned>()) with rows cut into packs of
// V = kVectorBytes / sizeof(scalar_t) elements whenever V divides row_length (else 1), each read in one
// access where the caller found its inputs aligned for it (kAligned), else an element at a time
// (load_pack). The packs a lane takes are the same either way.
template <typename scalar_t, typename F>
void with_row_packs(int64_t row_length, bool aligned, F&& launch) {
  constexpr int wide = kVectorBytes / sizeof(scalar_t);
  if (row_length % wide != 0) {
    launch(std::integral_constant<int, 1>(), std::true_type());  // one element is always aligned
  } else if (aligned) {
    launch(std::integral_constant<int, wide>(), std::true_type());
  } else {
    launch(std::integral_constant<int, wide>(), std::false_type());
  }
}

// Pack p of a row (its elements p * V to p * V + V - 1): one access where the row is aligned for packs
// (kAligned), else V accesses of an element. Which elements a lane takes, and so the order of any sum
// over them, is the same either way.
template <int V, bool kAligned, typename T>
__device__ inline Pack<T, V> load_pack(const T* __restrict__ row, int64_t p) {
  if constexpr (kAligned) {
    return reinterpret_cast<const Pack<T, V>*>(row)[p];
  } else {
    Pack<T, V> values;
#pragma unroll
    for (int e = 0; e < V; ++e) values.v[e] = row[p * V + e];
    return values;
  }
}

// A table with an entry per feature that a version 2 block keeps in shared memory (the scaling's
// exp(log_scale), the coupling backward's inverse gather map) takes at most this much; wider rows run
// version 1. 32 KiB leaves room for 5 such blocks per multiprocessor with L1 to spare.
constexpr int64_t kMaxFeatureTableBytes = 32 * 1024;

inline bool feature_table_fits(int64_t features, size_t entry_bytes) {
  return features * int64_t(entry_bytes) <= kMaxFeatureTableBytes;
}

// A grid of blocks with kWarpsPerBlock rows each (grid-stride over the rows beyond it).
inline int64_t row_blocks(int64_t batch) {
  return grid_for((batch + kWarpsPerBlock - 1) / kWarpsPerBlock, 2048 / kRowBlockThreads);
}

// The rows a warp walks in a version 2 kernel: for (b = warp_first_row(); b < batch; b += warp_row_step()).
__device__ inline int64_t warp_first_row() { return blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / kWarpSize; }
__device__ inline int64_t warp_row_step() { return int64_t(gridDim.x) * kWarpsPerBlock; }

// Sum over a warp: the result is valid in every lane.
template <typename T>
__device__ inline T warp_sum(T value) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// Sum over a block (blockDim.x a multiple of 32, at most 1024). The result is valid in thread 0.
template <typename T>
__device__ inline T block_sum(T value) {
  __shared__ T warp_sums[32];
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  const int warps = blockDim.x >> 5;
  value = (threadIdx.x < warps) ? warp_sums[lane] : T(0);
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  __syncthreads();  // warp_sums may be reused by the caller's next call
  return value;
}

}  // namespace nice_ext
