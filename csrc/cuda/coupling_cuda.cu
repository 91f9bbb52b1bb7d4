// CUDA kernels of the masked additive coupling update (schema: csrc/ops.cpp; entry point and checks:
// csrc/coupling.cpp; CPU twin: csrc/cpu/coupling_cpu.cpp). One block walks a row at a time: y and the next layer's gathered input
// are written in the same pass, so a coupling layer reads x once and writes it once.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/macros/Macros.h>

#include "cuda/cuda_utils.cuh"
#include "nice_ext.h"

namespace nice_ext {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void coupling_update_kernel(const scalar_t* __restrict__ x, int64_t x_row_stride,
                                       const scalar_t* __restrict__ shift, int64_t shift_row_stride,
                                       const int32_t* __restrict__ shift_col, const int32_t* __restrict__ gather_index,
                                       scalar_t* __restrict__ y, scalar_t* __restrict__ gathered, int64_t batch,
                                       int64_t features, int64_t updated, int64_t gathered_n, bool inverse) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t sign = inverse ? opmath_t(-1) : opmath_t(1);
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    const scalar_t* xr = x + b * x_row_stride;
    const scalar_t* sr = shift + b * shift_row_stride;
    scalar_t* yr = y + b * features;
    for (int64_t j = threadIdx.x; j < features; j += blockDim.x) {
      const int32_t c = shift_col[j];
      CUDA_KERNEL_ASSERT(c < updated && "shift_col out of range");
      yr[j] = c < 0 ? xr[j] : static_cast<scalar_t>(opmath_t(xr[j]) + sign * opmath_t(sr[c]));
    }
    scalar_t* gr = gathered + b * gathered_n;
    for (int64_t g = threadIdx.x; g < gathered_n; g += blockDim.x) {
      const int32_t j = gather_index[g];
      CUDA_KERNEL_ASSERT(j >= 0 && j < features && "gather_index out of range");
      const int32_t c = shift_col[j];
      gr[g] = c < 0 ? xr[j] : static_cast<scalar_t>(opmath_t(xr[j]) + sign * opmath_t(sr[c]));
    }
  }
}

// Two passes over the row, separated by a barrier: grad_x = grad_y and grad_shift from it; then the
// gradient of the gathered copy is added at the features gather_index names (distinct, so no two
// threads touch one element). __syncthreads() makes the first pass's global writes visible to the block.
template <typename scalar_t>
__global__ void coupling_update_backward_kernel(const scalar_t* __restrict__ grad_y, int64_t gy_row_stride,
                                                const scalar_t* __restrict__ grad_gathered, int64_t gg_row_stride,
                                                int64_t gathered_n, const int32_t* __restrict__ shift_col,
                                                const int32_t* __restrict__ gather_index, scalar_t* grad_x,
                                                scalar_t* grad_shift, int64_t batch, int64_t features,
                                                int64_t updated, bool inverse) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t sign = inverse ? opmath_t(-1) : opmath_t(1);
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    const scalar_t* gyr = grad_y + b * gy_row_stride;
    scalar_t* gxr = grad_x + b * features;
    scalar_t* gsr = grad_shift + b * updated;
    for (int64_t j = threadIdx.x; j < features; j += blockDim.x) {
      const scalar_t g = gyr[j];
      gxr[j] = g;
      const int32_t c = shift_col[j];
      CUDA_KERNEL_ASSERT(c < updated && "shift_col out of range");
      if (c >= 0) gsr[c] = static_cast<scalar_t>(sign * opmath_t(g));
    }
    if (gathered_n > 0) {
      __syncthreads();
      const scalar_t* ggr = grad_gathered + b * gg_row_stride;
      for (int64_t k = threadIdx.x; k < gathered_n; k += blockDim.x) {
        const int32_t j = gather_index[k];
        CUDA_KERNEL_ASSERT(j >= 0 && j < features && "gather_index out of range");
        const opmath_t gg = opmath_t(ggr[k]);
        gxr[j] = static_cast<scalar_t>(opmath_t(gxr[j]) + gg);
        const int32_t c = shift_col[j];
        if (c >= 0) gsr[c] = static_cast<scalar_t>(opmath_t(gsr[c]) + sign * gg);
      }
    }
    __syncthreads();  // the next row's first pass must not overtake this row's second
  }
}

}  // namespace

const char* coupling_update_kernel_cuda(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& shift_col,
                                        const at::Tensor& gather_index, bool inverse, at::Tensor& y,
                                        at::Tensor& gathered) {
  const int64_t batch = x.size(0), features = x.size(1), updated = shift.size(1), gathered_n = gather_index.size(0);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "coupling_update_cuda", [&] {
    coupling_update_kernel<scalar_t><<<grid_for(batch, 2048 / kThreads), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), x.stride(0), shift.const_data_ptr<scalar_t>(), shift.stride(0),
        shift_col.const_data_ptr<int32_t>(), gather_index.const_data_ptr<int32_t>(), y.mutable_data_ptr<scalar_t>(),
        gathered.mutable_data_ptr<scalar_t>(), batch, features, updated, gathered_n, inverse);
  });
  return launch_error();
}

const char* coupling_update_backward_kernel_cuda(const at::Tensor& grad_y, const at::Tensor& grad_gathered,
                                                 const at::Tensor& shift_col, const at::Tensor& gather_index,
                                                 bool inverse, at::Tensor& grad_x, at::Tensor& grad_shift) {
  const bool has_gathered = grad_gathered.defined();
  const int64_t batch = grad_y.size(0), features = grad_y.size(1), updated = grad_shift.size(1);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_y.scalar_type(), "coupling_update_backward_cuda", [&] {
    coupling_update_backward_kernel<scalar_t><<<grid_for(batch, 2048 / kThreads), kThreads, 0, stream>>>(
        grad_y.const_data_ptr<scalar_t>(), grad_y.stride(0),
        has_gathered ? grad_gathered.const_data_ptr<scalar_t>() : nullptr, has_gathered ? grad_gathered.stride(0) : 0,
        has_gathered ? gather_index.size(0) : 0, shift_col.const_data_ptr<int32_t>(),
        gather_index.const_data_ptr<int32_t>(), grad_x.mutable_data_ptr<scalar_t>(),
        grad_shift.mutable_data_ptr<scalar_t>(), batch, features, updated, inverse);
  });
  return launch_error();
}

}  // namespace nice_ext
