// CUDA kernels of the masked affine coupling update (schema: csrc/ops.cpp; entry point and checks:
// csrc/affine_coupling.cpp; CPU twin: csrc/cpu/affine_coupling_cpu.cpp). Version 1: one block walks a
// row at a time; y, the row's log|det| (a block reduction) and the next layer's gathered input are written
// in the same pass, so a coupling layer reads x once and writes it once. Version 2: the additive
// coupling's version 2 design (csrc/cuda/coupling_cuda.cu), a warp per row in one pass with 16-byte packs.
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

template <typename T>
__device__ inline T affine_log_scale(AffineLaw law, T raw) {
  return law == AffineLaw::Tanh ? tanh_(raw) : raw;
}

// One updated feature of the forward, in both versions (so that their y agree bit for bit): returns
// y = x e^a + b, or (x - b) e^-a for the inverse, with the log-scale a = law(raw), which it adds to
// log_det_sum.
template <typename opmath_t>
__device__ inline opmath_t affine_forward_element(AffineLaw law, bool inverse, opmath_t x, opmath_t raw, opmath_t b,
                                                  opmath_t& log_det_sum) {
  const opmath_t a = affine_log_scale(law, raw);
  log_det_sum += a;
  return inverse ? (x - b) * exp_(-a) : x * exp_(a) + b;
}

// One updated feature of the backward, in both versions (so that their gradients agree bit for bit):
// g = dL/dy, already summed with the gathered copy's gradient and rounded to the input's dtype.
template <typename opmath_t>
__device__ inline AffineGrads<opmath_t> affine_backward_element(AffineLaw law, bool inverse, opmath_t g, opmath_t x,
                                                                opmath_t raw, opmath_t b, opmath_t grad_log_det) {
  const opmath_t a = affine_log_scale(law, raw);
  return affine_coupling_grads(law, inverse, g, x, b, a, exp_(inverse ? -a : a), grad_log_det);
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
      yr[j] = static_cast<scalar_t>(
          affine_forward_element(law, inverse, opmath_t(xr[j]), opmath_t(rr[c]), opmath_t(sr[c]), sum));
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
      const AffineGrads<opmath_t> grads = affine_backward_element(law, inverse, opmath_t(gxr[j]), opmath_t(xr[j]),
                                                                  opmath_t(rr[c]), opmath_t(sr[c]), gld);
      gxr[j] = static_cast<scalar_t>(grads.x);
      grr[c] = static_cast<scalar_t>(grads.log_scale_raw);
      gsr[c] = static_cast<scalar_t>(grads.shift);
    }
    // The next row's passes touch other rows only: no barrier needed here.
  }
}

// ---------------------------------------------------------------------------------------------------
// Version 2 (benchmarks/NOTES.md): the additive coupling's version 2 design. A warp per row, no block
// barrier per row; each lane moves packs of V consecutive features (16 bytes of x, y, grad_y, grad_x,
// and V entries of shift_col); the log-scales and shifts are read an element at a time (the mask scatters
// their columns over the row). Each block first puts the inverse of gather_index in shared memory
// (inverse_gather_map), so that a row is read once: a feature goes to the next layer's input (forward),
// or takes its gradient from it (backward), as it is moved. Rows are cut into the same packs whatever
// their layout (with_row_packs; unaligned ones are read an element at a time), so a row's log|det| is
// summed in one order: the same for every layout, deterministic, and another order than version 1's.
// The table needs features int32 of shared memory (feature_table_fits); wider rows take version 1.
// ---------------------------------------------------------------------------------------------------
// The odd/even rows (find_odd_even_maps, csrc/cuda/coupling_rows.cuh), as in the additive coupling: pack
// p of a row (V features from the even feature p * V) updates the features of parity maps.first with the
// log-scales and shifts of columns p * V / 2 ... p * V / 2 + V / 2 - 1, read in half packs, and gives the
// next layer the features of parity maps.start in a half pack: no index loads. The parities are runtime
// values, uniform over the grid (branches every lane takes alike). Each element's math and the order of the
// row's log|det| sum (pack by pack, element by element, then warp_sum) are the general loop's, so the
// results are the same bit for bit.
template <typename scalar_t, int V, typename opmath_t>
__device__ __forceinline__ void affine_coupling_update_odd_even_rows(
    const scalar_t* __restrict__ x, int64_t x_row_stride, const scalar_t* __restrict__ log_scale_raw,
    int64_t r_row_stride, const scalar_t* __restrict__ shift, int64_t s_row_stride, scalar_t* __restrict__ y,
    scalar_t* __restrict__ gathered, opmath_t* __restrict__ log_det, int64_t batch, int64_t features,
    int64_t gathered_n, AffineLaw law, bool inverse, OddEvenMaps maps) {
  constexpr int H = V / 2;
  using Values = Pack<scalar_t, V>;
  using Halves = Pack<scalar_t, H>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t packs = features / V;
  for (int64_t b = warp_first_row(); b < batch; b += warp_row_step()) {
    const Values* xr = reinterpret_cast<const Values*>(x + b * x_row_stride);
    const Halves* rr = reinterpret_cast<const Halves*>(log_scale_raw + b * r_row_stride);
    const Halves* sr = reinterpret_cast<const Halves*>(shift + b * s_row_stride);
    Values* yr = reinterpret_cast<Values*>(y + b * features);
    Halves* gr = reinterpret_cast<Halves*>(gathered + b * gathered_n);
    opmath_t sum = 0;
#pragma unroll 2
    for (int64_t p = lane; p < packs; p += kWarpSize) {
      const Values xv = xr[p];
      const Halves r = rr[p], s = sr[p];
      Values yv;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        yv.v[e] = (e & 1) == maps.first ? static_cast<scalar_t>(affine_forward_element(
                                              law, inverse, opmath_t(xv.v[e]), opmath_t(r.v[e / 2]),
                                              opmath_t(s.v[e / 2]), sum))
                                        : xv.v[e];
      }
      yr[p] = yv;
      if (gathered_n > 0) gr[p] = elements_of_parity(yv, maps.start);
    }
    const opmath_t total = warp_sum(sum);
    if (lane == 0) log_det[b] = inverse ? -total : total;
  }
}

// The backward of the odd/even rows: the general loop's arithmetic, element by element, with the next
// layer's gradient, the log-scales and the shifts read, and their gradients written, in half packs.
template <typename scalar_t, int V, typename opmath_t>
__device__ __forceinline__ void affine_coupling_update_backward_odd_even_rows(
    const scalar_t* __restrict__ grad_y, int64_t gy_row_stride, const scalar_t* __restrict__ grad_gathered,
    int64_t gg_row_stride, int64_t gathered_n, const opmath_t* __restrict__ grad_log_det,
    const scalar_t* __restrict__ x, int64_t x_row_stride, const scalar_t* __restrict__ log_scale_raw,
    int64_t r_row_stride, const scalar_t* __restrict__ shift, int64_t s_row_stride, scalar_t* __restrict__ grad_x,
    scalar_t* __restrict__ grad_log_scale_raw, scalar_t* __restrict__ grad_shift, int64_t batch, int64_t features,
    int64_t updated, AffineLaw law, bool inverse, OddEvenMaps maps) {
  constexpr int H = V / 2;
  using Values = Pack<scalar_t, V>;
  using Halves = Pack<scalar_t, H>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t packs = features / V;
  for (int64_t b = warp_first_row(); b < batch; b += warp_row_step()) {
    const Values* gyr = reinterpret_cast<const Values*>(grad_y + b * gy_row_stride);
    const Halves* ggr = gathered_n > 0 ? reinterpret_cast<const Halves*>(grad_gathered + b * gg_row_stride) : nullptr;
    const opmath_t gld = grad_log_det != nullptr ? grad_log_det[b] : opmath_t(0);
    const Values* xr = reinterpret_cast<const Values*>(x + b * x_row_stride);
    const Halves* rr = reinterpret_cast<const Halves*>(log_scale_raw + b * r_row_stride);
    const Halves* sr = reinterpret_cast<const Halves*>(shift + b * s_row_stride);
    Values* gxr = reinterpret_cast<Values*>(grad_x + b * features);
    Halves* grr = reinterpret_cast<Halves*>(grad_log_scale_raw + b * updated);
    Halves* gsr = reinterpret_cast<Halves*>(grad_shift + b * updated);
    // Two packs in flight per lane, as in the general loop, except for 16-bit types: the math of two
    // 8-element packs needs more than 80 registers (ptxas spilled 24 bytes; one pack: 71, no spill).
    constexpr int kUnroll = sizeof(scalar_t) == 2 ? 1 : 2;
#pragma unroll kUnroll
    for (int64_t p = lane; p < packs; p += kWarpSize) {
      const Values gv = gyr[p], xv = xr[p];
      const Halves r = rr[p], s = sr[p];
      Halves gg;
      if (gathered_n > 0) gg = ggr[p];
      Values gx;
      Halves grad_r, grad_s;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const scalar_t g = gathered_n > 0 && (e & 1) == maps.start
                               ? static_cast<scalar_t>(opmath_t(gv.v[e]) + opmath_t(gg.v[e / 2]))
                               : gv.v[e];
        if ((e & 1) != maps.first) {
          gx.v[e] = g;
          continue;
        }
        const AffineGrads<opmath_t> grads = affine_backward_element(
            law, inverse, opmath_t(g), opmath_t(xv.v[e]), opmath_t(r.v[e / 2]), opmath_t(s.v[e / 2]), gld);
        gx.v[e] = static_cast<scalar_t>(grads.x);
        grad_r.v[e / 2] = static_cast<scalar_t>(grads.log_scale_raw);
        grad_s.v[e / 2] = static_cast<scalar_t>(grads.shift);
      }
      gxr[p] = gx;
      grr[p] = grad_r;
      gsr[p] = grad_s;
    }
  }
}

template <typename scalar_t, int V, bool kAligned, typename opmath_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kRowBlockThreads)
    affine_coupling_update_rows_kernel(const scalar_t* __restrict__ x, int64_t x_row_stride,
                                       const scalar_t* __restrict__ log_scale_raw, int64_t r_row_stride,
                                       const scalar_t* __restrict__ shift, int64_t s_row_stride,
                                       const int32_t* __restrict__ shift_col, const int32_t* __restrict__ gather_index,
                                       scalar_t* __restrict__ y, scalar_t* __restrict__ gathered,
                                       opmath_t* __restrict__ log_det, int64_t batch, int64_t features,
                                       int64_t updated, int64_t gathered_n, AffineLaw law, bool inverse,
                                       bool halves_aligned) {
  using Values = Pack<scalar_t, V>;
  using Indices = Pack<int32_t, V>;
  if constexpr (V % 2 == 0 && kAligned) {
    const OddEvenMaps maps = find_odd_even_maps(shift_col, gather_index, features, updated, gathered_n);
    if (maps.found() && halves_aligned) {  // the same for the whole block
      affine_coupling_update_odd_even_rows<scalar_t, V>(x, x_row_stride, log_scale_raw, r_row_stride, shift,
                                                        s_row_stride, y, gathered, log_det, batch, features,
                                                        gathered_n, law, inverse, maps);
      return;
    }
  }
  extern __shared__ __align__(32) unsigned char shared_bytes[];  // read in packs of up to 8 int32
  int32_t* slot = reinterpret_cast<int32_t*>(shared_bytes);
  const bool repeats = inverse_gather_map(gather_index, gathered_n, features, slot);
  const int lane = threadIdx.x % kWarpSize;
  const int64_t packs = features / V;  // V divides features (with_row_packs)
  for (int64_t b = warp_first_row(); b < batch; b += warp_row_step()) {
    const scalar_t* xr = x + b * x_row_stride;
    const scalar_t* rr = log_scale_raw + b * r_row_stride;
    const scalar_t* sr = shift + b * s_row_stride;
    // y of feature j, from its column c of the log-scales and shifts (-1: a kept feature).
    auto output = [&](int32_t c, scalar_t xv, opmath_t& sum) {
      CUDA_KERNEL_ASSERT(c < updated && "shift_col out of range");
      if (c < 0) return xv;
      return static_cast<scalar_t>(
          affine_forward_element(law, inverse, opmath_t(xv), opmath_t(rr[c]), opmath_t(sr[c]), sum));
    };
    Values* yr = reinterpret_cast<Values*>(y + b * features);
    scalar_t* gr = gathered + b * gathered_n;
    opmath_t sum = 0;
#pragma unroll 2
    for (int64_t p = lane; p < packs; p += kWarpSize) {
      const Values xv = load_pack<V, kAligned>(xr, p);
      const Indices cols = load_pack<V, kAligned>(shift_col, p);
      const Indices slots = reinterpret_cast<const Indices*>(slot)[p];  // a 16-byte read: no bank conflicts
      Values yv;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        yv.v[e] = output(cols.v[e], xv.v[e], sum);
        if (slots.v[e] >= 0 && !repeats) gr[slots.v[e]] = yv.v[e];
      }
      yr[p] = yv;
    }
    const opmath_t total = warp_sum(sum);
    if (lane == 0) log_det[b] = inverse ? -total : total;
    if (repeats) {  // a feature goes to several columns of gathered: each recomputed from x
      opmath_t unused = 0;
      for (int64_t k = lane; k < gathered_n; k += kWarpSize) {
        const int32_t j = gather_index[k];
        gr[k] = output(shift_col[j], xr[j], unused);
      }
    }
  }
}

// The backward in one pass: a lane adds the gathered gradient to a feature as it moves it (rounded to
// the dtype, as version 1 stores the sum before reading it back), and writes grad_x, grad(log_scale_raw)
// and grad_shift once. No sums over the row: bit for bit version 1's results.
template <typename scalar_t, int V, bool kAligned, typename opmath_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kRowBlockThreads) affine_coupling_update_backward_rows_kernel(
    const scalar_t* __restrict__ grad_y, int64_t gy_row_stride, const scalar_t* __restrict__ grad_gathered,
    int64_t gg_row_stride, int64_t gathered_n, const opmath_t* __restrict__ grad_log_det,
    const scalar_t* __restrict__ x, int64_t x_row_stride, const scalar_t* __restrict__ log_scale_raw,
    int64_t r_row_stride, const scalar_t* __restrict__ shift, int64_t s_row_stride,
    const int32_t* __restrict__ shift_col, const int32_t* __restrict__ gather_index, scalar_t* __restrict__ grad_x,
    scalar_t* __restrict__ grad_log_scale_raw, scalar_t* __restrict__ grad_shift, int64_t batch, int64_t features,
    int64_t updated, AffineLaw law, bool inverse, bool halves_aligned) {
  using Values = Pack<scalar_t, V>;
  using Indices = Pack<int32_t, V>;
  if constexpr (V % 2 == 0 && kAligned) {
    const OddEvenMaps maps = find_odd_even_maps(shift_col, gather_index, features, updated, gathered_n);
    if (maps.found() && halves_aligned) {  // the same for the whole block
      affine_coupling_update_backward_odd_even_rows<scalar_t, V>(
          grad_y, gy_row_stride, grad_gathered, gg_row_stride, gathered_n, grad_log_det, x, x_row_stride,
          log_scale_raw, r_row_stride, shift, s_row_stride, grad_x, grad_log_scale_raw, grad_shift, batch, features,
          updated, law, inverse, maps);
      return;
    }
  }
  extern __shared__ __align__(32) unsigned char shared_bytes[];  // read in packs of up to 8 int32
  const int32_t* slot = backward_gather_slots(gather_index, gathered_n, features, shared_bytes);
  const int lane = threadIdx.x % kWarpSize;
  const int64_t packs = features / V;
  for (int64_t b = warp_first_row(); b < batch; b += warp_row_step()) {
    const scalar_t* gyr = grad_y + b * gy_row_stride;
    const scalar_t* ggr = gathered_n > 0 ? grad_gathered + b * gg_row_stride : nullptr;
    const opmath_t gld = grad_log_det != nullptr ? grad_log_det[b] : opmath_t(0);
    const scalar_t* xr = x + b * x_row_stride;
    const scalar_t* rr = log_scale_raw + b * r_row_stride;
    const scalar_t* sr = shift + b * s_row_stride;
    Values* gxr = reinterpret_cast<Values*>(grad_x + b * features);
    scalar_t* grr = grad_log_scale_raw + b * updated;
    scalar_t* gsr = grad_shift + b * updated;
#pragma unroll 2
    for (int64_t p = lane; p < packs; p += kWarpSize) {
      const Values gv = load_pack<V, kAligned>(gyr, p);
      const Values xv = load_pack<V, kAligned>(xr, p);
      const Indices cols = load_pack<V, kAligned>(shift_col, p);
      const Indices slots = reinterpret_cast<const Indices*>(slot)[p];
      Values gx;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const int32_t k = slots.v[e];
        const scalar_t g = k < 0 ? gv.v[e] : static_cast<scalar_t>(opmath_t(gv.v[e]) + opmath_t(ggr[k]));
        const int32_t c = cols.v[e];
        CUDA_KERNEL_ASSERT(c < updated && "shift_col out of range");
        if (c < 0) {
          gx.v[e] = g;
          continue;
        }
        const AffineGrads<opmath_t> grads =
            affine_backward_element(law, inverse, opmath_t(g), opmath_t(xv.v[e]), opmath_t(rr[c]), opmath_t(sr[c]), gld);
        gx.v[e] = static_cast<scalar_t>(grads.x);
        grr[c] = static_cast<scalar_t>(grads.log_scale_raw);
        gsr[c] = static_cast<scalar_t>(grads.shift);
      }
      gxr[p] = gx;
    }
  }
}

// Whether shift_col can be read in packs of V entries where the rows are read in packs.
template <typename scalar_t>
bool index_map_aligned_for_packs(const at::Tensor& map) {
  return aligned_to(map.const_data_ptr<int32_t>(), int64_t(sizeof(int32_t)) * (kVectorBytes / sizeof(scalar_t)));
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
    if (cuda_kernel_version(RowKernelOp::AffineCoupling) == 2 && feature_table_fits(features, sizeof(int32_t))) {
      const bool aligned = rows_aligned_for_packs<scalar_t>(x) && index_map_aligned_for_packs<scalar_t>(shift_col);
      with_row_packs<scalar_t>(features, aligned, [&](auto pack, auto aligned_loads) {
        constexpr int half = decltype(pack)::value / 2 > 0 ? decltype(pack)::value / 2 : 1;
        const bool halves_aligned =
            rows_in_packs_of<scalar_t>(log_scale_raw.const_data_ptr(), log_scale_raw.stride(0), updated, half) &&
            rows_in_packs_of<scalar_t>(shift.const_data_ptr(), shift.stride(0), updated, half) &&
            rows_in_packs_of<scalar_t>(gathered.const_data_ptr(), gathered_n, gathered_n, half);
        affine_coupling_update_rows_kernel<scalar_t, decltype(pack)::value, decltype(aligned_loads)::value>
            <<<row_blocks(batch), kRowBlockThreads, features * sizeof(int32_t), stream>>>(
                x.const_data_ptr<scalar_t>(), x.stride(0), log_scale_raw.const_data_ptr<scalar_t>(),
                log_scale_raw.stride(0), shift.const_data_ptr<scalar_t>(), shift.stride(0),
                shift_col.const_data_ptr<int32_t>(), gather_index.const_data_ptr<int32_t>(),
                y.mutable_data_ptr<scalar_t>(), gathered.mutable_data_ptr<scalar_t>(),
                log_det.mutable_data_ptr<opmath_t>(), batch, features, updated, gathered_n, law, inverse,
                halves_aligned);
      });
      return;
    }
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
    if (cuda_kernel_version(RowKernelOp::AffineCoupling) == 2 && feature_table_fits(features, sizeof(int32_t))) {
      const bool aligned = rows_aligned_for_packs<scalar_t>(grad_y) && rows_aligned_for_packs<scalar_t>(x) &&
                           index_map_aligned_for_packs<scalar_t>(shift_col);
      with_row_packs<scalar_t>(features, aligned, [&](auto pack, auto aligned_loads) {
        constexpr int half = decltype(pack)::value / 2 > 0 ? decltype(pack)::value / 2 : 1;
        const bool halves_aligned =
            rows_in_packs_of<scalar_t>(log_scale_raw.const_data_ptr(), log_scale_raw.stride(0), updated, half) &&
            rows_in_packs_of<scalar_t>(shift.const_data_ptr(), shift.stride(0), updated, half) &&
            rows_in_packs_of<scalar_t>(grad_log_scale_raw.const_data_ptr(), updated, updated, half) &&
            rows_in_packs_of<scalar_t>(grad_shift.const_data_ptr(), updated, updated, half) &&
            (!has_gathered || rows_in_packs_of<scalar_t>(grad_gathered.const_data_ptr(), grad_gathered.stride(0),
                                                         grad_gathered.size(1), half));
        affine_coupling_update_backward_rows_kernel<scalar_t, decltype(pack)::value, decltype(aligned_loads)::value>
            <<<row_blocks(batch), kRowBlockThreads, features * sizeof(int32_t), stream>>>(
                grad_y.const_data_ptr<scalar_t>(), grad_y.stride(0),
                has_gathered ? grad_gathered.const_data_ptr<scalar_t>() : nullptr,
                has_gathered ? grad_gathered.stride(0) : 0, has_gathered ? gather_index.size(0) : 0,
                has_log_det ? grad_log_det.const_data_ptr<opmath_t>() : nullptr, x.const_data_ptr<scalar_t>(),
                x.stride(0), log_scale_raw.const_data_ptr<scalar_t>(), log_scale_raw.stride(0),
                shift.const_data_ptr<scalar_t>(), shift.stride(0), shift_col.const_data_ptr<int32_t>(),
                gather_index.const_data_ptr<int32_t>(), grad_x.mutable_data_ptr<scalar_t>(),
                grad_log_scale_raw.mutable_data_ptr<scalar_t>(), grad_shift.mutable_data_ptr<scalar_t>(), batch,
                features, updated, law, inverse, halves_aligned);
      });
      return;
    }
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
