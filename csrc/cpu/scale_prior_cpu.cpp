// CPU kernels of the diagonal scaling + prior log-density (schema and meaning: csrc/ops.cpp).
// Each row is read once; the inner loops are written for the compiler to vectorise (see vector_math.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

#include "cpu/vector_math.h"
#include "nice_ext.h"

namespace nice_ext {
namespace {

int64_t row_grain(int64_t features) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(features, 1)); }

// Rows are walked in blocks of kBlock features. Each elementwise step is its own plain loop over a small
// buffer (no reduction, no branches), so the compiler vectorises the exp/log1p math; a loop that mixed
// the math with the row sum stayed scalar.
constexpr int64_t kBlock = 256;

template <Prior prior, typename T>
NICE_EXT_CPU_INLINE void log_density_block(const T* z, T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    out[i] = prior == Prior::Logistic ? vmath::logistic_log_density(z[i]) : gaussian_log_density(z[i]);
}

template <Prior prior, typename T>
NICE_EXT_CPU_INLINE void score_block(const T* z, T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = prior == Prior::Logistic ? vmath::logistic_score(z[i]) : gaussian_score(z[i]);
}

// exp(sign * log_scale) in the compute type, once per call.
template <typename scalar_t, typename opmath_t>
std::vector<opmath_t> exp_log_scale(const at::Tensor& log_scale, opmath_t sign) {
  const at::Tensor s = log_scale.contiguous();
  const scalar_t* p = s.const_data_ptr<scalar_t>();
  std::vector<opmath_t> out(s.numel());
  for (int64_t d = 0; d < s.numel(); ++d) out[d] = std::exp(sign * opmath_t(p[d]));
  return out;
}

// One row of the forward: z (when zr is not null) and sum_d log p_H(z_d).
template <Prior prior, typename scalar_t, typename opmath_t>
NICE_EXT_CPU_CLONES opmath_t scale_prior_row(const scalar_t* hr, const opmath_t* es, scalar_t* zr, int64_t features) {
  opmath_t z_block[kBlock], log_density[kBlock];
  opmath_t acc = 0;
  for (int64_t d0 = 0; d0 < features; d0 += kBlock) {
    const int64_t n = std::min(kBlock, features - d0);
    for (int64_t i = 0; i < n; ++i) z_block[i] = opmath_t(hr[d0 + i]) * es[d0 + i];
    if (zr != nullptr) {
      for (int64_t i = 0; i < n; ++i) zr[d0 + i] = static_cast<scalar_t>(z_block[i]);
    }
    log_density_block<prior>(z_block, log_density, n);
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; ++i) acc += log_density[i];
  }
  return acc;
}

template <typename scalar_t, Prior prior>
void scale_prior_rows(const at::Tensor& h, const at::Tensor& log_scale, at::Tensor& z, at::Tensor& log_prob) {
  const bool compute_z = z.defined();
  using opmath_t = at::opmath_type<scalar_t>;
  using out_t = opmath_t;  // log_prob is float32 for half inputs, else the input dtype (= opmath_t)
  const int64_t batch = h.size(0), features = h.size(1), h_rs = h.stride(0);
  const std::vector<opmath_t> scale = exp_log_scale<scalar_t, opmath_t>(log_scale, opmath_t(1));
  const at::Tensor s = log_scale.contiguous();
  opmath_t log_det = 0;  // sum_d log_scale[d], the scaling layer's log|det J|
  for (int64_t d = 0; d < features; ++d) log_det += opmath_t(s.const_data_ptr<scalar_t>()[d]);
  const scalar_t* h_ptr = h.const_data_ptr<scalar_t>();
  scalar_t* z_ptr = compute_z ? z.mutable_data_ptr<scalar_t>() : nullptr;
  out_t* lp_ptr = log_prob.mutable_data_ptr<out_t>();
  const opmath_t* es = scale.data();
  at::parallel_for(0, batch, row_grain(features), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      scalar_t* zr = z_ptr != nullptr ? z_ptr + b * features : nullptr;
      lp_ptr[b] = scale_prior_row<prior>(h_ptr + b * h_rs, es, zr, features) + log_det;
    }
  });
}

// g[b, d] = dL/dz[b, d] = grad_log_prob[b] * score(z[b, d]) + grad_z[b, d]
// grad_h[b, d] = g[b, d] * exp(s[d]);   grad_s[d] = sum_b (g[b, d] * z[b, d] + grad_log_prob[b])
// One row: writes grad_h and adds the row's terms of grad_s to `part` (its chunk's partial sums).
template <Prior prior, typename scalar_t, typename opmath_t>
NICE_EXT_CPU_CLONES void scale_prior_backward_row(const scalar_t* hr, const scalar_t* gzr, const opmath_t* es,
                                                  opmath_t gl, scalar_t* ghr, opmath_t* part, int64_t features) {
  opmath_t z_block[kBlock], score[kBlock];
  for (int64_t d0 = 0; d0 < features; d0 += kBlock) {
    const int64_t n = std::min(kBlock, features - d0);
    for (int64_t i = 0; i < n; ++i) z_block[i] = opmath_t(hr[d0 + i]) * es[d0 + i];
    score_block<prior>(z_block, score, n);
    if (gzr != nullptr) {  // g = dL/dz
      for (int64_t i = 0; i < n; ++i) score[i] = gl * score[i] + opmath_t(gzr[d0 + i]);
    } else {
      for (int64_t i = 0; i < n; ++i) score[i] = gl * score[i];
    }
    for (int64_t i = 0; i < n; ++i) {
      ghr[d0 + i] = static_cast<scalar_t>(score[i] * es[d0 + i]);
      part[d0 + i] += score[i] * z_block[i] + gl;
    }
  }
}

// grad_s is summed per fixed-size chunk of rows, then over chunks in order: the same bits on every run.
template <typename scalar_t, Prior prior>
void scale_prior_backward_rows(const at::Tensor& grad_log_prob, const at::Tensor& grad_z, const at::Tensor& h,
                               const at::Tensor& log_scale, at::Tensor& grad_h, at::Tensor& grad_s,
                               at::Tensor& partial_sums) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t batch = h.size(0), features = h.size(1), h_rs = h.stride(0);
  const int64_t gz_rs = grad_z.defined() ? grad_z.stride(0) : 0;
  const std::vector<opmath_t> scale = exp_log_scale<scalar_t, opmath_t>(log_scale, opmath_t(1));
  const opmath_t* glp_ptr = grad_log_prob.const_data_ptr<opmath_t>();
  const scalar_t* h_ptr = h.const_data_ptr<scalar_t>();
  const scalar_t* gz_ptr = grad_z.defined() ? grad_z.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* gh_ptr = grad_h.mutable_data_ptr<scalar_t>();
  const opmath_t* es = scale.data();

  const int64_t rows_per_chunk = reduction_rows_per_chunk(batch);
  const int64_t chunks = partial_sums.size(0);
  opmath_t* partial = partial_sums.mutable_data_ptr<opmath_t>();
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t c = chunk_begin; c < chunk_end; ++c) {
      opmath_t* part = partial + c * features;
      std::fill(part, part + features, opmath_t(0));
      const int64_t row_end = std::min(batch, (c + 1) * rows_per_chunk);
      for (int64_t b = c * rows_per_chunk; b < row_end; ++b) {
        scale_prior_backward_row<prior>(h_ptr + b * h_rs, gz_ptr != nullptr ? gz_ptr + b * gz_rs : nullptr, es,
                                        glp_ptr[b], gh_ptr + b * features, part, features);
      }
    }
  });
  scalar_t* gs_ptr = grad_s.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, features, 256, [&](int64_t begin, int64_t end) {
    for (int64_t d = begin; d < end; ++d) {
      opmath_t acc = 0;
      for (int64_t c = 0; c < chunks; ++c) acc += partial[c * features + d];
      gs_ptr[d] = static_cast<scalar_t>(acc);
    }
  });
}

template <typename scalar_t>
void scale_inverse_rows(const at::Tensor& z, const at::Tensor& log_scale, at::Tensor& h) {
  using opmath_t = at::opmath_type<scalar_t>;
  const std::vector<opmath_t> inv_scale = exp_log_scale<scalar_t, opmath_t>(log_scale, opmath_t(-1));
  const int64_t features = z.size(1), z_rs = z.stride(0);
  const scalar_t* z_ptr = z.const_data_ptr<scalar_t>();
  scalar_t* h_ptr = h.mutable_data_ptr<scalar_t>();
  const opmath_t* es = inv_scale.data();
  at::parallel_for(0, z.size(0), row_grain(features), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* zr = z_ptr + b * z_rs;
      scalar_t* hr = h_ptr + b * features;
#pragma omp simd
      for (int64_t d = 0; d < features; ++d) hr[d] = static_cast<scalar_t>(opmath_t(zr[d]) * es[d]);
    }
  });
}

}  // namespace

void scale_prior_kernel_cpu(const at::Tensor& h, const at::Tensor& log_scale, Prior prior, at::Tensor& z,
                            at::Tensor& log_prob) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "scale_prior_cpu", [&] {
    if (prior == Prior::Logistic) {
      scale_prior_rows<scalar_t, Prior::Logistic>(h, log_scale, z, log_prob);
    } else {
      scale_prior_rows<scalar_t, Prior::Gaussian>(h, log_scale, z, log_prob);
    }
  });
}

void scale_prior_backward_kernel_cpu(const at::Tensor& grad_log_prob, const at::Tensor& grad_z, const at::Tensor& h,
                                     const at::Tensor& log_scale, Prior prior, at::Tensor& grad_h, at::Tensor& grad_s,
                                     at::Tensor& partial) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "scale_prior_backward_cpu", [&] {
    if (prior == Prior::Logistic) {
      scale_prior_backward_rows<scalar_t, Prior::Logistic>(grad_log_prob, grad_z, h, log_scale, grad_h, grad_s, partial);
    } else {
      scale_prior_backward_rows<scalar_t, Prior::Gaussian>(grad_log_prob, grad_z, h, log_scale, grad_h, grad_s, partial);
    }
  });
}

void scale_inverse_kernel_cpu(const at::Tensor& z, const at::Tensor& log_scale, at::Tensor& h) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "scale_inverse_cpu",
                                  [&] { scale_inverse_rows<scalar_t>(z, log_scale, h); });
}

}  // namespace nice_ext
