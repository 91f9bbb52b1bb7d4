// CUDA kernels of the diagonal scaling + prior log-density (schema and meaning: csrc/ops.cpp); the CPU
// twin is csrc/cpu/scale_prior_cpu.cpp.
//  - forward: a block per row, z and the row's log-density in one pass, reduced with warp shuffles;
//  - backward: column tiles x fixed row chunks write per-chunk partial sums of grad(log_scale), which a
//    second kernel adds up in chunk order: deterministic, no atomics;
//  - inverse: elementwise.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

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

std::tuple<at::Tensor, at::Tensor> scale_prior_cuda(const at::Tensor& h_in, const at::Tensor& log_scale_in,
                                                    c10::string_view prior_name, bool compute_z) {
  check_scale_prior(h_in, log_scale_in);
  const Prior prior = parse_prior(std::string(prior_name));
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = unit_feature_stride(h_in);
  const at::Tensor log_scale = log_scale_in.contiguous();
  at::Tensor z = compute_z ? at::empty(h.sizes(), h.options()) : at::empty({0}, h.options());
  at::Tensor log_prob = at::empty({h.size(0)}, h.options().dtype(log_prob_dtype(h.scalar_type())));
  const int64_t batch = h.size(0), features = h.size(1);
  if (batch == 0) return {z, log_prob};
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "scale_prior_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    auto launch = [&](auto kernel) {
      kernel<<<grid_for(batch, 2048 / kRowThreads), kRowThreads, 0, stream>>>(
          h.const_data_ptr<scalar_t>(), h.stride(0), log_scale.const_data_ptr<scalar_t>(),
          compute_z ? z.mutable_data_ptr<scalar_t>() : nullptr, log_prob.mutable_data_ptr<opmath_t>(), batch,
          features);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (prior == Prior::Logistic) {
      launch(scale_prior_kernel<scalar_t, Prior::Logistic>);
    } else {
      launch(scale_prior_kernel<scalar_t, Prior::Gaussian>);
    }
  });
  return {z, log_prob};
}

std::tuple<at::Tensor, at::Tensor> scale_prior_backward_cuda(const at::Tensor& grad_log_prob_in,
                                                             const c10::optional<at::Tensor>& grad_z_in,
                                                             const at::Tensor& h_in, const at::Tensor& log_scale_in,
                                                             c10::string_view prior_name) {
  check_scale_prior_backward(grad_log_prob_in, grad_z_in, h_in, log_scale_in);
  const Prior prior = parse_prior(std::string(prior_name));
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = unit_feature_stride(h_in);
  const at::Tensor log_scale = log_scale_in.contiguous();
  const bool has_grad_z = grad_z_in.has_value() && grad_z_in->defined();
  const at::Tensor grad_z = has_grad_z ? unit_feature_stride(*grad_z_in) : at::Tensor();
  const int64_t batch = h.size(0), features = h.size(1);
  at::Tensor grad_h = at::empty(h.sizes(), h.options());
  at::Tensor grad_s = at::empty(log_scale.sizes(), log_scale.options());
  if (batch == 0) {
    grad_s.zero_();
    return {grad_h, grad_s};
  }
  const int64_t rows_per_chunk = reduction_rows_per_chunk(batch);
  const int64_t chunks = (batch + rows_per_chunk - 1) / rows_per_chunk;
  const int64_t column_blocks = (features + kColumnThreads - 1) / kColumnThreads;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "scale_prior_backward_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto opmath_options = h.options().dtype(c10::CppTypeToScalarType<opmath_t>::value);
    const at::Tensor glp = grad_log_prob_in.to(opmath_options).contiguous();
    at::Tensor partial = at::empty({chunks, features}, opmath_options);
    auto launch = [&](auto kernel) {
      kernel<<<dim3(column_blocks, chunks), kColumnThreads, 0, stream>>>(
          glp.const_data_ptr<opmath_t>(), has_grad_z ? grad_z.const_data_ptr<scalar_t>() : nullptr,
          has_grad_z ? grad_z.stride(0) : 0, h.const_data_ptr<scalar_t>(), h.stride(0),
          log_scale.const_data_ptr<scalar_t>(), grad_h.mutable_data_ptr<scalar_t>(),
          partial.mutable_data_ptr<opmath_t>(), batch, features, rows_per_chunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (prior == Prior::Logistic) {
      launch(scale_prior_backward_kernel<scalar_t, Prior::Logistic>);
    } else {
      launch(scale_prior_backward_kernel<scalar_t, Prior::Gaussian>);
    }
    sum_chunks_kernel<scalar_t><<<column_blocks, kColumnThreads, 0, stream>>>(
        partial.const_data_ptr<opmath_t>(), grad_s.mutable_data_ptr<scalar_t>(), chunks, features);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_h, grad_s};
}

at::Tensor scale_inverse_cuda(const at::Tensor& z_in, const at::Tensor& log_scale_in) {
  check_scale_prior(z_in, log_scale_in);
  const c10::cuda::CUDAGuard guard(z_in.device());
  const at::Tensor z = unit_feature_stride(z_in);
  const at::Tensor log_scale = log_scale_in.contiguous();
  at::Tensor h = at::empty(z.sizes(), z.options());
  const int64_t batch = z.size(0), features = z.size(1);
  if (batch == 0) return h;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "scale_inverse_cuda", [&] {
    scale_inverse_kernel<scalar_t><<<grid_for(batch, 2048 / kRowThreads), kRowThreads, 0, stream>>>(
        z.const_data_ptr<scalar_t>(), z.stride(0), log_scale.const_data_ptr<scalar_t>(),
        h.mutable_data_ptr<scalar_t>(), batch, features);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return h;
}

}  // namespace

TORCH_LIBRARY_IMPL(nice_ext, CUDA, m) {
  m.impl("scale_prior", &scale_prior_cuda);
  m.impl("scale_prior_backward", &scale_prior_backward_cuda);
  m.impl("scale_inverse", &scale_inverse_cuda);
}

}  // namespace nice_ext
