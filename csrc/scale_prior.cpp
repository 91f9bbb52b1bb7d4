// Entry points of the diagonal scaling + prior op and of the inverse scaling (schemas: csrc/ops.cpp) for
// every backend: check the arguments, normalise layouts, allocate outputs and workspace, run the kernel;
// and their autograd.
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "autograd.h"
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

// Autograd of scale_prior: its backward op reads h and log_scale again (z and the prior's score are
// recomputed rather than saved: one tensor fewer kept alive per training step).
class ScalePriorFunction : public torch::autograd::Function<ScalePriorFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& h,
                                                const at::Tensor& log_scale, c10::string_view prior_name,
                                                bool compute_z) {
    ctx->save_for_backward({h, log_scale});
    ctx->saved_data["prior"] = std::string(prior_name);
    ctx->saved_data["compute_z"] = compute_z;
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto op = typed_op<decltype(scale_prior<Backend::CPU>)>("scale_prior");
    auto [z, log_prob] = op.call(h, log_scale, prior_name, compute_z);
    return {z, log_prob};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    static const auto op = typed_op<decltype(scale_prior_backward<Backend::CPU>)>("scale_prior_backward");
    // Without compute_z, z is an empty placeholder and has no gradient to pass on.
    const c10::optional<at::Tensor> grad_z =
        ctx->saved_data["compute_z"].toBool() ? c10::optional<at::Tensor>(grads[0]) : c10::nullopt;
    auto [grad_h, grad_log_scale] =
        op.call(grads[1], grad_z, saved[0], saved[1], ctx->saved_data["prior"].toStringRef());
    return {grad_h, grad_log_scale, at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> scale_prior_autograd(const at::Tensor& h, const at::Tensor& log_scale,
                                                        c10::string_view prior_name, bool compute_z) {
  const auto outputs = ScalePriorFunction::apply(h, log_scale, prior_name, compute_z);
  return {outputs[0], outputs[1]};
}

// Autograd of scale_inverse, h = exp(-s) z: dL/dz = exp(-s) dL/dh (the op itself, so that a second
// derivative exists too) and dL/ds = -sum_b dL/dh * h.
class ScaleInverseFunction : public torch::autograd::Function<ScaleInverseFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& z, const at::Tensor& log_scale) {
    at::Tensor h;
    {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      h = scale_inverse_op().call(z, log_scale);
    }
    ctx->save_for_backward({h, log_scale});
    return h;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& grad_h = grads[0];
    return {scale_inverse_op().call(grad_h, saved[1]), -(grad_h * saved[0]).sum(0)};
  }

 private:
  static const c10::TypedOperatorHandle<decltype(scale_inverse<Backend::CPU>)>& scale_inverse_op() {
    static const auto op = typed_op<decltype(scale_inverse<Backend::CPU>)>("scale_inverse");
    return op;
  }
};

at::Tensor scale_inverse_autograd(const at::Tensor& z, const at::Tensor& log_scale) {
  return ScaleInverseFunction::apply(z, log_scale);
}

constexpr char kBackward[] = "scale_prior_backward";
constexpr char kBackwardComposite[] = "scale_prior_backward_composite";

}  // namespace

TORCH_LIBRARY_IMPL(nice_ext, Autograd, m) {
  m.impl("scale_prior", &scale_prior_autograd);
  m.impl("scale_prior_backward",
         &BackwardOpAutograd<kBackward, kBackwardComposite, decltype(scale_prior_backward<Backend::CPU>)>::call);
  m.impl("scale_inverse", &scale_inverse_autograd);
}

TORCH_LIBRARY_IMPL(nice_ext, CPU, m) {
  m.impl("scale_prior", &scale_prior<Backend::CPU>);
  m.impl("scale_prior_backward", &scale_prior_backward<Backend::CPU>);
  m.impl("scale_inverse", &scale_inverse<Backend::CPU>);
}

#ifdef NICE_EXT_CUDA_DEVICE_KERNELS
TORCH_LIBRARY_IMPL(nice_ext, CUDA, m) {
  m.impl("scale_prior", &scale_prior<Backend::CUDA>);
  m.impl("scale_prior_backward", &scale_prior_backward<Backend::CUDA>);
  m.impl("scale_inverse", &scale_inverse<Backend::CUDA>);
}
#endif

}  // namespace nice_ext
