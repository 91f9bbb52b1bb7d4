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
NICE_EXT_CPU_INLINE void log_scale_block(const scalar_t* rr, opmath_t* a, opmath_t* e, int64_t n) {
  for (int64_t i = 0; i < n; ++i) a[i] = law == AffineLaw::Tanh ? vmath::tanh(opmath_t(rr[i])) : opmath_t(rr[i]);
  for (int64_t i = 0; i < n; ++i) {
    const opmath_t signed_a = kInverse ? -a[i] : a[i];
    e[i] = law == AffineLaw::Tanh ? vmath::exp_unit(signed_a) : vmath::exp_any(signed_a);  // |tanh| <= 1
  }
}

// The updated feature's new value: x e^a + b (forward) or (x - b) e^-a (inverse), e being e^(+/-a).
template <bool kInverse, typename scalar_t, typename opmath_t>
NICE_EXT_CPU_INLINE scalar_t affine_value(scalar_t x, scalar_t b, opmath_t e) {
  return static_cast<scalar_t>(kInverse ? (opmath_t(x) - opmath_t(b)) * e : opmath_t(x) * e + opmath_t(b));
}

// One row of the forward, any masks: updated_features[c] is the feature shift column c updates. Returns
// the row's log|det|, +sum a (forward) or -sum a (inverse).
template <AffineLaw law, bool kInverse, typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
NICE_EXT_CPU_CLONES opmath_t affine_row(const scalar_t* __restrict__ xr, const scalar_t* __restrict__ rr,
                                        const scalar_t* __restrict__ sr, const int32_t* __restrict__ updated_features,
                                        int64_t updated, scalar_t* __restrict__ yr, int64_t features) {
  opmath_t a[kBlock], e[kBlock];
  opmath_t log_det = 0;
  for (int64_t j = 0; j < features; ++j) yr[j] = xr[j];  // the kept features; the updated ones follow
  for (int64_t c0 = 0; c0 < updated; c0 += kBlock) {
    const int64_t n = std::min(kBlock, updated - c0);
    log_scale_block<law, kInverse>(rr + c0, a, e, n);
#pragma omp simd reduction(+ : log_det)
    for (int64_t i = 0; i < n; ++i) log_det += a[i];
    for (int64_t i = 0; i < n; ++i) {
      const int64_t j = updated_features[c0 + i];
      yr[j] = affine_value<kInverse>(xr[j], sr[c0 + i], e[i]);
    }
  }
  return kInverse ? -log_det : log_det;
}

// One row of the forward for odd/even masks, in one pass like the additive kernel's pair loop
// (coupling_cpu.cpp): in the pair (2p, 2p + 1) the feature of parity kFirst is updated by shift column p,
// and the one of parity kStart goes to gathered[p]. With an odd D, feature D - 1 (even) has no partner
// and is done after the loop.
template <AffineLaw law, bool kInverse, int kFirst, int kStart, bool kGather, typename scalar_t,
          typename opmath_t = at::opmath_type<scalar_t>>
NICE_EXT_CPU_CLONES opmath_t affine_row_odd_even(const scalar_t* __restrict__ xr, const scalar_t* __restrict__ rr,
                                                 const scalar_t* __restrict__ sr, scalar_t* __restrict__ yr,
                                                 scalar_t* __restrict__ gr, int64_t features) {
  opmath_t a[kBlock], e[kBlock];
  opmath_t log_det = 0;
  const int64_t pairs = features / 2;
  for (int64_t p0 = 0; p0 < pairs; p0 += kBlock) {
    const int64_t n = std::min(kBlock, pairs - p0);
    log_scale_block<law, kInverse>(rr + p0, a, e, n);
#pragma omp simd reduction(+ : log_det)
    for (int64_t i = 0; i < n; ++i) log_det += a[i];
    const scalar_t* xp = xr + 2 * p0;
    const scalar_t* sp = sr + p0;
    scalar_t* yp = yr + 2 * p0;
    scalar_t* gp = kGather ? gr + p0 : nullptr;  // gr may be null (nothing gathered): no offset on it
    for (int64_t i = 0; i < n; ++i) {
      scalar_t even = xp[2 * i], odd = xp[2 * i + 1];
      if (kFirst == 0) even = affine_value<kInverse>(even, sp[i], e[i]);
      else odd = affine_value<kInverse>(odd, sp[i], e[i]);
      yp[2 * i] = even;
      yp[2 * i + 1] = odd;
      if (kGather) gp[i] = kStart == 0 ? even : odd;
    }
  }
  if (features % 2 == 1) {
    scalar_t last = xr[features - 1];
    if (kFirst == 0) {  // updated, by shift column `pairs`
      log_scale_block<law, kInverse>(rr + pairs, a, e, 1);
      log_det += a[0];
      last = affine_value<kInverse>(last, sr[pairs], e[0]);
    }
    yr[features - 1] = last;
    if (kGather && kStart == 0) gr[pairs] = last;
  }
  return kInverse ? -log_det : log_det;
}

// The gradients of one updated feature (affine_coupling_grads, nice_ext.h) stored as the kernels' dtype:
// returns dL/dx and writes dL/dr and dL/db.
template <AffineLaw law, bool kInverse, typename scalar_t, typename opmath_t>
NICE_EXT_CPU_INLINE scalar_t affine_grads_at(scalar_t g, scalar_t x, scalar_t b, opmath_t a, opmath_t e,
                                             opmath_t grad_log_det, scalar_t& grad_log_scale_raw,
                                             scalar_t& grad_shift) {
  const AffineGrads<opmath_t> grads =
      affine_coupling_grads(law, kInverse, opmath_t(g), opmath_t(x), opmath_t(b), a, e, grad_log_det);
  grad_log_scale_raw = static_cast<scalar_t>(grads.log_scale_raw);
  grad_shift = static_cast<scalar_t>(grads.shift);
  return static_cast<scalar_t>(grads.x);
}

// One row of the backward, any masks, on grad_x already holding G = dL/dy (grad_y plus grad_gathered
// folded in).
template <AffineLaw law, bool kInverse, typename scalar_t, typename opmath_t>
NICE_EXT_CPU_CLONES void affine_backward_row(const scalar_t* __restrict__ xr, const scalar_t* __restrict__ rr,
                                             const scalar_t* __restrict__ sr,
                                             const int32_t* __restrict__ updated_features, int64_t updated,
                                             opmath_t grad_log_det, scalar_t* __restrict__ gxr,
                                             scalar_t* __restrict__ grr, scalar_t* __restrict__ gsr) {
  opmath_t a[kBlock], e[kBlock];
  for (int64_t c0 = 0; c0 < updated; c0 += kBlock) {
    const int64_t n = std::min(kBlock, updated - c0);
    log_scale_block<law, kInverse>(rr + c0, a, e, n);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t c = c0 + i;
      const int64_t j = updated_features[c];
      gxr[j] = affine_grads_at<law, kInverse>(gxr[j], xr[j], sr[c], a[i], e[i], grad_log_det, grr[c], gsr[c]);
    }
  }
}

// One row of the backward for odd/even masks, in one pass: per pair, G = grad_y plus grad_gathered on the
// feature of parity kStart; the feature of parity kFirst takes the affine gradients with shift column p.
template <AffineLaw law, bool kInverse, int kFirst, int kStart, bool kGather, typename scalar_t, typename opmath_t>
NICE_EXT_CPU_CLONES void affine_backward_row_odd_even(const scalar_t* __restrict__ gyr,
                                                      const scalar_t* __restrict__ ggr,
                                                      const scalar_t* __restrict__ xr, const scalar_t* __restrict__ rr,
                                                      const scalar_t* __restrict__ sr, opmath_t grad_log_det,
                                                      scalar_t* __restrict__ gxr, scalar_t* __restrict__ grr,
                                                      scalar_t* __restrict__ gsr, int64_t features) {
  opmath_t a[kBlock], e[kBlock];
  const int64_t pairs = features / 2;
  for (int64_t p0 = 0; p0 < pairs; p0 += kBlock) {
    const int64_t n = std::min(kBlock, pairs - p0);
    log_scale_block<law, kInverse>(rr + p0, a, e, n);
    const scalar_t* gyp = gyr + 2 * p0;
    const scalar_t* ggp = kGather ? ggr + p0 : nullptr;  // ggr is null when nothing was gathered
    const scalar_t* xp = xr + 2 * p0 + kFirst;
    const scalar_t* sp = sr + p0;
    scalar_t* gxp = gxr + 2 * p0;
    scalar_t* grp = grr + p0;
    scalar_t* gsp = gsr + p0;
    for (int64_t i = 0; i < n; ++i) {
      scalar_t even = gyp[2 * i], odd = gyp[2 * i + 1];
      if (kGather && kStart == 0) even = static_cast<scalar_t>(opmath_t(even) + opmath_t(ggp[i]));
      if (kGather && kStart == 1) odd = static_cast<scalar_t>(opmath_t(odd) + opmath_t(ggp[i]));
      if (kFirst == 0) even = affine_grads_at<law, kInverse>(even, xp[2 * i], sp[i], a[i], e[i], grad_log_det, grp[i], gsp[i]);
      else odd = affine_grads_at<law, kInverse>(odd, xp[2 * i], sp[i], a[i], e[i], grad_log_det, grp[i], gsp[i]);
      gxp[2 * i] = even;
      gxp[2 * i + 1] = odd;
    }
  }
  if (features % 2 == 1) {
    scalar_t last = gyr[features - 1];
    if (kGather && kStart == 0) last = static_cast<scalar_t>(opmath_t(last) + opmath_t(ggr[pairs]));
    if (kFirst == 0) {  // updated, by shift column `pairs`
      log_scale_block<law, kInverse>(rr + pairs, a, e, 1);
      last = affine_grads_at<law, kInverse>(last, xr[features - 1], sr[pairs], a[0], e[0], grad_log_det, grr[pairs],
                                            gsr[pairs]);
    }
    gxr[features - 1] = last;
  }
}

// Calls f with the law and the direction as compile-time constants, so that the row loops have no branches.
template <typename F>
void dispatch_affine(AffineLaw law, bool inverse, F&& f) {
  auto with_law = [&](auto kInverse) {
    if (law == AffineLaw::Tanh) return f(std::integral_constant<AffineLaw, AffineLaw::Tanh>(), kInverse);
    return f(std::integral_constant<AffineLaw, AffineLaw::Unbounded>(), kInverse);
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
  bool odd_even() const { return first >= 0 && start >= 0; }
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
    dispatch_affine(law, inverse, [&](auto kLaw, auto kInverse) {
      if (maps.odd_even()) {
        dispatch_odd_even({maps.first, maps.start, gathered_n > 0}, [&](auto kFirst, auto kStart, auto kGather) {
          at::parallel_for(0, batch, row_grain(features), [&](int64_t begin, int64_t end) {
            for (int64_t b = begin; b < end; ++b)
              ld_ptr[b] = affine_row_odd_even<kLaw, kInverse, kFirst, kStart, kGather>(
                  x_ptr + b * x_rs, r_ptr + b * r_rs, s_ptr + b * s_rs, y_ptr + b * features,
                  g_ptr + b * gathered_n, features);
          });
        });
        return;
      }
      at::parallel_for(0, batch, row_grain(features), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          scalar_t* yr = y_ptr + b * features;
          ld_ptr[b] = affine_row<kLaw, kInverse>(x_ptr + b * x_rs, r_ptr + b * r_rs, s_ptr + b * s_rs,
                                                 maps.updated_features.data(), updated, yr, features);
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
    dispatch_affine(law, inverse, [&](auto kLaw, auto kInverse) {
      if (maps.odd_even()) {
        dispatch_odd_even({maps.first, maps.start, gathered_n > 0}, [&](auto kFirst, auto kStart, auto kGather) {
          at::parallel_for(0, batch, row_grain(features), [&](int64_t begin, int64_t end) {
            for (int64_t b = begin; b < end; ++b)
              affine_backward_row_odd_even<kLaw, kInverse, kFirst, kStart, kGather>(
                  gy_ptr + b * gy_rs, kGather ? gg_ptr + b * gg_rs : nullptr, x_ptr + b * x_rs, r_ptr + b * r_rs,
                  s_ptr + b * s_rs, has_log_det ? gld_ptr[b] : opmath_t(0), gx_ptr + b * features,
                  gr_ptr + b * updated, gs_ptr + b * updated, features);
          });
        });
        return;
      }
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
          affine_backward_row<kLaw, kInverse>(x_ptr + b * x_rs, r_ptr + b * r_rs, s_ptr + b * s_rs,
                                              maps.updated_features.data(), updated,
                                              has_log_det ? gld_ptr[b] : opmath_t(0), gxr, gr_ptr + b * updated,
                                              gs_ptr + b * updated);
        }
      });
    });
  });
}

}  // namespace nice_ext
