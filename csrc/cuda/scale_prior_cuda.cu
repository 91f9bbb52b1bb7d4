// CUDA kernels of the diagonal scaling + prior log-density (schema: csrc/ops.cpp; entry points and
// checks: csrc/scale_prior.cpp; CPU twin: csrc/cpu/scale_prior_cpu.cpp).
//  - forward: a block per row, z and the row's log-density in one pass, reduced with warp shuffles;
//  - backward: column tiles x fixed row chunks write per-chunk partial sums of grad(log_scale), which a
//    second kernel adds up in chunk order: deterministic, no atomics (version 2: 16-byte packs of columns,
//    and row lanes within each chunk);
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

// One element of the backward, in both versions (so their grad_h agree bit for bit): returns grad_h =
// g exp(s) with g = grad_lp * score(z) (+ grad_z), z = exp(s) h, and adds the element's term of
// grad(log_scale), g z + grad_lp (the + s of log|det J| gives the grad_lp), to grad_s_sum.
template <typename opmath_t>
__device__ inline opmath_t backward_element(Prior prior, opmath_t grad_lp, opmath_t h, opmath_t scale, bool has_grad_z,
                                            opmath_t grad_z, opmath_t& grad_s_sum) {
  const opmath_t z = h * scale;
  opmath_t g = grad_lp * prior_score(prior, z);
  if (has_grad_z) g += grad_z;
  grad_s_sum += g * z + grad_lp;
  return g * scale;
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
    const opmath_t gz = grad_z != nullptr ? opmath_t(grad_z[b * gz_row_stride + d]) : opmath_t(0);
    grad_h[b * features + d] = static_cast<scalar_t>(
        backward_element(prior, grad_log_prob[b], opmath_t(h[b * h_row_stride + d]), scale, grad_z != nullptr, gz, acc));
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

// ---------------------------------------------------------------------------------------------------
// Version 2 (benchmarks/NOTES.md): each block first puts exp(+-log_scale) for every feature in shared
// memory (so a row's elements cost one exp fewer each), then gives a row to each warp, whose lanes move V
// consecutive features per access (16 bytes) and sum the row with warp shuffles: no block barrier per
// row. Needs features * sizeof(opmath_t) bytes of shared memory (feature_table_fits); wider rows take
// version 1.
// ---------------------------------------------------------------------------------------------------
template <typename scalar_t>
bool scales_fit_in_shared_memory(int64_t features) {
  return feature_table_fits(features, sizeof(at::opmath_type<scalar_t>));
}

// scale[d] = exp(sign * log_scale[d]) for every feature; returns the sum of log_scale over the features in
// thread 0 (the scaling layer's log|det J|). Ends with a block barrier, so scale[] is ready for every thread.
template <typename scalar_t>
__device__ at::opmath_type<scalar_t> cache_scales(const scalar_t* __restrict__ log_scale, int64_t features,
                                                  at::opmath_type<scalar_t> sign, at::opmath_type<scalar_t>* scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  opmath_t log_det = 0;
  for (int64_t d = threadIdx.x; d < features; d += blockDim.x) {
    const opmath_t s = opmath_t(log_scale[d]);
    scale[d] = exp_(sign * s);
    log_det += s;
  }
  return block_sum(log_det);  // its barriers also publish scale[]
}

// h's rows are read in packs of V where aligned for it (kAligned), else an element at a time, but always
// cut into the same packs of V: a row's log-density is summed in the same order whatever h's layout.
template <typename scalar_t, Prior prior, int V, bool kAligned>
__global__ void __launch_bounds__(kRowBlockThreads)
    scale_prior_rows_kernel(const scalar_t* __restrict__ h, int64_t h_row_stride,
                            const scalar_t* __restrict__ log_scale, scalar_t* __restrict__ z,
                            at::opmath_type<scalar_t>* __restrict__ log_prob, int64_t batch, int64_t features) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Values = Pack<scalar_t, V>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  opmath_t* scale = reinterpret_cast<opmath_t*>(shared_bytes);
  __shared__ opmath_t block_log_det;
  const opmath_t log_det = cache_scales(log_scale, features, opmath_t(1), scale);
  if (threadIdx.x == 0) block_log_det = log_det;
  __syncthreads();
  const int lane = threadIdx.x % kWarpSize;
  const int64_t packs = features / V;  // V divides features (the launcher's choice)
  for (int64_t b = warp_first_row(); b < batch; b += warp_row_step()) {
    const scalar_t* hr = h + b * h_row_stride;
    Values* zr = z == nullptr ? nullptr : reinterpret_cast<Values*>(z + b * features);
    opmath_t acc = 0;
#pragma unroll 2
    for (int64_t p = lane; p < packs; p += kWarpSize) {
      const Values hv = load_pack<V, kAligned>(hr, p);
      Values zv;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const opmath_t zd = opmath_t(hv.v[e]) * scale[p * V + e];
        zv.v[e] = static_cast<scalar_t>(zd);
        acc += prior_log_density(prior, zd);
      }
      if (zr != nullptr) zr[p] = zv;
    }
    acc = warp_sum(acc);
    if (lane == 0) log_prob[b] = acc + block_log_det;
  }
}

// Version 2 of the backward. Version 1 gives a thread one column and a chunk's rows, so a warp moves 64
// bytes per access in bfloat16 (128 in float32) and a thread has a few of them in flight. Here a thread
// takes a pack of V columns (16 bytes) and every kBackwardRowLanes-th row of the chunk: a block is
// kBackwardTilePacks packs wide and kBackwardRowLanes rows deep, its half-warps each read 256 contiguous
// bytes of a row, and the chunk's rows are walked by 16 lanes at once. The lanes' sums of grad(log_scale)
// are added in lane order through shared memory, so the result is deterministic and the same for every
// layout of h (unaligned rows are read an element at a time, in the same packs); it differs from version
// 1's only by that order. grad_h is bit for bit version 1's. No table in shared memory: every width runs it.
constexpr int kBackwardTilePacks = 16;
constexpr int kBackwardRowLanes = kRowBlockThreads / kBackwardTilePacks;

template <typename scalar_t, Prior prior, int V, bool kAligned>
__global__ void __launch_bounds__(kRowBlockThreads)
    scale_prior_backward_packs_kernel(const at::opmath_type<scalar_t>* __restrict__ grad_log_prob,
                                      const scalar_t* __restrict__ grad_z, int64_t gz_row_stride,
                                      const scalar_t* __restrict__ h, int64_t h_row_stride,
                                      const scalar_t* __restrict__ log_scale, scalar_t* __restrict__ grad_h,
                                      at::opmath_type<scalar_t>* __restrict__ partial, int64_t batch,
                                      int64_t features, int64_t rows_per_chunk) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Values = Pack<scalar_t, V>;
  constexpr int kTileColumns = kBackwardTilePacks * V;
  __shared__ opmath_t lane_sums[kBackwardRowLanes][kTileColumns];
  const int pack_in_tile = threadIdx.x % kBackwardTilePacks, row_lane = threadIdx.x / kBackwardTilePacks;
  const int64_t p = blockIdx.x * int64_t(kBackwardTilePacks) + pack_in_tile;  // V divides features
  const int64_t chunk = blockIdx.y;
  const int64_t row_end = min(batch, (chunk + 1) * rows_per_chunk);
  opmath_t acc[V] = {};
  if (p < features / V) {
    opmath_t scale[V];
#pragma unroll
    for (int e = 0; e < V; ++e) scale[e] = exp_(opmath_t(log_scale[p * V + e]));
#pragma unroll 4
    for (int64_t b = chunk * rows_per_chunk + row_lane; b < row_end; b += kBackwardRowLanes) {
      const opmath_t gl = grad_log_prob[b];
      const Values hv = load_pack<V, kAligned>(h + b * h_row_stride, p);
      Values gzv{};
      if (grad_z != nullptr) gzv = load_pack<V, kAligned>(grad_z + b * gz_row_stride, p);
      Values ghv;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        ghv.v[e] = static_cast<scalar_t>(
            backward_element(prior, gl, opmath_t(hv.v[e]), scale[e], grad_z != nullptr, opmath_t(gzv.v[e]), acc[e]));
      }
      reinterpret_cast<Values*>(grad_h + b * features)[p] = ghv;  // grad_h: allocated contiguous, V | features
    }
  }
#pragma unroll
  for (int e = 0; e < V; ++e) lane_sums[row_lane][pack_in_tile * V + e] = acc[e];
  __syncthreads();
  for (int c = threadIdx.x; c < kTileColumns; c += blockDim.x) {
    const int64_t d = blockIdx.x * int64_t(kTileColumns) + c;
    if (d >= features) break;
    opmath_t sum = 0;
#pragma unroll
    for (int lane = 0; lane < kBackwardRowLanes; ++lane) sum += lane_sums[lane][c];
    partial[chunk * features + d] = sum;
  }
}

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kRowBlockThreads)
    scale_inverse_rows_kernel(const scalar_t* __restrict__ z, int64_t z_row_stride,
                              const scalar_t* __restrict__ log_scale, scalar_t* __restrict__ h, int64_t batch,
                              int64_t features) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Values = Pack<scalar_t, V>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  opmath_t* inverse_scale = reinterpret_cast<opmath_t*>(shared_bytes);
  cache_scales(log_scale, features, opmath_t(-1), inverse_scale);
  const int lane = threadIdx.x % kWarpSize;
  const int64_t packs = features / V;
  for (int64_t b = warp_first_row(); b < batch; b += warp_row_step()) {
    const Values* zr = reinterpret_cast<const Values*>(z + b * z_row_stride);
    Values* hr = reinterpret_cast<Values*>(h + b * features);
#pragma unroll 2
    for (int64_t p = lane; p < packs; p += kWarpSize) {
      const Values zv = zr[p];
      Values hv;
#pragma unroll
      for (int e = 0; e < V; ++e) hv.v[e] = static_cast<scalar_t>(opmath_t(zv.v[e]) * inverse_scale[p * V + e]);
      hr[p] = hv;
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
    if (cuda_kernel_version(RowKernelOp::ScalePrior) == 2 && scales_fit_in_shared_memory<scalar_t>(features)) {
      const size_t shared = features * sizeof(opmath_t);
      // Packs of 16 bytes whenever they divide the row (z, allocated here, is aligned for them), read in
      // one access where h is aligned too: log_prob is then the same for every layout of h.
      with_row_packs<scalar_t>(features, rows_aligned_for_packs<scalar_t>(h), [&](auto pack, auto aligned_loads) {
        constexpr int V = decltype(pack)::value;
        constexpr bool kAligned = decltype(aligned_loads)::value;
        auto launch = [&](auto kernel) {
          kernel<<<row_blocks(batch), kRowBlockThreads, shared, stream>>>(
              h.const_data_ptr<scalar_t>(), h.stride(0), log_scale.const_data_ptr<scalar_t>(),
              z.defined() ? z.mutable_data_ptr<scalar_t>() : nullptr, log_prob.mutable_data_ptr<opmath_t>(), batch,
              features);
        };
        if (prior == Prior::Logistic) {
          launch(scale_prior_rows_kernel<scalar_t, Prior::Logistic, V, kAligned>);
        } else {
          launch(scale_prior_rows_kernel<scalar_t, Prior::Gaussian, V, kAligned>);
        }
      });
      return;
    }
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
    auto launch = [&](auto kernel, dim3 grid, int threads) {
      kernel<<<grid, threads, 0, stream>>>(
          grad_log_prob.const_data_ptr<opmath_t>(), grad_z.defined() ? grad_z.const_data_ptr<scalar_t>() : nullptr,
          grad_z.defined() ? grad_z.stride(0) : 0, h.const_data_ptr<scalar_t>(), h.stride(0),
          log_scale.const_data_ptr<scalar_t>(), grad_h.mutable_data_ptr<scalar_t>(),
          partial.mutable_data_ptr<opmath_t>(), batch, features, rows_per_chunk);
    };
    if (cuda_kernel_version(RowKernelOp::ScalePrior) == 2) {
      // Packs of 16 bytes whenever they divide the row (grad_h, allocated by the entry point, is aligned for
      // them), read in one access where h and grad_z are aligned too.
      const bool aligned =
          rows_aligned_for_packs<scalar_t>(h) && (!grad_z.defined() || rows_aligned_for_packs<scalar_t>(grad_z));
      with_row_packs<scalar_t>(features, aligned, [&](auto pack, auto aligned_loads) {
        constexpr int V = decltype(pack)::value;
        constexpr bool kAligned = decltype(aligned_loads)::value;
        const dim3 grid((features / V + kBackwardTilePacks - 1) / kBackwardTilePacks, chunks);
        if (prior == Prior::Logistic) {
          launch(scale_prior_backward_packs_kernel<scalar_t, Prior::Logistic, V, kAligned>, grid, kRowBlockThreads);
        } else {
          launch(scale_prior_backward_packs_kernel<scalar_t, Prior::Gaussian, V, kAligned>, grid, kRowBlockThreads);
        }
      });
    } else if (prior == Prior::Logistic) {
      launch(scale_prior_backward_kernel<scalar_t, Prior::Logistic>, dim3(column_blocks, chunks), kColumnThreads);
    } else {
      launch(scale_prior_backward_kernel<scalar_t, Prior::Gaussian>, dim3(column_blocks, chunks), kColumnThreads);
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
    if (cuda_kernel_version(RowKernelOp::ScalePrior) == 2 && scales_fit_in_shared_memory<scalar_t>(features)) {
      const size_t shared = features * sizeof(at::opmath_type<scalar_t>);
      with_pack_width<scalar_t>(row_pack_width<scalar_t>(z.const_data_ptr(), z.stride(0), features), [&](auto pack) {
        scale_inverse_rows_kernel<scalar_t, decltype(pack)::value><<<row_blocks(batch), kRowBlockThreads, shared, stream>>>(
            z.const_data_ptr<scalar_t>(), z.stride(0), log_scale.const_data_ptr<scalar_t>(),
            h.mutable_data_ptr<scalar_t>(), batch, features);
      });
      return;
    }
    scale_inverse_kernel<scalar_t><<<grid_for(batch, 2048 / kRowThreads), kRowThreads, 0, stream>>>(
        z.const_data_ptr<scalar_t>(), z.stride(0), log_scale.const_data_ptr<scalar_t>(),
        h.mutable_data_ptr<scalar_t>(), batch, features);
  });
  return launch_error();
}

}  // namespace nice_ext
