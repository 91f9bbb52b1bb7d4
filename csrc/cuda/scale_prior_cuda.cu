// CUDA kernels of the diagonal scaling + prior log-density (schema: csrc/ops.cpp; entry points and
// checks: csrc/scale_prior.cpp; CPU twin: csrc/cpu/scale_prior_cpu.cpp).
//  - forward: a block per row, z and the row's log-density in one pass, reduced with warp shuffles;
//  - backward: column tiles x fixed row chunks write per-chunk partial sums of grad(log_scale), which a
//    second kernel adds up in chunk order: deterministic, no atomics;
//  - inverse: elementwise.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>

#include "cuda/cuda_utils.cuh"
#include "nice_ext.h"

namespace nice_ext {
namespace {

constexpr int kRowThreads = 256;     // forward: threads walking one row
constexpr int kColumnThreads = 128;  // backward: columns per block

template <typename scalar_t, Prior prior>
__global__ void scale_prior_kernel(const scalar_t* __restrict__ h, int64_t h_row_stride,
                                   const scalar_t* __restrict__ log_scale, scalar_t* __restrict__ z,
                                   at::opmath_type<scalar_t>* __restrict__ log_prob, int64_t batch, int64_t features) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    const scalar_t* hr = h + b * h_row_stride;
    opmath_t acc = 0;
    for (int64_t d = threadIdx.x; d < features; d += blockDim.x) {
      const opmath_t s = opmath_t(log_scale[d]);
      const opmath_t zd = opmath_t(hr[d]) * exp_(s);
      if (z != nullptr) z[b * features + d] = static_cast<scalar_t>(zd);
      acc += prior_log_density(prior, zd) + s;  // + s: the scaling layer's log|det J| term
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) log_prob[b] = acc;
  }
}

template <typename scalar_t, Prior prior>
__global__ void scale_prior_backward_kernel(const at::opmath_type<scalar_t>* __restrict__ grad_log_prob,
                                            const scalar_t* __restrict__ grad_z, int64_t gz_row_stride,
                                            const scalar_t* __restrict__ h, int64_t h_row_stride,
                                            const scalar_t* __restrict__ log_scale, scalar_t* __restrict__ grad_h,
                                            at::opmath_type<scalar_t>* __restrict__ partial, int64_t batch,
                                            int64_t features, int64_t rows_per_chunk) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t d = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (d >= features) return;
  const int64_t chunk = blockIdx.y;
  const int64_t row_begin = chunk * rows_per_chunk;
  const int64_t row_end = min(batch, row_begin + rows_per_chunk);
  const opmath_t scale = exp_(opmath_t(log_scale[d]));
  opmath_t acc = 0;
#pragma unroll 4
  for (int64_t b = row_begin; b < row_end; ++b) {
    const opmath_t gl = grad_log_prob[b];
    const opmath_t zd = opmath_t(h[b * h_row_stride + d]) * scale;
    opmath_t g = gl * prior_score(prior, zd);
    if (grad_z != nullptr) g += opmath_t(grad_z[b * gz_row_stride + d]);
    grad_h[b * features + d] = static_cast<scalar_t>(g * scale);
    acc += g * zd + gl;
  }
  partial[chunk * features + d] = acc;
}

template <typename scalar_t>
__global__ void sum_chunks_kernel(const at::opmath_type<scalar_t>* __restrict__ partial, scalar_t* __restrict__ out,
                                  int64_t chunks, int64_t features) {
  const int64_t d = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (d >= features) return;
  at::opmath_type<scalar_t> acc = 0;
  for (int64_t c = 0; c < chunks; ++c) acc += partial[c * features + d];
  out[d] = static_cast<scalar_t>(acc);
}

template <typename scalar_t>
__global__ void scale_inverse_kernel(const scalar_t* __restrict__ z, int64_t z_row_stride,
                                     const scalar_t* __restrict__ log_scale, scalar_t* __restrict__ h, int64_t batch,
                                     int64_t features) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    for (int64_t d = threadIdx.x; d < features; d += blockDim.x) {
      h[b * features + d] = static_cast<scalar_t>(opmath_t(z[b * z_row_stride + d]) * exp_(-opmath_t(log_scale[d])));
    }
  }
}

}  // namespace

const char* scale_prior_kernel_cuda(const at::Tensor& h, const at::Tensor& log_scale, Prior prior, at::Tensor& z,
                                    at::Tensor& log_prob) {
  const int64_t batch = h.size(0), features = h.size(1);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "scale_prior_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    auto launch = [&](auto kernel) {
      kernel<<<grid_for(batch, 2048 / kRowThreads), kRowThreads, 0, stream>>>(
          h.const_data_ptr<scalar_t>(), h.stride(0), log_scale.const_data_ptr<scalar_t>(),
          z.defined() ? z.mutable_data_ptr<scalar_t>() : nullptr, log_prob.mutable_data_ptr<opmath_t>(), batch,
          features);
    };
    if (prior == Prior::Logistic) {
      launch(scale_prior_kernel<scalar_t, Prior::Logistic>);
    } else {
      launch(scale_prior_kernel<scalar_t, Prior::Gaussian>);
    }
  });
  return launch_error();
}

const char* scale_prior_backward_kernel_cuda(const at::Tensor& grad_log_prob, const at::Tensor& grad_z,
                                             const at::Tensor& h, const at::Tensor& log_scale, Prior prior,
                                             at::Tensor& grad_h, at::Tensor& grad_s, at::Tensor& partial) {
  const int64_t batch = h.size(0), features = h.size(1);
  const int64_t chunks = partial.size(0), rows_per_chunk = reduction_rows_per_chunk(batch);
  const int64_t column_blocks = (features + kColumnThreads - 1) / kColumnThreads;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "scale_prior_backward_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    auto launch = [&](auto kernel) {
      kernel<<<dim3(column_blocks, chunks), kColumnThreads, 0, stream>>>(
          grad_log_prob.const_data_ptr<opmath_t>(), grad_z.defined() ? grad_z.const_data_ptr<scalar_t>() : nullptr,
          grad_z.defined() ? grad_z.stride(0) : 0, h.const_data_ptr<scalar_t>(), h.stride(0),
          log_scale.const_data_ptr<scalar_t>(), grad_h.mutable_data_ptr<scalar_t>(),
          partial.mutable_data_ptr<opmath_t>(), batch, features, rows_per_chunk);
    };
    if (prior == Prior::Logistic) {
      launch(scale_prior_backward_kernel<scalar_t, Prior::Logistic>);
    } else {
      launch(scale_prior_backward_kernel<scalar_t, Prior::Gaussian>);
    }
    sum_chunks_kernel<scalar_t><<<column_blocks, kColumnThreads, 0, stream>>>(
        partial.const_data_ptr<opmath_t>(), grad_s.mutable_data_ptr<scalar_t>(), chunks, features);
  });
  return launch_error();
}

const char* scale_inverse_kernel_cuda(const at::Tensor& z, const at::Tensor& log_scale, at::Tensor& h) {
  const int64_t batch = z.size(0), features = z.size(1);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "scale_inverse_cuda", [&] {
    scale_inverse_kernel<scalar_t><<<grid_for(batch, 2048 / kRowThreads), kRowThreads, 0, stream>>>(
        z.const_data_ptr<scalar_t>(), z.stride(0), log_scale.const_data_ptr<scalar_t>(),
        h.mutable_data_ptr<scalar_t>(), batch, features);
  });
  return launch_error();
}

}  // namespace nice_ext
