// Shared by the CPU and CUDA kernels of nice_ext: argument checks (so both backends reject the same
// inputs with the same messages) and the prior log-densities written once for host and device.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <string>

namespace nice_ext {

// ---------------------------------------------------------------------------------------------------
// Priors (paper §3.4). Both are written so that they stay finite for any finite z (|z| = 1e4 included).
// ---------------------------------------------------------------------------------------------------
enum class Prior { Logistic = 0, Gaussian = 1 };

inline Prior parse_prior(const std::string& name) {
  if (name == "logistic") return Prior::Logistic;
  if (name == "gaussian") return Prior::Gaussian;
  TORCH_CHECK(false, "nice_ext: prior must be 'logistic' or 'gaussian', got '", name, "'");
}

C10_HOST_DEVICE inline float exp_(float v) { return expf(v); }
C10_HOST_DEVICE inline double exp_(double v) { return exp(v); }
C10_HOST_DEVICE inline float tanh_(float v) { return tanhf(v); }
C10_HOST_DEVICE inline double tanh_(double v) { return tanh(v); }
C10_HOST_DEVICE inline float copysign_(float magnitude, float sign) { return copysignf(magnitude, sign); }
C10_HOST_DEVICE inline double copysign_(double magnitude, double sign) { return copysign(magnitude, sign); }

// a / b for b in [1, 3] (the only divisors below): on a GPU in float, the hardware reciprocal and a product
// (__fdividef, 2 ulp, 2 instructions where an IEEE division takes about 8 and a slow path); elsewhere an
// IEEE division, which the CPU's loops vectorise.
C10_HOST_DEVICE inline float moderate_quotient(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdividef(a, b);
#else
  return a / b;
#endif
}
C10_HOST_DEVICE inline double moderate_quotient(double a, double b) { return a / b; }

// e^-a for a >= 0 (or NaN). In float, 2^(-a log2 e): on a GPU that is the hardware exp2 and a product, 5
// instructions where expf takes 10. Rounding the product gives e^-a a relative error of about a * 2^-24,
// which the priors below only ever use through a e^-a <= 1/e: under 5e-8 absolute, below the last bit of
// their results (which are at least 2 ln 2 in size, or are tanh-like with an absolute error budget).
C10_HOST_DEVICE inline float exp_neg_(float a) { return exp2f(a * -1.44269504088896341f); }
C10_HOST_DEVICE inline double exp_neg_(double a) { return exp(-a); }

// log(1 + t) for t in [0, 1]: 2 atanh(w) with w = t / (2 + t) in [0, 1/3], as an odd series in w; a few
// ulp, and only multiply-adds after one division. The CPU's vectorised prior (cpu/vector_math.h) and the
// CUDA kernels both take it: the same formula on both backends, and with exp_neg_ half the
// instructions of log1pf(expf) on a GPU (21 against 44), where the logistic prior's math, not memory, bounded the kernel.
C10_HOST_DEVICE inline float log1p_unit(float t) {
  const float w = moderate_quotient(t, 2.0f + t);
  const float w2 = w * w;
  float s = 1.0f / 15;
  s = s * w2 + 1.0f / 13;
  s = s * w2 + 1.0f / 11;
  s = s * w2 + 1.0f / 9;
  s = s * w2 + 1.0f / 7;
  s = s * w2 + 1.0f / 5;
  s = s * w2 + 1.0f / 3;
  s = s * w2 + 1.0f;
  return 2.0f * w * s;
}
C10_HOST_DEVICE inline double log1p_unit(double t) {
  const double w = moderate_quotient(t, 2.0 + t);
  const double w2 = w * w;
  // Horner's rule over 1/35, 1/33, ..., 1/1, written out: as a loop it kept the CPU's calling loops
  // scalar (GCC vectorises no loop that holds another), and a pragma to unroll it is GCC's or nvcc's.
  double s = 1.0 / 35;
  s = s * w2 + 1.0 / 33; s = s * w2 + 1.0 / 31; s = s * w2 + 1.0 / 29; s = s * w2 + 1.0 / 27;
  s = s * w2 + 1.0 / 25; s = s * w2 + 1.0 / 23; s = s * w2 + 1.0 / 21; s = s * w2 + 1.0 / 19;
  s = s * w2 + 1.0 / 17; s = s * w2 + 1.0 / 15; s = s * w2 + 1.0 / 13; s = s * w2 + 1.0 / 11;
  s = s * w2 + 1.0 / 9; s = s * w2 + 1.0 / 7; s = s * w2 + 1.0 / 5; s = s * w2 + 1.0 / 3;
  s = s * w2 + 1.0;
  return 2.0 * w * s;
}

// log p(z) = -softplus(z) - softplus(-z) = -(|z| + 2 log(1 + e^{-|z|})): no overflow for large |z|.
template <typename T>
C10_HOST_DEVICE inline T logistic_log_density(T z) {
  const T a = z < T(0) ? -z : z;
  return -(a + T(2) * log1p_unit(exp_neg_(a)));
}
// d/dz log p(z) = sigmoid(-z) - sigmoid(z) = -tanh(z / 2) = -sign(z) (1 - e^-|z|) / (1 + e^-|z|).
template <typename T>
C10_HOST_DEVICE inline T logistic_score(T z) {
  const T t = exp_neg_(z < T(0) ? -z : z);
  return copysign_(moderate_quotient(T(1) - t, T(1) + t), -z);
}
template <typename T>
C10_HOST_DEVICE inline T gaussian_log_density(T z) {
  return T(-0.5) * (z * z + T(1.8378770664093454835606594728112));  // log(2 pi)
}
template <typename T>
C10_HOST_DEVICE inline T gaussian_score(T z) {
  return -z;
}
template <typename T>
C10_HOST_DEVICE inline T prior_log_density(Prior prior, T z) {
  return prior == Prior::Logistic ? logistic_log_density(z) : gaussian_log_density(z);
}
template <typename T>
C10_HOST_DEVICE inline T prior_score(Prior prior, T z) {
  return prior == Prior::Logistic ? logistic_score(z) : gaussian_score(z);
}

// ---------------------------------------------------------------------------------------------------
// Affine coupling law (paper §3.2.2): y_I2 = x_I2 * exp(a) + b with the log-scale a = tanh(r) ("tanh",
// bounded, nice_ext's default) or a = r ("unbounded", the paper's), r being the coupling network's output.
// ---------------------------------------------------------------------------------------------------
enum class AffineLaw { Tanh = 0, Unbounded = 1 };

inline AffineLaw parse_affine_law(const std::string& name) {
  if (name == "tanh") return AffineLaw::Tanh;
  if (name == "unbounded") return AffineLaw::Unbounded;
  TORCH_CHECK(false, "nice_ext: log_scale_law must be 'tanh' or 'unbounded', got '", name, "'");
}

// Gradients for one updated feature, given G = dL/dy, the input x, the shift b, the log-scale a = law(r),
// e = exp(a) (forward) or exp(-a) (inverse) and dL/dlog_det:
//   forward  y = x e^a + b:       dx = G e^a,    db = G,          da = G x e^a + dL/dlog_det
//   inverse  y = (x - b) e^-a:    dx = G e^-a,   db = -G e^-a,    da = -G y - dL/dlog_det
// and dr = da (1 - a^2) for a = tanh(r). The CPU and CUDA kernels both call this.
template <typename T>
struct AffineGrads {
  T x, log_scale_raw, shift;
};

template <typename T>
C10_HOST_DEVICE inline AffineGrads<T> affine_coupling_grads(AffineLaw law, bool inverse, T g, T x, T b, T a, T e,
                                                            T grad_log_det) {
  const T gx = g * e;
  const T ga = inverse ? -(gx * (x - b)) - grad_log_det : gx * x + grad_log_det;
  return {gx, law == AffineLaw::Tanh ? ga * (T(1) - a * a) : ga, inverse ? -gx : g};
}

// ---------------------------------------------------------------------------------------------------
// Argument checks. Each message names the argument and what was expected.
// ---------------------------------------------------------------------------------------------------
inline void check_float_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "nice_ext: ", name, " must be a 2-D (batch, features) tensor, got ", t.dim(),
              "-D with shape ", t.sizes());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "nice_ext: ", name, " must be a floating-point tensor (float32, float64, float16 or bfloat16), got ",
              dtype);
}

inline void check_index_vector(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 1, "nice_ext: ", name, " must be a 1-D index tensor, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kInt, "nice_ext: ", name, " must be int32, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), "nice_ext: ", a_name, " and ", b_name,
              " must be on the same device, got ", a.device(), " and ", b.device());
}

inline void check_same_dtype(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "nice_ext: ", a_name, " and ", b_name,
              " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

// Kernels read rows through a row stride and need unit stride along features; any other layout is
// copied once here (a slice x[:, a:b] or x[a:b] keeps unit feature stride and is never copied).
inline at::Tensor unit_feature_stride(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

// Masked additive coupling update (paper §3.2). See csrc/ops.cpp for the meaning of each argument.
inline void check_coupling_update(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& shift_col,
                                  const at::Tensor& gather_index) {
  check_float_matrix(x, "x");
  check_float_matrix(shift, "shift");
  check_index_vector(shift_col, "shift_col (from the coupling mask)");
  check_index_vector(gather_index, "gather_index (from the next layer's mask)");
  check_same_dtype(x, "x", shift, "shift");
  check_same_device(x, "x", shift, "shift");
  check_same_device(x, "x", shift_col, "shift_col");
  check_same_device(x, "x", gather_index, "gather_index");
  const int64_t features = x.size(1);
  TORCH_CHECK(features >= 2, "nice_ext: x must have at least 2 features to be split by a coupling mask, got ",
              features);
  TORCH_CHECK(shift.size(0) == x.size(0), "nice_ext: shift must have the batch size of x (", x.size(0),
              " rows), got ", shift.size(0));
  TORCH_CHECK(shift_col.size(0) == features, "nice_ext: the coupling mask must have one entry per feature of x (",
              features, "), got ", shift_col.size(0));
  TORCH_CHECK(shift.size(1) >= 1 && shift.size(1) < features,
              "nice_ext: shift must have one column per updated feature, and both parts of the coupling mask "
              "must be non-empty: expected 1 to ", features - 1, " columns, got ", shift.size(1));
  TORCH_CHECK(gather_index.size(0) <= features, "nice_ext: gather_index lists ", gather_index.size(0),
              " features but x has only ", features);
}

inline void check_coupling_update_backward(const at::Tensor& grad_y, const c10::optional<at::Tensor>& grad_gathered,
                                           const at::Tensor& shift_col, const at::Tensor& gather_index,
                                           int64_t updated) {
  check_float_matrix(grad_y, "grad_y");
  check_index_vector(shift_col, "shift_col (from the coupling mask)");
  check_index_vector(gather_index, "gather_index (from the next layer's mask)");
  check_same_device(grad_y, "grad_y", shift_col, "shift_col");
  check_same_device(grad_y, "grad_y", gather_index, "gather_index");
  const int64_t features = grad_y.size(1);
  TORCH_CHECK(shift_col.size(0) == features, "nice_ext: the coupling mask must have one entry per feature of grad_y (",
              features, "), got ", shift_col.size(0));
  TORCH_CHECK(updated >= 1 && updated < features, "nice_ext: updated must be between 1 and ", features - 1,
              " (both parts of the coupling mask non-empty), got ", updated);
  if (grad_gathered.has_value() && grad_gathered->defined()) {
    check_float_matrix(*grad_gathered, "grad_gathered");
    check_same_dtype(grad_y, "grad_y", *grad_gathered, "grad_gathered");
    check_same_device(grad_y, "grad_y", *grad_gathered, "grad_gathered");
    TORCH_CHECK(grad_gathered->size(0) == grad_y.size(0) && grad_gathered->size(1) == gather_index.size(0),
                "nice_ext: grad_gathered must have shape (", grad_y.size(0), ", ", gather_index.size(0), "), got ",
                grad_gathered->sizes());
  }
}

// Affine coupling update: the additive op's checks, plus the log-scale input beside shift.
inline void check_affine_coupling_update(const at::Tensor& x, const at::Tensor& log_scale_raw, const at::Tensor& shift,
                                         const at::Tensor& shift_col, const at::Tensor& gather_index) {
  check_coupling_update(x, shift, shift_col, gather_index);
  check_float_matrix(log_scale_raw, "log_scale_raw");
  check_same_dtype(x, "x", log_scale_raw, "log_scale_raw");
  check_same_device(x, "x", log_scale_raw, "log_scale_raw");
  TORCH_CHECK(log_scale_raw.sizes() == shift.sizes(), "nice_ext: log_scale_raw must have the shape of shift ",
              shift.sizes(), " (one column per updated feature), got ", log_scale_raw.sizes());
}

inline void check_affine_coupling_update_backward(const at::Tensor& grad_y,
                                                  const c10::optional<at::Tensor>& grad_gathered,
                                                  const c10::optional<at::Tensor>& grad_log_det, const at::Tensor& x,
                                                  const at::Tensor& log_scale_raw, const at::Tensor& shift,
                                                  const at::Tensor& shift_col, const at::Tensor& gather_index) {
  check_affine_coupling_update(x, log_scale_raw, shift, shift_col, gather_index);
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "nice_ext: grad_y must have the shape of x ", x.sizes(), ", got ",
              grad_y.sizes());
  check_coupling_update_backward(grad_y, grad_gathered, shift_col, gather_index, shift.size(1));
  check_same_dtype(x, "x", grad_y, "grad_y");
  check_same_device(x, "x", grad_y, "grad_y");
  if (grad_log_det.has_value() && grad_log_det->defined()) {
    TORCH_CHECK(grad_log_det->dim() == 1 && grad_log_det->size(0) == x.size(0),
                "nice_ext: grad_log_det must have shape (", x.size(0), ",), got ", grad_log_det->sizes());
    TORCH_CHECK(at::isFloatingType(grad_log_det->scalar_type()), "nice_ext: grad_log_det must be floating-point, got ",
                grad_log_det->scalar_type());
    check_same_device(x, "x", *grad_log_det, "grad_log_det");
  }
}

// Diagonal scaling + prior (paper §3.3, §3.4).
// h_name: the op's name for its (batch, features) input, h for scale_prior and z for scale_inverse.
inline void check_scale_prior(const at::Tensor& h, const at::Tensor& log_scale, const char* h_name = "h") {
  check_float_matrix(h, h_name);
  TORCH_CHECK(log_scale.dim() == 1, "nice_ext: log_scale must be a 1-D (features,) tensor, got shape ",
              log_scale.sizes());
  check_same_dtype(h, h_name, log_scale, "log_scale");
  check_same_device(h, h_name, log_scale, "log_scale");
  TORCH_CHECK(log_scale.size(0) == h.size(1), "nice_ext: log_scale must have one entry per feature of ", h_name,
              " (", h.size(1), "), got ", log_scale.size(0));
}

inline void check_scale_prior_backward(const at::Tensor& grad_log_prob, const c10::optional<at::Tensor>& grad_z,
                                       const at::Tensor& h, const at::Tensor& log_scale) {
  check_scale_prior(h, log_scale);
  TORCH_CHECK(grad_log_prob.dim() == 1 && grad_log_prob.size(0) == h.size(0),
              "nice_ext: grad_log_prob must have shape (", h.size(0), ",), got ", grad_log_prob.sizes());
  TORCH_CHECK(at::isFloatingType(grad_log_prob.scalar_type()), "nice_ext: grad_log_prob must be floating-point");
  check_same_device(h, "h", grad_log_prob, "grad_log_prob");
  if (grad_z.has_value() && grad_z->defined()) {
    check_same_dtype(h, "h", *grad_z, "grad_z");
    check_same_device(h, "h", *grad_z, "grad_z");
    TORCH_CHECK(grad_z->sizes() == h.sizes(), "nice_ext: grad_z must have the shape of h ", h.sizes(), ", got ",
                grad_z->sizes());
  }
}

// The log-probability of a row is a sum over features: it is accumulated and returned in float32 for
// half-precision inputs (float32 / float64 inputs keep their dtype).
inline at::ScalarType log_prob_dtype(at::ScalarType input) {
  return (input == at::kHalf || input == at::kBFloat16) ? at::kFloat : input;
}

// Rows per partial sum in the batch reduction of grad(log_scale). It depends on nothing but the batch
// size, so the reduction order (and the result, bit for bit) is the same on every run and thread count.
// At most 256 chunks, of at least 8 rows each.
inline int64_t reduction_rows_per_chunk(int64_t batch) {
  const int64_t rows = (batch + 255) / 256;
  return rows < 8 ? 8 : rows;
}

// ---------------------------------------------------------------------------------------------------
// Kernels, one per backend. The entry points in csrc/coupling.cpp and csrc/scale_prior.cpp check the
// arguments, give every tensor unit feature stride (rows may be strided), allocate the outputs and call
// these. The CUDA ones never throw: they return nullptr or a CUDA error string, so that no C++ exception
// ever unwinds through nvcc-compiled host code (which crashed the unwinder on some systems).
// ---------------------------------------------------------------------------------------------------
enum class Backend { CPU, CUDA };

// Which generation of the CUDA row kernels runs (csrc/cuda/*.cu), per op: 1, the first correct kernels
// (a block per row, one element per thread and access), or 2, the bandwidth-tuned ones of
// benchmarks/NOTES.md (a warp per row, 16-byte accesses where the layout allows; they fall back to
// version 1 where they do not apply). Each op has its own setting because the versions were timed one
// op at a time: on an H100 (2026-11), version 2's coupling kernels of then were slower at 3072 features.
// Process-wide, read at each launch; set from Python
// (nice_ext.ops.use_cuda_kernels) so that the tests and the benchmark can run both. The CPU kernels
// ignore it.
enum class RowKernelOp { Coupling = 0, ScalePrior = 1, AffineCoupling = 2 };
constexpr int kRowKernelOps = 3;
// The versions a process starts with, indexed by RowKernelOp: each op's faster one as measured. Version 2
// for all three: the scaling + prior's 1.6-2.2x at 65536 rows on an H100
// (benchmarks/results/NVIDIA_H100_80GB_HBM3_kernels_v*.md); on an H200, the coupling's one pass 1.25x
// and the affine coupling's 1.38x (geometric means; 1.5-2.4x on the backward at 65536 rows, no entry
// slower than 0.97x: benchmarks/results/NVIDIA_H200_kernel_versions.md).
constexpr int kDefaultCudaKernelVersion[kRowKernelOps] = {2, 2, 2};
int cuda_kernel_version(RowKernelOp op);
void set_cuda_kernel_version(RowKernelOp op, int version);

void coupling_update_kernel_cpu(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& shift_col,
                                const at::Tensor& gather_index, bool inverse, at::Tensor& y, at::Tensor& gathered);
void coupling_update_backward_kernel_cpu(const at::Tensor& grad_y, const at::Tensor& grad_gathered,
                                         const at::Tensor& shift_col, const at::Tensor& gather_index, bool inverse,
                                         at::Tensor& grad_x, at::Tensor& grad_shift);
void affine_coupling_update_kernel_cpu(const at::Tensor& x, const at::Tensor& log_scale_raw, const at::Tensor& shift,
                                       const at::Tensor& shift_col, const at::Tensor& gather_index, AffineLaw law,
                                       bool inverse, at::Tensor& y, at::Tensor& gathered, at::Tensor& log_det);
void affine_coupling_update_backward_kernel_cpu(const at::Tensor& grad_y, const at::Tensor& grad_gathered,
                                                const at::Tensor& grad_log_det, const at::Tensor& x,
                                                const at::Tensor& log_scale_raw, const at::Tensor& shift,
                                                const at::Tensor& shift_col, const at::Tensor& gather_index,
                                                AffineLaw law, bool inverse, at::Tensor& grad_x,
                                                at::Tensor& grad_log_scale_raw, at::Tensor& grad_shift);
void scale_prior_kernel_cpu(const at::Tensor& h, const at::Tensor& log_scale, Prior prior, at::Tensor& z,
                            at::Tensor& log_prob);
void scale_prior_backward_kernel_cpu(const at::Tensor& grad_log_prob, const at::Tensor& grad_z, const at::Tensor& h,
                                     const at::Tensor& log_scale, Prior prior, at::Tensor& grad_h, at::Tensor& grad_s,
                                     at::Tensor& partial);
void scale_inverse_kernel_cpu(const at::Tensor& z, const at::Tensor& log_scale, at::Tensor& h);

// Runs name##_kernel_cpu or name##_kernel_cuda with the same arguments; a CUDA error becomes a c10::Error
// here, in host code compiled by the C++ compiler.
#define NICE_EXT_RUN_CUDA_KERNEL(name, ...)                                              \
  do {                                                                                   \
    const char* error = name##_kernel_cuda(__VA_ARGS__);                                 \
    TORCH_CHECK(error == nullptr, "nice_ext: " #name " CUDA kernel failed: ", error);    \
  } while (0)
#if defined(NICE_EXT_EMULATED_CUDA)
// tests/cuda_emulation: the CUDA kernels, compiled for the host, run for every backend (CPU tensors).
// They read host memory, so the CUDA dispatch key gets no kernels there (NICE_EXT_CUDA_DEVICE_KERNELS).
#define NICE_EXT_RUN_KERNEL(backend, name, ...) NICE_EXT_RUN_CUDA_KERNEL(name, __VA_ARGS__)
#elif defined(NICE_EXT_WITH_CUDA)
#define NICE_EXT_CUDA_DEVICE_KERNELS 1
#define NICE_EXT_RUN_KERNEL(backend, name, ...)                                          \
  do {                                                                                   \
    if constexpr (backend == Backend::CPU) {                                             \
      name##_kernel_cpu(__VA_ARGS__);                                                    \
    } else {                                                                             \
      NICE_EXT_RUN_CUDA_KERNEL(name, __VA_ARGS__);                                       \
    }                                                                                    \
  } while (0)
#else
#define NICE_EXT_RUN_KERNEL(backend, name, ...) name##_kernel_cpu(__VA_ARGS__)
#endif

#ifdef NICE_EXT_WITH_CUDA
const char* coupling_update_kernel_cuda(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& shift_col,
                                        const at::Tensor& gather_index, bool inverse, at::Tensor& y,
                                        at::Tensor& gathered);
const char* coupling_update_backward_kernel_cuda(const at::Tensor& grad_y, const at::Tensor& grad_gathered,
                                                 const at::Tensor& shift_col, const at::Tensor& gather_index,
                                                 bool inverse, at::Tensor& grad_x, at::Tensor& grad_shift);
const char* affine_coupling_update_kernel_cuda(const at::Tensor& x, const at::Tensor& log_scale_raw,
                                               const at::Tensor& shift, const at::Tensor& shift_col,
                                               const at::Tensor& gather_index, AffineLaw law, bool inverse,
                                               at::Tensor& y, at::Tensor& gathered, at::Tensor& log_det);
const char* affine_coupling_update_backward_kernel_cuda(const at::Tensor& grad_y, const at::Tensor& grad_gathered,
                                                        const at::Tensor& grad_log_det, const at::Tensor& x,
                                                        const at::Tensor& log_scale_raw, const at::Tensor& shift,
                                                        const at::Tensor& shift_col, const at::Tensor& gather_index,
                                                        AffineLaw law, bool inverse, at::Tensor& grad_x,
                                                        at::Tensor& grad_log_scale_raw, at::Tensor& grad_shift);
const char* scale_prior_kernel_cuda(const at::Tensor& h, const at::Tensor& log_scale, Prior prior, at::Tensor& z,
                                    at::Tensor& log_prob);
const char* scale_prior_backward_kernel_cuda(const at::Tensor& grad_log_prob, const at::Tensor& grad_z,
                                             const at::Tensor& h, const at::Tensor& log_scale, Prior prior,
                                             at::Tensor& grad_h, at::Tensor& grad_s, at::Tensor& partial);
const char* scale_inverse_kernel_cuda(const at::Tensor& z, const at::Tensor& log_scale, at::Tensor& h);
#endif

}  // namespace nice_ext
