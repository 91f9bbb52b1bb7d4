// Small helpers shared by the CUDA kernels of nice_ext.
#pragma once

#include <ATen/cuda/CUDAContext.h>

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
