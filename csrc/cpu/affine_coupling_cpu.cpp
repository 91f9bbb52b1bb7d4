// CPU kernels of the masked affine coupling update (schema and meaning: csrc/ops.cpp; entry point and
// checks: csrc/affine_coupling.cpp; CUDA twin: csrc/cuda/affine_coupling_cuda.cu). One pass over each
// row: y, log_det and the next layer's gathered input are written while the row is hot.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/index_maps.h"
#include "cpu/vector_math.h"
#include "nice_ext.h"

namespace nice_ext {
namespace {

// Rows per parallel task: each updated feature costs a tanh and an exp, so fewer elements per task than
// the additive update needs to amortise scheduling.
int64_t row_grain(int64_t features) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(features, 1)); }

// The shift columns of a row are walked in blocks of kBlock: the log-scales and their exponentials are
// computed in plain loops over small buffers, which the compiler vectorises (see vector_math.h); the
// scattered reads and writes of the row's features follow in a loop of their own.
constexpr int64_t kBlock = 256;

// a = law(r) and e = exp(+a) (forward) or exp(-a) (inverse) for n shift columns.
template <AffineLaw law, bool kInverse, typename scalar_t, typename opmath_t>
inline void log_scale_block(const scalar_t* rr, opmath_t* a, opmath_t* e, int64_t n) {
  for (int64_t i = 0; i < n; ++i) a[i] = law == AffineLaw::Tanh ? vmath::tanh(opmath_t(rr[i])) : opmath_t(rr[i]);
  for (int64_t i = 0; i < n; ++i) e[i] = vmath::exp_any(kInverse ? -a[i] : a[i]);
}

// The feature that shift column c updates: first + 2c for the paper's odd/even masks (kStride2; no index
// load, so the loops over columns vectorise), else updated_features[c].
template <bool kStride2>
inline int64_t updated_feature(const int32_t* __restrict__ updated_features, int64_t first, int64_t c) {
  return kStride2 ? first + 2 * c : updated_features[c];
}

// One row of the forward. Returns the row's log|det|, +sum a (forward) or -sum a (inverse).
template <AffineLaw law, bool kInverse, bool kStride2, typename scalar_t,
          typename opmath_t = at::opmath_type<scalar_t>>
NICE_EXT_CPU_CLONES opmath_t affine_row(const scalar_t* __restrict__ xr, const scalar_t* __restrict__ rr,
                                        const scalar_t* __restrict__ sr, const int32_t* __restrict__ updated_features,
                                        int64_t first, int64_t updated, scalar_t* __restrict__ yr,
                                        int64_t features) {
  opmath_t a[kBlock], e[kBlock];
  opmath_t log_det = 0;
  for (int64_t j = 0; j < features; ++j) yr[j] = xr[j];  // the kept features; the updated ones follow
  for (int64_t c0 = 0; c0 < updated; c0 += kBlock) {
    const int64_t n = std::min(kBlock, updated - c0);
    log_scale_block<law, kInverse>(rr + c0, a, e, n);
#pragma omp simd reduction(+ : log_det)
    for (int64_t i = 0; i < n; ++i) log_det += a[i];
    for (int64_t i = 0; i < n; ++i) {
      const int64_t j = updated_feature<kStride2>(updated_features, first, c0 + i);
      const opmath_t x = opmath_t(xr[j]), b = opmath_t(sr[c0 + i]);
      yr[j] = static_cast<scalar_t>(kInverse ? (x - b) * e[i] : x * e[i] + b);
    }
  }
  return kInverse ? -log_det : log_det;
}

// One row of the backward, on grad_x already holding G = dL/dy (grad_y plus grad_gathered folded in);
// the formulas are affine_coupling_grads (nice_ext.h).
template <AffineLaw law, bool kInverse, bool kStride2, typename scalar_t, typename opmath_t>
NICE_EXT_CPU_CLONES void affine_backward_row(const scalar_t* __restrict__ xr, const scalar_t* __restrict__ rr,
                                             const scalar_t* __restrict__ sr,
                                             const int32_t* __restrict__ updated_features, int64_t first,
                                             int64_t updated,
                                             opmath_t grad_log_det, scalar_t* __restrict__ gxr,
                                             scalar_t* __restrict__ grr, scalar_t* __restrict__ gsr) {
  opmath_t a[kBlock], e[kBlock];
  for (int64_t c0 = 0; c0 < updated; c0 += kBlock) {
    const int64_t n = std::min(kBlock, updated - c0);
    log_scale_block<law, kInverse>(rr + c0, a, e, n);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t c = c0 + i;
      const int64_t j = updated_feature<kStride2>(updated_features, first, c);
      const AffineGrads<opmath_t> grads = affine_coupling_grads(law, kInverse, opmath_t(gxr[j]), opmath_t(xr[j]),
                                                                opmath_t(sr[c]), a[i], e[i], grad_log_det);
      gxr[j] = static_cast<scalar_t>(grads.x);
      grr[c] = static_cast<scalar_t>(grads.log_scale_raw);
      gsr[c] = static_cast<scalar_t>(grads.shift);
    }
  }
}

// Calls f with the law, the direction and whether the updated features are a stride-2 progression as
// compile-time constants, so that the row loops have no branches.
template <typename F>
void dispatch_affine(AffineLaw law, bool inverse, bool stride2, F&& f) {
  auto with_stride = [&](auto kLaw, auto kInverse) {
    if (stride2) return f(kLaw, kInverse, std::true_type());
    return f(kLaw, kInverse, std::false_type());
  };
  auto with_law = [&](auto kInverse) {
    if (law == AffineLaw::Tanh) return with_stride(std::integral_constant<AffineLaw, AffineLaw::Tanh>(), kInverse);
    return with_stride(std::integral_constant<AffineLaw, AffineLaw::Unbounded>(), kInverse);
  };
  if (inverse) return with_law(std::true_type());
  return with_law(std::false_type());
}

// gathered[g] = y[gather_index[g]] (start >= 0: y[start + 2g], stride2_first_gathered).
template <typename scalar_t>
void gather_row(const scalar_t* __restrict__ yr, const int32_t* __restrict__ gidx, int64_t start, int64_t gathered_n,
                scalar_t* __restrict__ gr) {
  if (start >= 0) {
    for (int64_t g = 0; g < gathered_n; ++g) gr[g] = yr[start + 2 * g];
  } else {
    for (int64_t g = 0; g < gathered_n; ++g) gr[g] = yr[gidx[g]];
  }
}

// The index maps as one call's rows walk them: checked, the updated feature of each shift column, and the
// odd/even stride-2 cases (first >= 0: updated features; start >= 0: gathered ones).
struct RowMaps {
  std::vector<int32_t> updated_features;
  int64_t first, start;
};

RowMaps row_maps(const at::Tensor& shift_col, const at::Tensor& gather_index, int64_t features, int64_t updated,
                 int64_t gathered_n) {
  std::vector<int32_t> updated_features = check_shift_col_cpu(shift_col, updated);
  check_gather_index_cpu(gather_index, features);
  const int64_t first = stride2_first_updated(shift_col.const_data_ptr<int32_t>(), features, updated);
  const int64_t start = stride2_first_gathered(gather_index.const_data_ptr<int32_t>(), gathered_n, features);
  return {std::move(updated_features), first, start};
}

}  // namespace

void affine_coupling_update_kernel_cpu(const at::Tensor& x, const at::Tensor& log_scale_raw, const at::Tensor& shift,
                                       const at::Tensor& shift_col, const at::Tensor& gather_index, AffineLaw law,
                                       bool inverse, at::Tensor& y, at::Tensor& gathered, at::Tensor& log_det) {
  const int64_t batch = x.size(0), features = x.size(1), updated = shift.size(1), gathered_n = gather_index.size(0);
  const RowMaps maps = row_maps(shift_col, gather_index, features, updated, gathered_n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "affine_coupling_update_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;  // log_det's dtype too (float32 for half inputs)
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* r_ptr = log_scale_raw.const_data_ptr<scalar_t>();
    const scalar_t* s_ptr = shift.const_data_ptr<scalar_t>();
    const int32_t* gidx = gather_index.const_data_ptr<int32_t>();
    scalar_t* y_ptr = y.mutable_data_ptr<scalar_t>();
    scalar_t* g_ptr = gathered.mutable_data_ptr<scalar_t>();
    opmath_t* ld_ptr = log_det.mutable_data_ptr<opmath_t>();
    const int64_t x_rs = x.stride(0), r_rs = log_scale_raw.stride(0), s_rs = shift.stride(0);
    dispatch_affine(law, inverse, maps.first >= 0, [&](auto kLaw, auto kInverse, auto kStride2) {
      at::parallel_for(0, batch, row_grain(features), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          scalar_t* yr = y_ptr + b * features;
          ld_ptr[b] = affine_row<kLaw, kInverse, kStride2>(x_ptr + b * x_rs, r_ptr + b * r_rs, s_ptr + b * s_rs,
                                                           maps.updated_features.data(), maps.first, updated, yr,
                                                           features);
          gather_row(yr, gidx, maps.start, gathered_n, g_ptr + b * gathered_n);
        }
      });
    });
  });
}

void affine_coupling_update_backward_kernel_cpu(const at::Tensor& grad_y, const at::Tensor& grad_gathered,
                                                const at::Tensor& grad_log_det, const at::Tensor& x,
                                                const at::Tensor& log_scale_raw, const at::Tensor& shift,
                                                const at::Tensor& shift_col, const at::Tensor& gather_index,
                                                AffineLaw law, bool inverse, at::Tensor& grad_x,
                                                at::Tensor& grad_log_scale_raw, at::Tensor& grad_shift) {
  const bool has_gathered = grad_gathered.defined(), has_log_det = grad_log_det.defined();
  const int64_t batch = x.size(0), features = x.size(1), updated = shift.size(1);
  const int64_t gathered_n = has_gathered ? gather_index.size(0) : 0;
  const RowMaps maps = row_maps(shift_col, gather_index, features, updated, gathered_n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "affine_coupling_update_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* gy_ptr = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* gg_ptr = has_gathered ? grad_gathered.const_data_ptr<scalar_t>() : nullptr;
    const opmath_t* gld_ptr = has_log_det ? grad_log_det.const_data_ptr<opmath_t>() : nullptr;
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* r_ptr = log_scale_raw.const_data_ptr<scalar_t>();
    const scalar_t* s_ptr = shift.const_data_ptr<scalar_t>();
    const int32_t* gidx = gather_index.const_data_ptr<int32_t>();
    scalar_t* gx_ptr = grad_x.mutable_data_ptr<scalar_t>();
    scalar_t* gr_ptr = grad_log_scale_raw.mutable_data_ptr<scalar_t>();
    scalar_t* gs_ptr = grad_shift.mutable_data_ptr<scalar_t>();
    const int64_t gy_rs = grad_y.stride(0), gg_rs = has_gathered ? grad_gathered.stride(0) : 0;
    const int64_t x_rs = x.stride(0), r_rs = log_scale_raw.stride(0), s_rs = shift.stride(0);
    dispatch_affine(law, inverse, maps.first >= 0, [&](auto kLaw, auto kInverse, auto kStride2) {
      at::parallel_for(0, batch, row_grain(features), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const scalar_t* gyr = gy_ptr + b * gy_rs;
          const scalar_t* ggr = gg_ptr + b * gg_rs;
          scalar_t* gxr = gx_ptr + b * features;
          for (int64_t j = 0; j < features; ++j) gxr[j] = gyr[j];
          // y[j] also went to the next layer as gathered[g]: its gradient adds up here.
          for (int64_t g = 0; g < gathered_n; ++g) {
            const int64_t j = maps.start >= 0 ? maps.start + 2 * g : gidx[g];
            gxr[j] = static_cast<scalar_t>(opmath_t(gxr[j]) + opmath_t(ggr[g]));
          }
          affine_backward_row<kLaw, kInverse, kStride2>(x_ptr + b * x_rs, r_ptr + b * r_rs, s_ptr + b * s_rs,
                                                        maps.updated_features.data(), maps.first, updated,
                                                        has_log_det ? gld_ptr[b] : opmath_t(0), gxr,
                                                        gr_ptr + b * updated, gs_ptr + b * updated);
        }
      });
    });
  });
}

}  // namespace nice_ext
