// Entry points of the masked affine coupling update (schema: csrc/ops.cpp) for every backend: check the
// arguments, normalise layouts, allocate the outputs, run the backend's kernel; and its autograd.
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "autograd.h"
#include "nice_ext.h"

namespace nice_ext {
namespace {

template <Backend backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_coupling_update(
    const at::Tensor& x_in, const at::Tensor& log_scale_raw_in, const at::Tensor& shift_in,
    const at::Tensor& shift_col_in, const at::Tensor& gather_index_in, c10::string_view law_name, bool inverse) {
  check_affine_coupling_update(x_in, log_scale_raw_in, shift_in, shift_col_in, gather_index_in);
  const AffineLaw law = parse_affine_law(std::string(law_name));
  const c10::OptionalDeviceGuard guard(x_in.device());
  // The network's output (B, 2|I2|) is usually split into log_scale_raw and shift by chunk(): two views
  // with unit feature stride, read in place.
  const at::Tensor x = unit_feature_stride(x_in);
  const at::Tensor log_scale_raw = unit_feature_stride(log_scale_raw_in);
  const at::Tensor shift = unit_feature_stride(shift_in);
  const at::Tensor shift_col = shift_col_in.contiguous();
  const at::Tensor gather_index = gather_index_in.contiguous();
  const int64_t batch = x.size(0);
  at::Tensor y = at::empty({batch, x.size(1)}, x.options());
  at::Tensor gathered = at::empty({batch, gather_index.size(0)}, x.options());
  at::Tensor log_det = at::empty({batch}, x.options().dtype(log_prob_dtype(x.scalar_type())));
  if (batch == 0) return {y, gathered, log_det};
  NICE_EXT_RUN_KERNEL(backend, affine_coupling_update, x, log_scale_raw, shift, shift_col, gather_index, law, inverse,
                      y, gathered, log_det);
  return {y, gathered, log_det};
}

template <Backend backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_coupling_update_backward(
    const at::Tensor& grad_y_in, const c10::optional<at::Tensor>& grad_gathered_in,
    const c10::optional<at::Tensor>& grad_log_det_in, const at::Tensor& x_in, const at::Tensor& log_scale_raw_in,
    const at::Tensor& shift_in, const at::Tensor& shift_col_in, const at::Tensor& gather_index_in,
    c10::string_view law_name, bool inverse) {
  check_affine_coupling_update_backward(grad_y_in, grad_gathered_in, grad_log_det_in, x_in, log_scale_raw_in, shift_in,
                                        shift_col_in, gather_index_in);
  const AffineLaw law = parse_affine_law(std::string(law_name));
  const c10::OptionalDeviceGuard guard(x_in.device());
  const at::Tensor grad_y = unit_feature_stride(grad_y_in);
  const bool has_gathered = grad_gathered_in.has_value() && grad_gathered_in->defined();
  const at::Tensor grad_gathered = has_gathered ? unit_feature_stride(*grad_gathered_in) : at::Tensor();
  const bool has_log_det = grad_log_det_in.has_value() && grad_log_det_in->defined();
  // log_det is float32 for half inputs, and so is its gradient as the kernels read it.
  const at::Tensor grad_log_det =
      has_log_det ? grad_log_det_in->to(x_in.options().dtype(log_prob_dtype(x_in.scalar_type()))).contiguous()
                  : at::Tensor();
  const at::Tensor x = unit_feature_stride(x_in);
  const at::Tensor log_scale_raw = unit_feature_stride(log_scale_raw_in);
  const at::Tensor shift = unit_feature_stride(shift_in);
  const at::Tensor shift_col = shift_col_in.contiguous();
  const at::Tensor gather_index = gather_index_in.contiguous();
  const int64_t batch = x.size(0), updated = shift.size(1);
  at::Tensor grad_x = at::empty({batch, x.size(1)}, x.options());
  at::Tensor grad_log_scale_raw = at::empty({batch, updated}, x.options());
  at::Tensor grad_shift = at::empty({batch, updated}, x.options());
  if (batch == 0) return {grad_x, grad_log_scale_raw, grad_shift};
  NICE_EXT_RUN_KERNEL(backend, affine_coupling_update_backward, grad_y, grad_gathered, grad_log_det, x, log_scale_raw,
                      shift, shift_col, gather_index, law, inverse, grad_x, grad_log_scale_raw, grad_shift);
  return {grad_x, grad_log_scale_raw, grad_shift};
}

// Autograd: the backward needs the op's inputs (x, the log-scales and the shift; see
// affine_coupling_grads in nice_ext.h) and reads the gradients of all three outputs.
class AffineCouplingUpdateFunction : public torch::autograd::Function<AffineCouplingUpdateFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const at::Tensor& log_scale_raw, const at::Tensor& shift,
                                                const at::Tensor& shift_col, const at::Tensor& gather_index,
                                                c10::string_view law_name, bool inverse) {
    ctx->save_for_backward({x, log_scale_raw, shift, shift_col, gather_index});
    ctx->saved_data["law"] = std::string(law_name);
    ctx->saved_data["inverse"] = inverse;
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto op = typed_op<decltype(affine_coupling_update<Backend::CPU>)>("affine_coupling_update");
    auto [y, gathered, log_det] = op.call(x, log_scale_raw, shift, shift_col, gather_index, law_name, inverse);
    return {y, gathered, log_det};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    static const auto op =
        typed_op<decltype(affine_coupling_update_backward<Backend::CPU>)>("affine_coupling_update_backward");
    auto [grad_x, grad_log_scale_raw, grad_shift] =
        op.call(grads[0], grads[1], grads[2], saved[0], saved[1], saved[2], saved[3], saved[4],
                ctx->saved_data["law"].toStringRef(), ctx->saved_data["inverse"].toBool());
    return {grad_x, grad_log_scale_raw, grad_shift, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_coupling_update_autograd(
    const at::Tensor& x, const at::Tensor& log_scale_raw, const at::Tensor& shift, const at::Tensor& shift_col,
    const at::Tensor& gather_index, c10::string_view law_name, bool inverse) {
  const auto outputs =
      AffineCouplingUpdateFunction::apply(x, log_scale_raw, shift, shift_col, gather_index, law_name, inverse);
  return {outputs[0], outputs[1], outputs[2]};
}

constexpr char kBackward[] = "affine_coupling_update_backward";
constexpr char kBackwardComposite[] = "affine_coupling_update_backward_composite";

}  // namespace

TORCH_LIBRARY_IMPL(nice_ext, Autograd, m) {
  m.impl("affine_coupling_update", &affine_coupling_update_autograd);
  m.impl("affine_coupling_update_backward",
         &BackwardOpAutograd<kBackward, kBackwardComposite,
                             decltype(affine_coupling_update_backward<Backend::CPU>)>::call);
}

TORCH_LIBRARY_IMPL(nice_ext, CPU, m) {
  m.impl("affine_coupling_update", &affine_coupling_update<Backend::CPU>);
  m.impl("affine_coupling_update_backward", &affine_coupling_update_backward<Backend::CPU>);
}

#ifdef NICE_EXT_CUDA_DEVICE_KERNELS
TORCH_LIBRARY_IMPL(nice_ext, CUDA, m) {
  m.impl("affine_coupling_update", &affine_coupling_update<Backend::CUDA>);
  m.impl("affine_coupling_update_backward", &affine_coupling_update_backward<Backend::CUDA>);
}
#endif

}  // namespace nice_ext
