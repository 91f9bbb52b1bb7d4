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
//
// What those row functions call must be inlined into them (NICE_EXT_CPU_INLINE): a helper that GCC leaves
// out of line is compiled once, for the baseline x86-64 (SSE2, no FMA, no F16C), whichever clone calls
// it. The affine coupling's per-block tanh/exp helper was, in every dtype, and so ran 2-wide in double.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__linux__)
#define NICE_EXT_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define NICE_EXT_CPU_INLINE __attribute__((always_inline)) inline
#else
#define NICE_EXT_CPU_CLONES
#define NICE_EXT_CPU_INLINE inline
#endif

namespace nice_ext {
namespace vmath {

// e^(x - n ln 2) for the integer n nearest x / ln 2 (given as nf), so that the argument lies within
// ln(2) / 2 of 0: x - n ln 2 is formed in two parts, then Cephes' polynomial (float) or Pade form (double).
NICE_EXT_CPU_INLINE float exp_reduced(float x, float nf) {
  const float r = (x - nf * 0.693359375f) + nf * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

NICE_EXT_CPU_INLINE double exp_reduced(double x, double nf) {
  const double r = (x - nf * 6.93145751953125e-1) - nf * 1.42860682030941723212e-6;
  const double rr = r * r;
  const double px = r * ((1.26177193074810590878e-4 * rr + 3.02994407707441961300e-2) * rr +
                         9.99999999999999999910e-1);
  const double qx = ((3.00198505138664455042e-6 * rr + 2.52448340349684104192e-3) * rr +
                     2.27265548208155028766e-1) * rr + 2.00000000000000000009e0;
  return 1.0 + 2.0 * px / (qx - px);
}

// 2^n as a float or double (T), for n within the exponent range of normal numbers. The exponent is an
// int32 for both: AVX2 has no conversion from double to int64, and a loop that needs one stays scalar
// (a float64 op using double's exp ran 2-3x slower than it need be on AVX2 machines); widening int32 to
// int64 has one.
template <typename T>
T pow2(int32_t n);
template <>
NICE_EXT_CPU_INLINE float pow2<float>(int32_t n) { return __builtin_bit_cast(float, (n + 127) << 23); }
template <>
NICE_EXT_CPU_INLINE double pow2<double>(int32_t n) {
  return __builtin_bit_cast(double, static_cast<int64_t>(n + 1023) << 52);
}

// e^x for x <= 0. Arguments below -87 (-708 in double) give e^-87 (e^-708) instead of a smaller number:
// the result only ever feeds log1p(e^x) next to a term of size |x| >= 87, or tanh, where the difference
// is far below the last bit. No special case means no branch, so loops calling this vectorise.
NICE_EXT_CPU_INLINE float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const int32_t n = static_cast<int32_t>(x * 1.44269504088896341f - 0.5f);  // round(x / ln 2), x <= 0
  return exp_reduced(x, static_cast<float>(n)) * pow2<float>(n);            // n >= -126
}

NICE_EXT_CPU_INLINE double exp_nonpositive(double x) {
  x = std::max(x, -708.0);
  const int32_t n = static_cast<int32_t>(x * 1.4426950408889634074 - 0.5);
  return exp_reduced(x, static_cast<double>(n)) * pow2<double>(n);
}

// e^x for any x: overflow gives inf, underflow gradual denormals then 0, NaN stays NaN. The same range
// reduction, with 2^n applied as two factors 2^(n/2) and 2^(n - n/2) so that n can span the whole range
// of finite results (one factor would stop at 2^127 and 2^-126).
NICE_EXT_CPU_INLINE float exp_any(float x) {
  const float xc = std::min(std::max(x, -104.0f), 89.0f);  // e^-104 is below every denormal, e^89 above FLT_MAX
  const float t = xc * 1.44269504088896341f;
  const int32_t n = static_cast<int32_t>(t + (t < 0.0f ? -0.5f : 0.5f));  // round(x / ln 2)
  const int32_t half = n / 2;
  return exp_reduced(xc, static_cast<float>(n)) * pow2<float>(half) * pow2<float>(n - half);
}

NICE_EXT_CPU_INLINE double exp_any(double x) {
  const double xc = std::min(std::max(x, -746.0), 710.0);
  const double t = xc * 1.4426950408889634074;
  const int32_t n = static_cast<int32_t>(t + (t < 0.0 ? -0.5 : 0.5));
  const int32_t half = n / 2;
  return exp_reduced(xc, static_cast<double>(n)) * pow2<double>(half) * pow2<double>(n - half);
}

// e^x for |x| <= 1, the tanh law's log-scales: round(x / ln 2) is then -1, 0 or 1, so one factor 2^n
// does and no clamp is needed (exp_any's clamps, signed rounding and split factor are a third of its
// arithmetic). floor(t + 0.5) is taken as int(t + 1.5) - 1, a truncation of a positive number for t > -1.5.
template <typename T>
NICE_EXT_CPU_INLINE T exp_unit(T x) {
  const int32_t n = static_cast<int32_t>(x * T(1.4426950408889634074) + T(1.5)) - 1;
  return exp_reduced(x, static_cast<T>(n)) * pow2<T>(n);
}

// (tanh(x) - x) / x^3 as a polynomial in z = x^2, for |x| <= 0.625: near-minimax fits (Chebyshev, in 50-digit
// arithmetic) of degree 4 in float and 10 in double, their coefficients rounded to the type. Evaluated in
// the type, tanh(x) = x + x^3 P(x^2) is then within 0.85 ulp (float: every 7th float of (0, 0.625]) and
// 0.79 ulp (double: 200000 random points) of the true value.
NICE_EXT_CPU_INLINE float tanh_polynomial(float z) {
  float p = -5.712322891e-3f;
  p = p * z + 2.064627968e-2f;
  p = p * z - 5.374217406e-2f;
  p = p * z + 1.333147585e-1f;
  return p * z - 3.333328366e-1f;
}
NICE_EXT_CPU_INLINE double tanh_polynomial(double z) {
  constexpr double c[] = {-1.724487449484433e-05, 7.959955735264808e-05, -0.00023077616269519857,
                          0.0005874372860094381,  -0.001455309297534642, 0.0035920589774734554,
                          -0.008863229830925709,  0.021869488260559115,  -0.05396825396139557,
                          0.13333333333326658,    -0.3333333333333332};
  double p = c[0];
#pragma GCC unroll 16  // unrolled, so that the calling loop vectorises
  for (int k = 1; k < 11; ++k) p = p * z + c[k];
  return p;
}

// tanh(x): near 0 (|x| < 0.625) x + x^3 P(x^2), elsewhere (1 - e^-2|x|) / (1 + e^-2|x|), which has no
// cancellation there. The two sides are blended with a 0/1 weight, not selected: a plain select let GCC
// move each side into a branch of its own, and a loop with branches stays scalar. The polynomial is
// evaluated at min(|x|, 0.625), so that it stays finite (0 * p = 0) when the other side is taken; a NaN
// stays NaN on both. (The sinh / cosh series this replaced took about three times the arithmetic.)
template <typename T>
NICE_EXT_CPU_INLINE T tanh(T x) {
  const T a = std::fabs(x);
  const T s = std::min(a, T(0.625));
  const T z = s * s;
  const T near_zero = s + s * z * tanh_polynomial(z);
  const T e = exp_nonpositive(T(-2) * a);
  const T far = (T(1) - e) / (T(1) + e);
  const T use_polynomial = a < T(0.625) ? T(1) : T(0);
  return std::copysign(use_polynomial * near_zero + (T(1) - use_polynomial) * far, x);
}

// The logistic log-density -(|z| + 2 log(1 + e^-|z|)) and its score -tanh(z / 2), sharing e^-|z|: the
// formulas of nice_ext.h's (log1p_unit is that header's), with this file's vectorisable exp.
template <typename T>
NICE_EXT_CPU_INLINE T logistic_log_density(T z) {
  const T a = std::fabs(z);
  return -(a + T(2) * log1p_unit(exp_nonpositive(-a)));
}
template <typename T>
NICE_EXT_CPU_INLINE T logistic_score(T z) {
  const T t = exp_nonpositive(-std::fabs(z));
  return std::copysign((T(1) - t) / (T(1) + t), -z);  // -tanh(z / 2) = -sign(z) tanh(|z| / 2)
}

}  // namespace vmath
}  // namespace nice_ext
