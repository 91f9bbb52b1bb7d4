// Entry points of the masked additive coupling update (schema: csrc/ops.cpp) for every backend: check
// the arguments, normalise layouts, allocate the outputs, run the backend's kernel; and its autograd.
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "autograd.h"
#include "nice_ext.h"

namespace nice_ext {
namespace {

template <Backend backend>
std::tuple<at::Tensor, at::Tensor> coupling_update(const at::Tensor& x_in, const at::Tensor& shift_in,
                                                   const at::Tensor& shift_col_in, const at::Tensor& gather_index_in,
                                                   bool inverse) {
  check_coupling_update(x_in, shift_in, shift_col_in, gather_index_in);
  const c10::OptionalDeviceGuard guard(x_in.device());
  const at::Tensor x = unit_feature_stride(x_in);
  const at::Tensor shift = unit_feature_stride(shift_in);
  const at::Tensor shift_col = shift_col_in.contiguous();
  const at::Tensor gather_index = gather_index_in.contiguous();
  at::Tensor y = at::empty({x.size(0), x.size(1)}, x.options());
  at::Tensor gathered = at::empty({x.size(0), gather_index.size(0)}, x.options());
  if (x.size(0) == 0) return {y, gathered};
  NICE_EXT_RUN_KERNEL(backend, coupling_update, x, shift, shift_col, gather_index, inverse, y, gathered);
  return {y, gathered};
}

template <Backend backend>
std::tuple<at::Tensor, at::Tensor> coupling_update_backward(const at::Tensor& grad_y_in,
                                                            const c10::optional<at::Tensor>& grad_gathered_in,
                                                            const at::Tensor& shift_col_in,
                                                            const at::Tensor& gather_index_in, int64_t updated,
                                                            bool inverse) {
  check_coupling_update_backward(grad_y_in, grad_gathered_in, shift_col_in, gather_index_in, updated);
  const c10::OptionalDeviceGuard guard(grad_y_in.device());
  const at::Tensor grad_y = unit_feature_stride(grad_y_in);
  const bool has_gathered = grad_gathered_in.has_value() && grad_gathered_in->defined();
  const at::Tensor grad_gathered = has_gathered ? unit_feature_stride(*grad_gathered_in) : at::Tensor();
  const at::Tensor shift_col = shift_col_in.contiguous();
  const at::Tensor gather_index = gather_index_in.contiguous();
  at::Tensor grad_x = at::empty({grad_y.size(0), grad_y.size(1)}, grad_y.options());
  at::Tensor grad_shift = at::empty({grad_y.size(0), updated}, grad_y.options());
  if (grad_y.size(0) == 0) return {grad_x, grad_shift};
  NICE_EXT_RUN_KERNEL(backend, coupling_update_backward, grad_y, grad_gathered, shift_col, gather_index, inverse,
                      grad_x, grad_shift);
  return {grad_x, grad_shift};
}

// Autograd: the Jacobian of y with respect to x is the identity, and shift enters y_I2 with the sign, so
// the backward is the same walk over the index maps (coupling_update_backward) with the gradients.
class CouplingUpdateFunction : public torch::autograd::Function<CouplingUpdateFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const at::Tensor& shift, const at::Tensor& shift_col,
                                                const at::Tensor& gather_index, bool inverse) {
    ctx->save_for_backward({shift_col, gather_index});
    ctx->saved_data["updated"] = shift.sym_size(1);
    ctx->saved_data["inverse"] = inverse;
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto op = typed_op<decltype(coupling_update<Backend::CPU>)>("coupling_update");
    auto [y, gathered] = op.call(x, shift, shift_col, gather_index, inverse);
    return {y, gathered};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    static const auto op = typed_op<decltype(coupling_update_backward<Backend::CPU>)>("coupling_update_backward");
    auto [grad_x, grad_shift] = op.call(grads[0], grads[1], saved[0], saved[1],
                                        saved_int(ctx, "updated"), ctx->saved_data["inverse"].toBool());
    return {grad_x, grad_shift, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> coupling_update_autograd(const at::Tensor& x, const at::Tensor& shift,
                                                            const at::Tensor& shift_col, const at::Tensor& gather_index,
                                                            bool inverse) {
  const auto outputs = CouplingUpdateFunction::apply(x, shift, shift_col, gather_index, inverse);
  return {outputs[0], outputs[1]};
}

constexpr char kBackward[] = "coupling_update_backward";
constexpr char kBackwardComposite[] = "coupling_update_backward_composite";

}  // namespace

TORCH_LIBRARY_IMPL(nice_ext, Autograd, m) {
  m.impl("coupling_update", &coupling_update_autograd);
  m.impl("coupling_update_backward",
         &BackwardOpAutograd<kBackward, kBackwardComposite, decltype(coupling_update_backward<Backend::CPU>)>::call);
}

TORCH_LIBRARY_IMPL(nice_ext, CPU, m) {
  m.impl("coupling_update", &coupling_update<Backend::CPU>);
  m.impl("coupling_update_backward", &coupling_update_backward<Backend::CPU>);
}

#ifdef NICE_EXT_CUDA_DEVICE_KERNELS
TORCH_LIBRARY_IMPL(nice_ext, CUDA, m) {
  m.impl("coupling_update", &coupling_update<Backend::CUDA>);
  m.impl("coupling_update_backward", &coupling_update_backward<Backend::CUDA>);
}
#endif

}  // namespace nice_ext
