// CPU kernels of the masked additive coupling update (schema and meaning: csrc/ops.cpp).
// One pass over each row: y, and the next layer's gathered input, are written while the row is hot.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/index_maps.h"
#include "nice_ext.h"
#include "vector_math.h"

namespace nice_ext {
namespace {

// Rows per parallel task: enough work per task to amortise scheduling (about 32k elements).
int64_t row_grain(int64_t features) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(features, 1)); }

// Forward of one row for odd/even masks: in the pair (2p, 2p + 1) the feature of parity kFirst gets
// shift[p], and the one of parity kStart goes to gathered[p]. With an odd D, feature D - 1 (even) has no
// partner and is done after the loop.
template <int kFirst, int kStart, bool kGather, typename scalar_t, typename opmath_t>
NICE_EXT_CPU_CLONES void coupling_row_odd_even(const scalar_t* __restrict__ xr, const scalar_t* __restrict__ sr,
                                               scalar_t* __restrict__ yr, scalar_t* __restrict__ gr,
                                               int64_t features, opmath_t sign) {
  const int64_t pairs = features / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    scalar_t even = xr[2 * p], odd = xr[2 * p + 1];
    if (kFirst == 0) even = static_cast<scalar_t>(opmath_t(even) + sign * opmath_t(sr[p]));
    else odd = static_cast<scalar_t>(opmath_t(odd) + sign * opmath_t(sr[p]));
    yr[2 * p] = even;
    yr[2 * p + 1] = odd;
    if (kGather) gr[p] = kStart == 0 ? even : odd;
  }
  if (features % 2 == 1) {
    scalar_t last = xr[features - 1];
    if (kFirst == 0) last = static_cast<scalar_t>(opmath_t(last) + sign * opmath_t(sr[pairs]));
    yr[features - 1] = last;
    if (kGather && kStart == 0) gr[pairs] = last;
  }
}

// Backward of one row for odd/even masks: grad_x = grad_y plus, on the gathered features, grad_gathered;
// grad_shift[p] = sign * grad_x of the updated feature of pair p.
template <int kFirst, int kStart, bool kGather, typename scalar_t, typename opmath_t>
NICE_EXT_CPU_CLONES void coupling_backward_row_odd_even(const scalar_t* __restrict__ gyr,
                                                        const scalar_t* __restrict__ ggr, scalar_t* __restrict__ gxr,
                                                        scalar_t* __restrict__ gsr, int64_t features, opmath_t sign) {
  const int64_t pairs = features / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    scalar_t even = gyr[2 * p], odd = gyr[2 * p + 1];
    if (kGather && kStart == 0) even = static_cast<scalar_t>(opmath_t(even) + opmath_t(ggr[p]));
    if (kGather && kStart == 1) odd = static_cast<scalar_t>(opmath_t(odd) + opmath_t(ggr[p]));
    gxr[2 * p] = even;
    gxr[2 * p + 1] = odd;
    gsr[p] = static_cast<scalar_t>(sign * opmath_t(kFirst == 0 ? even : odd));
  }
  if (features % 2 == 1) {
    scalar_t last = gyr[features - 1];
    if (kGather && kStart == 0) last = static_cast<scalar_t>(opmath_t(last) + opmath_t(ggr[pairs]));
    gxr[features - 1] = last;
    if (kFirst == 0) gsr[pairs] = static_cast<scalar_t>(sign * opmath_t(last));
  }
}

}  // namespace

void coupling_update_kernel_cpu(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& shift_col,
                                const at::Tensor& gather_index, bool inverse, at::Tensor& y, at::Tensor& gathered) {
  const int64_t batch = x.size(0), features = x.size(1), updated = shift.size(1), gathered_n = gather_index.size(0);
  check_shift_col_cpu(shift_col, updated);
  check_gather_index_cpu(gather_index, features);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "coupling_update_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t sign = inverse ? opmath_t(-1) : opmath_t(1);
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* shift_ptr = shift.const_data_ptr<scalar_t>();
    const int32_t* col = shift_col.const_data_ptr<int32_t>();
    const int32_t* gidx = gather_index.const_data_ptr<int32_t>();
    scalar_t* y_ptr = y.mutable_data_ptr<scalar_t>();
    scalar_t* g_ptr = gathered.mutable_data_ptr<scalar_t>();
    const int64_t x_rs = x.stride(0), s_rs = shift.stride(0);
    const int64_t first = stride2_first_updated(col, features, updated);
    const int64_t start = stride2_first_gathered(gidx, gathered_n, features);
    if (first >= 0 && start >= 0) {  // odd/even masks
      dispatch_odd_even({first, start, gathered_n > 0}, [&](auto kFirst, auto kStart, auto kGather) {
        at::parallel_for(0, batch, row_grain(features), [&](int64_t begin, int64_t end) {
          for (int64_t b = begin; b < end; ++b)
            coupling_row_odd_even<kFirst, kStart, kGather>(x_ptr + b * x_rs, shift_ptr + b * s_rs,
                                                           y_ptr + b * features, g_ptr + b * gathered_n, features, sign);
        });
      });
      return;
    }
    at::parallel_for(0, batch, row_grain(features), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* xr = x_ptr + b * x_rs;
        const scalar_t* sr = shift_ptr + b * s_rs;
        scalar_t* yr = y_ptr + b * features;
        for (int64_t j = 0; j < features; ++j) {
          const int32_t c = col[j];
          yr[j] = c < 0 ? xr[j] : static_cast<scalar_t>(opmath_t(xr[j]) + sign * opmath_t(sr[c]));
        }
        scalar_t* gr = g_ptr + b * gathered_n;
        for (int64_t g = 0; g < gathered_n; ++g) gr[g] = yr[gidx[g]];
      }
    });
  });
}

void coupling_update_backward_kernel_cpu(const at::Tensor& grad_y, const at::Tensor& grad_gathered,
                                         const at::Tensor& shift_col, const at::Tensor& gather_index, bool inverse,
                                         at::Tensor& grad_x, at::Tensor& grad_shift) {
  const bool has_gathered = grad_gathered.defined();
  const int64_t batch = grad_y.size(0), features = grad_y.size(1), updated = grad_shift.size(1);
  const int64_t gathered_n = has_gathered ? gather_index.size(0) : 0;
  check_shift_col_cpu(shift_col, updated);
  check_gather_index_cpu(gather_index, features);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_y.scalar_type(), "coupling_update_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t sign = inverse ? opmath_t(-1) : opmath_t(1);
    const scalar_t* gy_ptr = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* gg_ptr = has_gathered ? grad_gathered.const_data_ptr<scalar_t>() : nullptr;
    const int32_t* col = shift_col.const_data_ptr<int32_t>();
    const int32_t* gidx = gather_index.const_data_ptr<int32_t>();
    scalar_t* gx_ptr = grad_x.mutable_data_ptr<scalar_t>();
    scalar_t* gs_ptr = grad_shift.mutable_data_ptr<scalar_t>();
    const int64_t gy_rs = grad_y.stride(0), gg_rs = has_gathered ? grad_gathered.stride(0) : 0;
    const int64_t first = stride2_first_updated(col, features, updated);
    const int64_t start = stride2_first_gathered(gidx, gathered_n, features);
    if (first >= 0 && start >= 0) {  // odd/even masks
      dispatch_odd_even({first, start, gathered_n > 0}, [&](auto kFirst, auto kStart, auto kGather) {
        at::parallel_for(0, batch, row_grain(features), [&](int64_t begin, int64_t end) {
          for (int64_t b = begin; b < end; ++b)
            coupling_backward_row_odd_even<kFirst, kStart, kGather>(
                gy_ptr + b * gy_rs, kGather ? gg_ptr + b * gg_rs : nullptr, gx_ptr + b * features,
                gs_ptr + b * updated, features, sign);
        });
      });
      return;
    }
    at::parallel_for(0, batch, row_grain(features), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* gyr = gy_ptr + b * gy_rs;
        scalar_t* gxr = gx_ptr + b * features;
        scalar_t* gsr = gs_ptr + b * updated;
        for (int64_t j = 0; j < features; ++j) gxr[j] = gyr[j];
        // y[j] also went to the next layer as gathered[g]: its gradient adds up here.
        for (int64_t g = 0; g < gathered_n; ++g) {
          const int32_t j = gidx[g];
          gxr[j] = static_cast<scalar_t>(opmath_t(gxr[j]) + opmath_t(gg_ptr[b * gg_rs + g]));
        }
        // dy[j]/dshift[c] = sign where c = shift_col[j]: each updated feature owns one shift column.
        for (int64_t j = 0; j < features; ++j) {
          const int32_t c = col[j];
          if (c >= 0) gsr[c] = static_cast<scalar_t>(sign * opmath_t(gxr[j]));
        }
      }
    });
  });
}

}  // namespace nice_ext
