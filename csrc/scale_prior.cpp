// Entry points of the diagonal scaling + prior op and of the inverse scaling (schemas: csrc/ops.cpp) for
// every backend: check the arguments, normalise layouts, allocate outputs and workspace, run the kernel.
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "nice_ext.h"

namespace nice_ext {
namespace {

template <Backend backend>
std::tuple<at::Tensor, at::Tensor> scale_prior(const at::Tensor& h_in, const at::Tensor& log_scale_in,
                                               c10::string_view prior_name, bool compute_z) {
  check_scale_prior(h_in, log_scale_in);
  const Prior prior = parse_prior(std::string(prior_name));
  const c10::OptionalDeviceGuard guard(h_in.device());
  const at::Tensor h = unit_feature_stride(h_in);
  const at::Tensor log_scale = log_scale_in.contiguous();
  at::Tensor z = compute_z ? at::empty({h.size(0), h.size(1)}, h.options()) : at::empty({0}, h.options());
  at::Tensor log_prob = at::empty({h.size(0)}, h.options().dtype(log_prob_dtype(h.scalar_type())));
  if (h.size(0) == 0) return {z, log_prob};
  at::Tensor z_out = compute_z ? z : at::Tensor();
  NICE_EXT_RUN_KERNEL(backend, scale_prior, h, log_scale, prior, z_out, log_prob);
  return {z, log_prob};
}

template <Backend backend>
std::tuple<at::Tensor, at::Tensor> scale_prior_backward(const at::Tensor& grad_log_prob_in,
                                                        const c10::optional<at::Tensor>& grad_z_in,
                                                        const at::Tensor& h_in, const at::Tensor& log_scale_in,
                                                        c10::string_view prior_name) {
  check_scale_prior_backward(grad_log_prob_in, grad_z_in, h_in, log_scale_in);
  const Prior prior = parse_prior(std::string(prior_name));
  const c10::OptionalDeviceGuard guard(h_in.device());
  const at::Tensor h = unit_feature_stride(h_in);
  const at::Tensor log_scale = log_scale_in.contiguous();
  const bool has_grad_z = grad_z_in.has_value() && grad_z_in->defined();
  const at::Tensor grad_z = has_grad_z ? unit_feature_stride(*grad_z_in) : at::Tensor();
  const int64_t batch = h.size(0), features = h.size(1);
  at::Tensor grad_h = at::empty({batch, features}, h.options());
  at::Tensor grad_s = at::empty({features}, log_scale.options());
  if (batch == 0) return {grad_h, grad_s.zero_()};
  const auto opmath_options = h.options().dtype(log_prob_dtype(h.scalar_type()));
  const at::Tensor grad_log_prob = grad_log_prob_in.to(opmath_options).contiguous();
  // Per-chunk partial sums of grad(log_scale), added up in chunk order by the kernel.
  const int64_t rows_per_chunk = reduction_rows_per_chunk(batch);
  at::Tensor partial = at::empty({(batch + rows_per_chunk - 1) / rows_per_chunk, features}, opmath_options);
  NICE_EXT_RUN_KERNEL(backend, scale_prior_backward, grad_log_prob, grad_z, h, log_scale, prior, grad_h, grad_s,
                      partial);
  return {grad_h, grad_s};
}

template <Backend backend>
at::Tensor scale_inverse(const at::Tensor& z_in, const at::Tensor& log_scale_in) {
  check_scale_prior(z_in, log_scale_in, "z");
  const c10::OptionalDeviceGuard guard(z_in.device());
  const at::Tensor z = unit_feature_stride(z_in);
  const at::Tensor log_scale = log_scale_in.contiguous();
  at::Tensor h = at::empty({z.size(0), z.size(1)}, z.options());
  if (z.size(0) == 0) return h;
  NICE_EXT_RUN_KERNEL(backend, scale_inverse, z, log_scale, h);
  return h;
}

}  // namespace

TORCH_LIBRARY_IMPL(nice_ext, CPU, m) {
  m.impl("scale_prior", &scale_prior<Backend::CPU>);
  m.impl("scale_prior_backward", &scale_prior_backward<Backend::CPU>);
  m.impl("scale_inverse", &scale_inverse<Backend::CPU>);
}

#ifdef NICE_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(nice_ext, CUDA, m) {
  m.impl("scale_prior", &scale_prior<Backend::CUDA>);
  m.impl("scale_prior_backward", &scale_prior_backward<Backend::CUDA>);
  m.impl("scale_inverse", &scale_inverse<Backend::CUDA>);
}
#endif

}  // namespace nice_ext
