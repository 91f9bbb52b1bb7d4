// Branch-free exp and tanh (bit casts, not memcpy, so no stack temporary blocks vectorisation; the build's
// -fno-trapping-math lets the compiler if-convert the clamp) for the ranges the priors need, written so that the compiler vectorises
// the loops that call them (glibc's expf/log1pf are opaque calls that keep a loop scalar). Accuracy is
// a few ulp: Cephes-style range reduction and polynomials. The priors' log1p series is nice_ext.h's, shared
// with the CUDA kernels.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "nice_ext.h"  // log1p_unit

// The row loops that call these are compiled three times, for AVX-512, for AVX2 + FMA and for the
// baseline x86-64, and the dynamic loader picks the best one the CPU runs (GCC's function
// multi-versioning): the extension is built without -march, so this is how the prior's math gets wide
// vectors on the machines that have them.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__linux__)
#define NICE_EXT_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NICE_EXT_CPU_CLONES
#endif

namespace nice_ext {
namespace vmath {

// e^(x - n ln 2) for the integer n nearest x / ln 2 (given as nf), so that the argument lies within
// ln(2) / 2 of 0: x - n ln 2 is formed in two parts, then Cephes' polynomial (float) or Pade form (double).
inline float exp_reduced(float x, float nf) {
  const float r = (x - nf * 0.693359375f) + nf * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

inline double exp_reduced(double x, double nf) {
  const double r = (x - nf * 6.93145751953125e-1) - nf * 1.42860682030941723212e-6;
  const double rr = r * r;
  const double px = r * ((1.26177193074810590878e-4 * rr + 3.02994407707441961300e-2) * rr +
                         9.99999999999999999910e-1);
  const double qx = ((3.00198505138664455042e-6 * rr + 2.52448340349684104192e-3) * rr +
                     2.27265548208155028766e-1) * rr + 2.00000000000000000009e0;
  return 1.0 + 2.0 * px / (qx - px);
}

// 2^n as a float or double, for n within the exponent range of normal numbers.
inline float pow2(int32_t n) { return __builtin_bit_cast(float, (n + 127) << 23); }
inline double pow2(int64_t n) { return __builtin_bit_cast(double, (n + 1023) << 52); }

// e^x for x <= 0. Arguments below -87 (-708 in double) give e^-87 (e^-708) instead of a smaller number:
// the result only ever feeds log1p(e^x) next to a term of size |x| >= 87, or tanh, where the difference
// is far below the last bit. No special case means no branch, so loops calling this vectorise.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const int32_t n = static_cast<int32_t>(x * 1.44269504088896341f - 0.5f);  // round(x / ln 2), x <= 0
  return exp_reduced(x, static_cast<float>(n)) * pow2(n);                   // n >= -126
}

inline double exp_nonpositive(double x) {
  x = std::max(x, -708.0);
  const int64_t n = static_cast<int64_t>(x * 1.4426950408889634074 - 0.5);
  return exp_reduced(x, static_cast<double>(n)) * pow2(n);
}

// e^x for any x: overflow gives inf, underflow gradual denormals then 0, NaN stays NaN. The same range
// reduction, with 2^n applied as two factors 2^(n/2) and 2^(n - n/2) so that n can span the whole range
// of finite results (one factor would stop at 2^127 and 2^-126).
inline float exp_any(float x) {
  const float xc = std::min(std::max(x, -104.0f), 89.0f);  // e^-104 is below every denormal, e^89 above FLT_MAX
  const float t = xc * 1.44269504088896341f;
  const int32_t n = static_cast<int32_t>(t + (t < 0.0f ? -0.5f : 0.5f));  // round(x / ln 2)
  const int32_t half = n / 2;
  return exp_reduced(xc, static_cast<float>(n)) * pow2(half) * pow2(n - half);
}

inline double exp_any(double x) {
  const double xc = std::min(std::max(x, -746.0), 710.0);
  const double t = xc * 1.4426950408889634074;
  const int64_t n = static_cast<int64_t>(t + (t < 0.0 ? -0.5 : 0.5));
  const int64_t half = n / 2;
  return exp_reduced(xc, static_cast<double>(n)) * pow2(half) * pow2(n - half);
}

// tanh(x): near 0 as sinh / cosh from their series (no cancellation), elsewhere (1 - e^-2|x|) / (1 + e^-2|x|).
// Both numerators and both denominators are computed and blended with a 0/1 weight, then divided once: a
// plain select let GCC move each side into a branch of its own, and a loop with branches stays scalar.
// The series is evaluated at min(|x|, 0.625), so that it stays finite (0 * series = 0) when the other
// side is taken; a NaN stays NaN on both.
template <typename T>
inline T tanh(T x) {
  const T a = std::fabs(x);
  const T small = std::min(a, T(0.625));
  const T s2 = small * small;
  // Terms up to s^(2K) / (2K)! and s^(2K+1) / (2K+1)!: below the last bit for s <= 0.625.
  constexpr int K = sizeof(T) == 4 ? 5 : 9;
  T sinh_over_s = T(1), cosh = T(1);
#pragma GCC unroll 16  // unrolled, so that the calling loop vectorises
  for (int k = K; k >= 1; --k) {
    sinh_over_s = T(1) + s2 * sinh_over_s * (T(1) / T((2 * k) * (2 * k + 1)));
    cosh = T(1) + s2 * cosh * (T(1) / T((2 * k - 1) * (2 * k)));
  }
  const T e = exp_nonpositive(T(-2) * a);
  const T use_series = a < T(0.625) ? T(1) : T(0);
  const T numerator = use_series * (small * sinh_over_s) + (T(1) - use_series) * (T(1) - e);
  const T denominator = use_series * cosh + (T(1) - use_series) * (T(1) + e);
  return std::copysign(numerator / denominator, x);
}

// The logistic log-density -(|z| + 2 log(1 + e^-|z|)) and its score -tanh(z / 2), sharing e^-|z|: the
// formulas of nice_ext.h's (log1p_unit is that header's), with this file's vectorisable exp.
template <typename T>
inline T logistic_log_density(T z) {
  const T a = std::fabs(z);
  return -(a + T(2) * log1p_unit(exp_nonpositive(-a)));
}
template <typename T>
inline T logistic_score(T z) {
  const T t = exp_nonpositive(-std::fabs(z));
  return std::copysign((T(1) - t) / (T(1) + t), -z);  // -tanh(z / 2) = -sign(z) tanh(|z| / 2)
}

}  // namespace vmath
}  // namespace nice_ext
