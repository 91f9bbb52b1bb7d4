// Checks of the CUDA emulation itself (tests/test_cuda_emulation.py runs each case in its own process):
// that it computes what CUDA computes, and that it shows the mistakes it promises to show.
//   selftest sums                 block_sum and warp_sum of csrc/cuda/cuda_utils.cuh, grid-stride rows
//   selftest missing-barrier      a read of another thread's shared-memory write with and without a barrier
//   selftest launch-errors        refused launch configurations set cudaGetLastError's error
//   selftest shared-poisoned      dynamic shared memory read before any write is NaN
//   selftest static-shared-poisoned
//                                 static shared memory too, in every block, after a launch that wrote it
//   selftest divergent-shuffle    lanes of one warp at different warp operations: aborts
//   selftest shuffle-returned     a shuffle reading a lane that has returned: aborts
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "cuda/cuda_utils.cuh"

using nice_ext::block_sum;
using nice_ext::kWarpSize;
using nice_ext::warp_sum;

namespace {

__global__ void sums_kernel(const float* values, int64_t rows, int64_t columns, float* block_sums,
                            float* warp_sums) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    float v = 0;
    for (int64_t c = threadIdx.x; c < columns; c += blockDim.x) v += values[r * columns + c];
    const float total = block_sum(v);
    if (threadIdx.x == 0) block_sums[r] = total;
    const float warp_total = warp_sum(float(threadIdx.x));
    if (threadIdx.x % kWarpSize == 0) warp_sums[r * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize] = warp_total;
  }
}

int sums() {
  const int64_t rows = 7, columns = 1000;  // 7 rows on 3 blocks: the grid-stride loop takes 3 turns
  std::vector<float> values(rows * columns), block_sums(rows), warp_sums(rows * 8);
  for (int64_t i = 0; i < rows * columns; ++i) values[i] = float(i % 97);
  sums_kernel<<<3, 256>>>(values.data(), rows, columns, block_sums.data(), warp_sums.data());
  int wrong = cudaGetLastError() != cudaSuccess;
  for (int64_t r = 0; r < rows; ++r) {
    double expected = 0;
    for (int64_t c = 0; c < columns; ++c) expected += values[r * columns + c];
    wrong += block_sums[r] != float(expected);
    for (int w = 0; w < 8; ++w) wrong += warp_sums[r * 8 + w] != float(32 * (32 * w) + 496);  // sum of 32w..32w+31
  }
  std::printf("sums: %d wrong\n", wrong);
  return wrong == 0 ? 0 : 1;
}

__global__ void neighbour_kernel(bool with_barrier, int launch, int* stale) {
  __shared__ int slot[256];
  slot[threadIdx.x] = launch * 1000 + int(threadIdx.x);
  if (with_barrier) __syncthreads();
  const int neighbour = slot[(threadIdx.x + 1) % blockDim.x];
  if (neighbour != launch * 1000 + int((threadIdx.x + 1) % blockDim.x)) ++*stale;  // one fiber at a time
}

int missing_barrier() {
  int stale_with = 0, stale_without = 0;
  neighbour_kernel<<<1, 256>>>(true, 1, &stale_with);
  neighbour_kernel<<<1, 256>>>(false, 2, &stale_without);
  std::printf("missing-barrier: %d stale reads with the barrier, %d without\n", stale_with, stale_without);
  return stale_with == 0 && stale_without > 0 ? 0 : 1;
}

__global__ void empty_kernel() {}

int launch_errors() {
  empty_kernel<<<1, 2048>>>();
  const cudaError_t too_many_threads = cudaGetLastError();
  empty_kernel<<<dim3(1, 70000), 32>>>();
  const cudaError_t grid_too_tall = cudaGetLastError();
  empty_kernel<<<1, 32, 64 * 1024>>>();
  const cudaError_t too_much_shared = cudaGetLastError();
  empty_kernel<<<1, 32>>>();
  const cudaError_t fine = cudaGetLastError();
  std::printf("launch-errors: %s; %s; %s; %s\n", cudaGetErrorString(too_many_threads),
              cudaGetErrorString(grid_too_tall), cudaGetErrorString(too_much_shared), cudaGetErrorString(fine));
  return too_many_threads == cudaErrorInvalidConfiguration && grid_too_tall == cudaErrorInvalidConfiguration &&
                 too_much_shared == cudaErrorInvalidValue && fine == cudaSuccess
             ? 0
             : 1;
}

__global__ void read_shared_kernel(float* out) {
  extern __shared__ float scratch[];
  if (threadIdx.x == 0) *out = scratch[5];
}

int shared_poisoned() {
  float out = 0;
  read_shared_kernel<<<1, 32, 64 * sizeof(float)>>>(&out);
  std::printf("shared-poisoned: %s\n", std::isnan(out) ? "NaN" : "a number");
  return std::isnan(out) ? 0 : 1;
}

__global__ void static_shared_kernel(bool write, float* out) {
  __shared__ float values[4];
  if (write && threadIdx.x < 4) values[threadIdx.x] = float(threadIdx.x);
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = values[1];
}

int static_shared_poisoned() {
  float written[2] = {0, 0}, unwritten[2] = {0, 0};
  static_shared_kernel<<<2, 32>>>(true, written);
  static_shared_kernel<<<2, 32>>>(false, unwritten);  // on a GPU: whatever shared memory held
  std::printf("static-shared-poisoned: written %g %g, then unwritten %g %g\n", written[0], written[1], unwritten[0],
              unwritten[1]);
  return written[0] == 1 && written[1] == 1 && std::isnan(unwritten[0]) && std::isnan(unwritten[1]) ? 0 : 1;
}

__global__ void divergent_shuffle_kernel(float* out) {
  float v = 1;
  if (threadIdx.x % kWarpSize < 16) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    __syncwarp();
  }
  out[threadIdx.x] = v;
}

__global__ void shuffle_returned_kernel(float* out) {
  if (threadIdx.x % kWarpSize == 31) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, float(threadIdx.x), 1);
}

}  // namespace

int main(int argc, char** argv) {
  const char* name = argc > 1 ? argv[1] : "";
  std::vector<float> out(64);
  if (std::strcmp(name, "sums") == 0) return sums();
  if (std::strcmp(name, "missing-barrier") == 0) return missing_barrier();
  if (std::strcmp(name, "launch-errors") == 0) return launch_errors();
  if (std::strcmp(name, "shared-poisoned") == 0) return shared_poisoned();
  if (std::strcmp(name, "static-shared-poisoned") == 0) return static_shared_poisoned();
  if (std::strcmp(name, "divergent-shuffle") == 0) divergent_shuffle_kernel<<<1, 64>>>(out.data());
  else if (std::strcmp(name, "shuffle-returned") == 0) shuffle_returned_kernel<<<1, 64>>>(out.data());
  else {
    std::fprintf(stderr, "unknown case '%s'\n", name);
    return 2;
  }
  std::printf("%s: ran to the end\n", name);
  return 0;
}
