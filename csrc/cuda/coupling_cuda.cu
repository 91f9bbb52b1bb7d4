// CUDA kernels of the masked additive coupling update (schema: csrc/ops.cpp; entry point and checks:
// csrc/coupling.cpp; CPU twin: csrc/cpu/coupling_cpu.cpp). One block walks a row at a time: y and the next layer's gathered input
// are written in the same pass, so a coupling layer reads x once and writes it once.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/macros/Macros.h>

#include "cuda/coupling_rows.cuh"
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

// ---------------------------------------------------------------------------------------------------
// Version 2 (benchmarks/NOTES.md): a warp per row, so no block barrier per row, and each lane moving V
// consecutive features per access (16 bytes of x and y, V entries of shift_col). V = 1 takes any layout.
// The shift is read one element at a time (its columns are scattered over the row by the mask).
// Each block first puts the inverse of gather_index in shared memory (inverse_gather_map), so that both
// kernels make one pass over a row: a feature goes to the next layer's input (forward), or takes its
// gradient from it (backward), as it is moved. A second pass that read the row back, as version 1 makes,
// fell out of L1 at 3072 features with a row per warp (benchmarks/NOTES.md). The table needs features
// int32 of shared memory (feature_table_fits); wider rows take version 1.
// ---------------------------------------------------------------------------------------------------

// The odd/even rows (find_odd_even_maps): pack p of a row (V features from p * V, an even feature)
// updates the features of parity maps.first with shift columns p * V / 2 ... p * V / 2 + V / 2 - 1 and
// gives the next layer the features of parity maps.start at its inputs p * V / 2 ...: half packs of shift
// and gathered, read and written in one access each (halves_aligned), and no index loads. The parities are
// runtime values, uniform over the grid: they choose between registers (selects), never index them. Each
// element is computed as the general loop computes it, so the results are the same bit for bit.
template <typename scalar_t, int V>
__device__ __forceinline__ void coupling_update_odd_even_rows(
    const scalar_t* __restrict__ x, int64_t x_row_stride, const scalar_t* __restrict__ shift,
    int64_t shift_row_stride, scalar_t* __restrict__ y, scalar_t* __restrict__ gathered, int64_t batch,
    int64_t features, int64_t gathered_n, at::opmath_type<scalar_t> sign, OddEvenMaps maps) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int H = V / 2;
  using Values = Pack<scalar_t, V>;
  using Halves = Pack<scalar_t, H>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t packs = features / V;
  for (int64_t b = warp_first_row(); b < batch; b += warp_row_step()) {
    const Values* xr = reinterpret_cast<const Values*>(x + b * x_row_stride);
    const Halves* sr = reinterpret_cast<const Halves*>(shift + b * shift_row_stride);
    Values* yr = reinterpret_cast<Values*>(y + b * features);
    Halves* gr = reinterpret_cast<Halves*>(gathered + b * gathered_n);
#pragma unroll 2
    for (int64_t p = lane; p < packs; p += kWarpSize) {
      const Values xv = xr[p];
      const Halves s = sr[p];
      Values yv;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        yv.v[e] = (e & 1) == maps.first ? static_cast<scalar_t>(opmath_t(xv.v[e]) + sign * opmath_t(s.v[e / 2]))
                                        : xv.v[e];
      }
      yr[p] = yv;
      if (gathered_n > 0) gr[p] = elements_of_parity(yv, maps.start);
    }
  }
}

// The backward of the odd/even rows: grad_x = grad_y plus the next layer's gradient at the gathered
// features, grad_shift the signed grad_x of the updated ones, in half packs as in the forward.
template <typename scalar_t, int V>
__device__ __forceinline__ void coupling_update_backward_odd_even_rows(
    const scalar_t* __restrict__ grad_y, int64_t gy_row_stride, const scalar_t* __restrict__ grad_gathered,
    int64_t gg_row_stride, int64_t gathered_n, scalar_t* __restrict__ grad_x, scalar_t* __restrict__ grad_shift,
    int64_t batch, int64_t features, int64_t updated, at::opmath_type<scalar_t> sign, OddEvenMaps maps) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int H = V / 2;
  using Values = Pack<scalar_t, V>;
  using Halves = Pack<scalar_t, H>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t packs = features / V;
  for (int64_t b = warp_first_row(); b < batch; b += warp_row_step()) {
    const Values* gyr = reinterpret_cast<const Values*>(grad_y + b * gy_row_stride);
    const Halves* ggr = gathered_n > 0 ? reinterpret_cast<const Halves*>(grad_gathered + b * gg_row_stride) : nullptr;
    Values* gxr = reinterpret_cast<Values*>(grad_x + b * features);
    Halves* gsr = reinterpret_cast<Halves*>(grad_shift + b * updated);
#pragma unroll 2
    for (int64_t p = lane; p < packs; p += kWarpSize) {
      const Values g = gyr[p];
      Halves gg;
      if (gathered_n > 0) gg = ggr[p];
      opmath_t total[V];
#pragma unroll
      for (int e = 0; e < V; ++e) {
        // As the general loop sums: g alone where nothing was gathered (adding 0 would turn -0 into +0).
        total[e] = gathered_n > 0 && (e & 1) == maps.start ? opmath_t(g.v[e]) + opmath_t(gg.v[e / 2])
                                                           : opmath_t(g.v[e]);
      }
      Values gx;
      Halves gs;
#pragma unroll
      for (int e = 0; e < V; ++e) gx.v[e] = static_cast<scalar_t>(total[e]);
#pragma unroll
      for (int i = 0; i < H; ++i) {
        gs.v[i] = static_cast<scalar_t>(sign * (maps.first == 0 ? total[2 * i] : total[2 * i + 1]));
      }
      gxr[p] = gx;
      gsr[p] = gs;
    }
  }
}

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kRowBlockThreads)
    coupling_update_rows_kernel(const scalar_t* __restrict__ x, int64_t x_row_stride,
                                const scalar_t* __restrict__ shift, int64_t shift_row_stride,
                                const int32_t* __restrict__ shift_col, const int32_t* __restrict__ gather_index,
                                scalar_t* __restrict__ y, scalar_t* __restrict__ gathered, int64_t batch,
                                int64_t features, int64_t updated, int64_t gathered_n, bool inverse,
                                bool halves_aligned) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Values = Pack<scalar_t, V>;
  using Indices = Pack<int32_t, V>;
  const opmath_t sign = inverse ? opmath_t(-1) : opmath_t(1);
  if constexpr (V % 2 == 0) {
    const OddEvenMaps maps = find_odd_even_maps(shift_col, gather_index, features, updated, gathered_n);
    if (maps.found() && halves_aligned) {  // the same for the whole block
      coupling_update_odd_even_rows<scalar_t, V>(x, x_row_stride, shift, shift_row_stride, y, gathered, batch,
                                                 features, gathered_n, sign, maps);
      return;
    }
  }
  extern __shared__ __align__(32) unsigned char shared_bytes[];  // read in packs of up to 8 int32
  int32_t* slot = reinterpret_cast<int32_t*>(shared_bytes);
  const bool repeats = inverse_gather_map(gather_index, gathered_n, features, slot);
  const int lane = threadIdx.x % kWarpSize;
  const int64_t packs = features / V;  // V divides features (row_pack_width)
  for (int64_t b = warp_first_row(); b < batch; b += warp_row_step()) {
    const scalar_t* xr = x + b * x_row_stride;
    const scalar_t* sr = shift + b * shift_row_stride;
    auto updated_value = [&](int32_t c, scalar_t xv) {
      CUDA_KERNEL_ASSERT(c < updated && "shift_col out of range");
      return c < 0 ? xv : static_cast<scalar_t>(opmath_t(xv) + sign * opmath_t(sr[c]));
    };
    Values* yr = reinterpret_cast<Values*>(y + b * features);
    scalar_t* gr = gathered + b * gathered_n;
#pragma unroll 2
    for (int64_t p = lane; p < packs; p += kWarpSize) {
      const Values xv = reinterpret_cast<const Values*>(xr)[p];
      const Indices cols = reinterpret_cast<const Indices*>(shift_col)[p];
      const Indices slots = reinterpret_cast<const Indices*>(slot)[p];  // a 16-byte read: no bank conflicts
      Values yv;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        yv.v[e] = updated_value(cols.v[e], xv.v[e]);
        if (slots.v[e] >= 0 && !repeats) gr[slots.v[e]] = yv.v[e];
      }
      yr[p] = yv;
    }
    if (repeats) {  // a feature goes to several columns of gathered: each recomputed from x
      for (int64_t k = lane; k < gathered_n; k += kWarpSize) {
        const int32_t j = gather_index[k];
        gr[k] = updated_value(shift_col[j], xr[j]);
      }
    }
  }
}

// The backward in one pass: a lane adds the gathered gradient to a feature as it moves it, and writes
// grad_x and grad_shift once. The sums are version 1's, so the results are bit for bit the same.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kRowBlockThreads)
    coupling_update_backward_rows_kernel(const scalar_t* __restrict__ grad_y, int64_t gy_row_stride,
                                         const scalar_t* __restrict__ grad_gathered, int64_t gg_row_stride,
                                         int64_t gathered_n, const int32_t* __restrict__ shift_col,
                                         const int32_t* __restrict__ gather_index, scalar_t* __restrict__ grad_x,
                                         scalar_t* __restrict__ grad_shift, int64_t batch, int64_t features,
                                         int64_t updated, bool inverse, bool halves_aligned) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Values = Pack<scalar_t, V>;
  using Indices = Pack<int32_t, V>;
  const opmath_t sign = inverse ? opmath_t(-1) : opmath_t(1);
  if constexpr (V % 2 == 0) {
    const OddEvenMaps maps = find_odd_even_maps(shift_col, gather_index, features, updated, gathered_n);
    if (maps.found() && halves_aligned) {  // the same for the whole block
      coupling_update_backward_odd_even_rows<scalar_t, V>(grad_y, gy_row_stride, grad_gathered, gg_row_stride,
                                                          gathered_n, grad_x, grad_shift, batch, features,
                                                          updated, sign, maps);
      return;
    }
  }
  extern __shared__ __align__(32) unsigned char shared_bytes[];  // read in packs of up to 8 int32
  const int32_t* slot = backward_gather_slots(gather_index, gathered_n, features, shared_bytes);
  const int lane = threadIdx.x % kWarpSize;
  const int64_t packs = features / V;
  for (int64_t b = warp_first_row(); b < batch; b += warp_row_step()) {
    const Values* gyr = reinterpret_cast<const Values*>(grad_y + b * gy_row_stride);
    const scalar_t* ggr = gathered_n > 0 ? grad_gathered + b * gg_row_stride : nullptr;
    Values* gxr = reinterpret_cast<Values*>(grad_x + b * features);
    scalar_t* gsr = grad_shift + b * updated;
#pragma unroll 2
    for (int64_t p = lane; p < packs; p += kWarpSize) {
      const Values g = gyr[p];
      const Indices cols = reinterpret_cast<const Indices*>(shift_col)[p];
      const Indices slots = reinterpret_cast<const Indices*>(slot)[p];  // a 16-byte read: no bank conflicts
      Values gx;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const int32_t k = slots.v[e];
        const opmath_t total = k < 0 ? opmath_t(g.v[e]) : opmath_t(g.v[e]) + opmath_t(ggr[k]);
        gx.v[e] = static_cast<scalar_t>(total);
        const int32_t c = cols.v[e];
        CUDA_KERNEL_ASSERT(c < updated && "shift_col out of range");
        if (c >= 0) gsr[c] = static_cast<scalar_t>(sign * total);
      }
      gxr[p] = gx;
    }
  }
}

// width, or 1 when the index map's pointer is not aligned for packs of width int32 entries.
int index_map_pack_width(int width, const at::Tensor& map) {
  return aligned_to(map.const_data_ptr<int32_t>(), int64_t(sizeof(int32_t)) * width) ? width : 1;
}

}  // namespace

const char* coupling_update_kernel_cuda(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& shift_col,
                                        const at::Tensor& gather_index, bool inverse, at::Tensor& y,
                                        at::Tensor& gathered) {
  const int64_t batch = x.size(0), features = x.size(1), updated = shift.size(1), gathered_n = gather_index.size(0);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "coupling_update_cuda", [&] {
    if (cuda_kernel_version(RowKernelOp::Coupling) == 2 && feature_table_fits(features, sizeof(int32_t))) {
      const int width = index_map_pack_width(row_pack_width<scalar_t>(x.const_data_ptr(), x.stride(0), features),
                                             shift_col);
      with_pack_width<scalar_t>(width, [&](auto pack) {
        constexpr int half = decltype(pack)::value / 2 > 0 ? decltype(pack)::value / 2 : 1;
        const bool halves_aligned =
            rows_in_packs_of<scalar_t>(shift.const_data_ptr(), shift.stride(0), updated, half) &&
            rows_in_packs_of<scalar_t>(gathered.const_data_ptr(), gathered_n, gathered_n, half);
        coupling_update_rows_kernel<scalar_t, decltype(pack)::value>
            <<<row_blocks(batch), kRowBlockThreads, features * sizeof(int32_t), stream>>>(
                x.const_data_ptr<scalar_t>(), x.stride(0), shift.const_data_ptr<scalar_t>(), shift.stride(0),
                shift_col.const_data_ptr<int32_t>(), gather_index.const_data_ptr<int32_t>(),
                y.mutable_data_ptr<scalar_t>(), gathered.mutable_data_ptr<scalar_t>(), batch, features, updated,
                gathered_n, inverse, halves_aligned);
      });
      return;
    }
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
    if (cuda_kernel_version(RowKernelOp::Coupling) == 2 && feature_table_fits(features, sizeof(int32_t))) {
      const int width = index_map_pack_width(row_pack_width<scalar_t>(grad_y.const_data_ptr(), grad_y.stride(0), features),
                                             shift_col);
      with_pack_width<scalar_t>(width, [&](auto pack) {
        constexpr int half = decltype(pack)::value / 2 > 0 ? decltype(pack)::value / 2 : 1;
        const bool halves_aligned =
            rows_in_packs_of<scalar_t>(grad_shift.const_data_ptr(), updated, updated, half) &&
            (!has_gathered || rows_in_packs_of<scalar_t>(grad_gathered.const_data_ptr(), grad_gathered.stride(0),
                                                         grad_gathered.size(1), half));
        coupling_update_backward_rows_kernel<scalar_t, decltype(pack)::value>
            <<<row_blocks(batch), kRowBlockThreads, features * sizeof(int32_t), stream>>>(
                grad_y.const_data_ptr<scalar_t>(), grad_y.stride(0),
                has_gathered ? grad_gathered.const_data_ptr<scalar_t>() : nullptr,
                has_gathered ? grad_gathered.stride(0) : 0, has_gathered ? gather_index.size(0) : 0,
                shift_col.const_data_ptr<int32_t>(), gather_index.const_data_ptr<int32_t>(),
                grad_x.mutable_data_ptr<scalar_t>(), grad_shift.mutable_data_ptr<scalar_t>(), batch, features,
                updated, inverse, halves_aligned);
      });
      return;
    }
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
