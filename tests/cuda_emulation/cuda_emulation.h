// A host emulation of the part of CUDA that the kernels in csrc/cuda use, so that those kernels can run,
// and be tested, on a machine without a GPU (tests/test_cuda_emulation.py; build.py compiles them).
//
// The .cu and .cuh files are compiled as C++ after three textual rewrites (build.py):
// `kernel<<<config>>>(args)` becomes `kernel % LaunchConfig(config) % kernel_arguments(args)`,
// `extern __shared__ T name[];` takes the launch's dynamic shared memory, and every other `__shared__`
// declaration is followed by a call of poison_static_shared. Everything else is these declarations.
//
// How a launch runs: one launch at a time, its blocks one after another (in reverse order, so that no
// kernel can lean on block order), each block's threads as fibers on the calling thread. A fiber runs
// until it reaches a barrier (__syncthreads, __syncwarp, a shuffle) or returns; a barrier opens when every
// thread of its block (or warp) that has not returned has reached it. The emulation aborts with a message
// where CUDA's behaviour would be undefined or the kernel would hang: threads of one warp at different
// warp operations, a warp waiting at __syncthreads while the rest of its block waits at a warp
// operation, a shuffle that reads a lane that has returned, a partial mask. A launch configuration CUDA
// refuses sets the error cudaGetLastError reports, as on a GPU. Shared memory, dynamic and static, is
// filled with 0xff bytes (NaN for floating point) at the start of each block, so a read before any
// write shows.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// One block runs at a time, so a function-local static is that block's shared memory
// (cuda_emulation::poison_static_shared refills it for each block).
#define __shared__ static

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
const char* cudaGetErrorString(cudaError_t error);
cudaError_t cudaGetLastError();

struct cudaDeviceProp {
  int multiProcessorCount;
};

namespace cuda_emulation {

struct Stream {};

// The launch's geometry and the running fiber's place in it.
const uint3& thread_index();
const uint3& block_index();
const dim3& block_dim();
const dim3& grid_dim();
unsigned char* dynamic_shared_memory();
// Fills a static __shared__ variable with 0xff bytes the first time a thread of the running block
// reaches its declaration (build.py puts the call right after it), as a new block's shared memory holds
// nothing the kernel wrote.
void poison_static_shared(void* variable, size_t bytes);

// Barriers (see the header comment). A shuffle is two warp barriers: publish, then read.
enum class WarpOp { Sync, ShufflePublish, ShuffleRead };
void block_barrier();
void warp_barrier(WarpOp op);
void check_full_mask(unsigned mask, const char* what);
uint64_t& own_shuffle_slot();
const uint64_t& lane_shuffle_slot(int lane, const char* what);

struct LaunchConfig {
  dim3 grid, block;
  size_t shared_bytes;
  LaunchConfig(dim3 grid_, dim3 block_, size_t shared_bytes_ = 0, Stream = {})
      : grid(grid_), block(block_), shared_bytes(shared_bytes_) {}
};

// Runs body once per thread of every block of the launch (or records the launch error).
void run(const LaunchConfig& config, const std::function<void()>& body);

template <typename... Params>
struct BoundKernel {
  void (*kernel)(Params...);
  LaunchConfig config;
};

template <typename... Params>
BoundKernel<Params...> operator%(void (*kernel)(Params...), const LaunchConfig& config) {
  return {kernel, config};
}

// The arguments are copied and converted to the kernel's parameter types once, as a launch does.
template <typename... Args>
std::tuple<std::decay_t<Args>...> kernel_arguments(Args&&... args) {
  return std::tuple<std::decay_t<Args>...>(std::forward<Args>(args)...);
}

template <typename... Params, typename... Args>
void operator%(const BoundKernel<Params...>& bound, std::tuple<Args...> args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "a kernel launch with the wrong number of arguments");
  const std::tuple<std::decay_t<Params>...> params(std::move(args));
  run(bound.config, [&] { std::apply(bound.kernel, params); });
}

template <typename T>
T shuffle(unsigned mask, T value, int source_lane, bool keep_own, const char* what) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffles move at most 8 bytes");
  check_full_mask(mask, what);
  std::memcpy(&own_shuffle_slot(), &value, sizeof(T));
  warp_barrier(WarpOp::ShufflePublish);
  T result = value;
  if (!keep_own) std::memcpy(&result, &lane_shuffle_slot(source_lane, what), sizeof(T));
  warp_barrier(WarpOp::ShuffleRead);  // nobody publishes again before every lane has read
  return result;
}

}  // namespace cuda_emulation

#define threadIdx (::cuda_emulation::thread_index())
#define blockIdx (::cuda_emulation::block_index())
#define blockDim (::cuda_emulation::block_dim())
#define gridDim (::cuda_emulation::grid_dim())

inline void __syncthreads() { ::cuda_emulation::block_barrier(); }

// A fiber gives way only at a barrier, so a read-modify-write here is as atomic as on a GPU.
inline int atomicOr(int* address, int value) {
  const int old = *address;
  *address = old | value;
  return old;
}

inline int atomicMax(int* address, int value) {
  const int old = *address;
  *address = old > value ? old : value;
  return old;
}

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::cuda_emulation::check_full_mask(mask, "__syncwarp");
  ::cuda_emulation::warp_barrier(::cuda_emulation::WarpOp::Sync);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  const int lane = int(threadIdx.x % 32);
  const int source = lane ^ lane_mask;
  // A source outside this lane's group of width lanes leaves the value unchanged.
  return ::cuda_emulation::shuffle(mask, value, source, source / width != lane / width, "__shfl_xor_sync");
}

template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned int delta, int width = 32) {
  const int lane = int(threadIdx.x % 32);
  const int source = lane + int(delta);
  return ::cuda_emulation::shuffle(mask, value, source, source / width != lane / width, "__shfl_down_sync");
}

template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}

template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

namespace at {
namespace cuda {
struct CUDAStream {
  operator ::cuda_emulation::Stream() const { return {}; }
};
inline CUDAStream getCurrentCUDAStream() { return {}; }
// multiProcessorCount: NICE_EXT_EMULATED_SMS (default 2, few enough that the kernels' grid-stride loops
// take several turns at the tests' batch sizes).
cudaDeviceProp* getCurrentDeviceProperties();
}  // namespace cuda
}  // namespace at
