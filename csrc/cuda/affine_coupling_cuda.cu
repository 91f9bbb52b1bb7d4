// CUDA kernels of the masked affine coupling update (schema: csrc/ops.cpp; entry point and checks:
// csrc/affine_coupling.cpp; CPU twin: csrc/cpu/affine_coupling_cpu.cpp). One block walks a row at a
// time: y, the row's log|det| (a block reduction) and the next layer's gathered input are written in the
// same pass, so a coupling layer reads x once and writes it once.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/macros/Macros.h>

#include "cuda/cuda_utils.cuh"
#include "nice_ext.h"

namespace nice_ext {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ inline T affine_log_scale(AffineLaw law, T raw) {
  return law == AffineLaw::Tanh ? tanh_(raw) : raw;
}

template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
__global__ void affine_coupling_update_kernel(const scalar_t* __restrict__ x, int64_t x_row_stride,
                                              const scalar_t* __restrict__ log_scale_raw, int64_t r_row_stride,
                                              const scalar_t* __restrict__ shift, int64_t s_row_stride,
                                              const int32_t* __restrict__ shift_col,
                                              const int32_t* __restrict__ gather_index, scalar_t* y,
                                              scalar_t* __restrict__ gathered, opmath_t* __restrict__ log_det,
                                              int64_t batch, int64_t features, int64_t updated, int64_t gathered_n,
                                              AffineLaw law, bool inverse) {
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    const scalar_t* xr = x + b * x_row_stride;
    const scalar_t* rr = log_scale_raw + b * r_row_stride;
    const scalar_t* sr = shift + b * s_row_stride;
    scalar_t* yr = y + b * features;
    opmath_t sum = 0;
    for (int64_t j = threadIdx.x; j < features; j += blockDim.x) {
      const int32_t c = shift_col[j];
      CUDA_KERNEL_ASSERT(c < updated && "shift_col out of range");
      if (c < 0) {
        yr[j] = xr[j];
        continue;
      }
      const opmath_t a = affine_log_scale(law, opmath_t(rr[c]));
      sum += a;
      const opmath_t xv = opmath_t(xr[j]), bv = opmath_t(sr[c]);
      yr[j] = static_cast<scalar_t>(inverse ? (xv - bv) * exp_(-a) : xv * exp_(a) + bv);
    }
    // block_sum's barrier also makes every thread's y of this row visible to the whole block.
    const opmath_t total = block_sum(sum);
    if (threadIdx.x == 0) log_det[b] = inverse ? -total : total;
    scalar_t* gr = gathered + b * gathered_n;
    for (int64_t g = threadIdx.x; g < gathered_n; g += blockDim.x) {
      const int32_t j = gather_index[g];
      CUDA_KERNEL_ASSERT(j >= 0 && j < features && "gather_index out of range");
      gr[g] = yr[j];
    }
  }
}

// Per row: G = grad_y, plus grad_gathered added back at the features gather_index names (distinct, so
// no two threads touch one element); after a barrier, each updated feature's gradients from G
// (formulas: affine_coupling_grads, nice_ext.h).
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
__global__ void affine_coupling_update_backward_kernel(
    const scalar_t* __restrict__ grad_y, int64_t gy_row_stride, const scalar_t* __restrict__ grad_gathered,
    int64_t gg_row_stride, int64_t gathered_n, const opmath_t* __restrict__ grad_log_det,
    const scalar_t* __restrict__ x, int64_t x_row_stride, const scalar_t* __restrict__ log_scale_raw,
    int64_t r_row_stride, const scalar_t* __restrict__ shift, int64_t s_row_stride,
    const int32_t* __restrict__ shift_col, const int32_t* __restrict__ gather_index, scalar_t* grad_x,
    scalar_t* __restrict__ grad_log_scale_raw, scalar_t* __restrict__ grad_shift, int64_t batch, int64_t features,
    int64_t updated, AffineLaw law, bool inverse) {
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    const scalar_t* gyr = grad_y + b * gy_row_stride;
    scalar_t* gxr = grad_x + b * features;
    for (int64_t j = threadIdx.x; j < features; j += blockDim.x) gxr[j] = gyr[j];
    if (gathered_n > 0) {
      __syncthreads();
      const scalar_t* ggr = grad_gathered + b * gg_row_stride;
      for (int64_t k = threadIdx.x; k < gathered_n; k += blockDim.x) {
        const int32_t j = gather_index[k];
        CUDA_KERNEL_ASSERT(j >= 0 && j < features && "gather_index out of range");
        gxr[j] = static_cast<scalar_t>(opmath_t(gxr[j]) + opmath_t(ggr[k]));
      }
    }
    __syncthreads();
    const opmath_t gld = grad_log_det != nullptr ? grad_log_det[b] : opmath_t(0);
    const scalar_t* xr = x + b * x_row_stride;
    const scalar_t* rr = log_scale_raw + b * r_row_stride;
    const scalar_t* sr = shift + b * s_row_stride;
    scalar_t* grr = grad_log_scale_raw + b * updated;
    scalar_t* gsr = grad_shift + b * updated;
    for (int64_t j = threadIdx.x; j < features; j += blockDim.x) {
      const int32_t c = shift_col[j];
      CUDA_KERNEL_ASSERT(c < updated && "shift_col out of range");
      if (c < 0) continue;
      const opmath_t a = affine_log_scale(law, opmath_t(rr[c]));
      const AffineGrads<opmath_t> grads = affine_coupling_grads(law, inverse, opmath_t(gxr[j]), opmath_t(xr[j]),
                                                                opmath_t(sr[c]), a, exp_(inverse ? -a : a), gld);
      gxr[j] = static_cast<scalar_t>(grads.x);
      grr[c] = static_cast<scalar_t>(grads.log_scale_raw);
      gsr[c] = static_cast<scalar_t>(grads.shift);
    }
    // The next row's passes touch other rows only: no barrier needed here.
  }
}

}  // namespace

const char* affine_coupling_update_kernel_cuda(const at::Tensor& x, const at::Tensor& log_scale_raw,
                                               const at::Tensor& shift, const at::Tensor& shift_col,
                                               const at::Tensor& gather_index, AffineLaw law, bool inverse,
                                               at::Tensor& y, at::Tensor& gathered, at::Tensor& log_det) {
  const int64_t batch = x.size(0), features = x.size(1), updated = shift.size(1), gathered_n = gather_index.size(0);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "affine_coupling_update_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    affine_coupling_update_kernel<scalar_t><<<grid_for(batch, 2048 / kThreads), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), x.stride(0), log_scale_raw.const_data_ptr<scalar_t>(), log_scale_raw.stride(0),
        shift.const_data_ptr<scalar_t>(), shift.stride(0), shift_col.const_data_ptr<int32_t>(),
        gather_index.const_data_ptr<int32_t>(), y.mutable_data_ptr<scalar_t>(), gathered.mutable_data_ptr<scalar_t>(),
        log_det.mutable_data_ptr<opmath_t>(), batch, features, updated, gathered_n, law, inverse);
  });
  return launch_error();
}

const char* affine_coupling_update_backward_kernel_cuda(const at::Tensor& grad_y, const at::Tensor& grad_gathered,
                                                        const at::Tensor& grad_log_det, const at::Tensor& x,
                                                        const at::Tensor& log_scale_raw, const at::Tensor& shift,
                                                        const at::Tensor& shift_col, const at::Tensor& gather_index,
                                                        AffineLaw law, bool inverse, at::Tensor& grad_x,
                                                        at::Tensor& grad_log_scale_raw, at::Tensor& grad_shift) {
  const bool has_gathered = grad_gathered.defined(), has_log_det = grad_log_det.defined();
  const int64_t batch = x.size(0), features = x.size(1), updated = shift.size(1);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "affine_coupling_update_backward_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    affine_coupling_update_backward_kernel<scalar_t><<<grid_for(batch, 2048 / kThreads), kThreads, 0, stream>>>(
        grad_y.const_data_ptr<scalar_t>(), grad_y.stride(0),
        has_gathered ? grad_gathered.const_data_ptr<scalar_t>() : nullptr, has_gathered ? grad_gathered.stride(0) : 0,
        has_gathered ? gather_index.size(0) : 0, has_log_det ? grad_log_det.const_data_ptr<opmath_t>() : nullptr,
        x.const_data_ptr<scalar_t>(), x.stride(0), log_scale_raw.const_data_ptr<scalar_t>(), log_scale_raw.stride(0),
        shift.const_data_ptr<scalar_t>(), shift.stride(0), shift_col.const_data_ptr<int32_t>(),
        gather_index.const_data_ptr<int32_t>(), grad_x.mutable_data_ptr<scalar_t>(),
        grad_log_scale_raw.mutable_data_ptr<scalar_t>(), grad_shift.mutable_data_ptr<scalar_t>(), batch, features,
        updated, law, inverse);
  });
  return launch_error();
}

}  // namespace nice_ext
