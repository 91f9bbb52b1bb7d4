// What the autograd kernels of the nice_ext operators share (the kernels themselves are next to each
// op's entry points: csrc/coupling.cpp, csrc/affine_coupling.cpp, csrc/scale_prior.cpp).
//
// Autograd is written in C++ (torch::autograd::Function, registered for the Autograd dispatch key)
// rather than with torch.library.register_autograd from Python: a Python autograd.Function costs
// about 60 us of interpreter work per call that needs a gradient, which dominates a small model's step
// and an eager step on a GPU. torch.compile and torch.export trace through these kernels like any other.
//
// The backward ops have an autograd kernel too, for higher-order gradients: a backward that autograd
// records (create_graph=True, with an input that needs a gradient) runs the op's composite twin,
// <op>_backward_composite, the same gradients in differentiable ATen ops (nice_ext/reference.py), which
// autograd then differentiates to any order. Every other backward runs the fused kernel.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <initializer_list>
#include <string>

namespace nice_ext {

// The operator nice_ext::<name> with the C++ signature Fn (the decltype of one of its entry points).
// Forward calls are made below autograd (at::AutoDispatchBelowADInplaceOrView), so that they reach the
// backend or fake kernel; backward calls go through the whole dispatcher.
template <typename Fn>
c10::TypedOperatorHandle<Fn> typed_op(const char* name) {
  const std::string qualified = std::string("nice_ext::") + name;
  return c10::Dispatcher::singleton().findSchemaOrThrow(qualified.c_str(), "").template typed<Fn>();
}

// An integer saved by a forward (possibly symbolic under torch.compile) as the int an op's schema takes.
inline int64_t saved_int(torch::autograd::AutogradContext* ctx, const std::string& name) {
  return ctx->saved_data.at(name).toSymInt().guard_int(__FILE__, __LINE__);
}

// Whether autograd records a call with these inputs: gradient mode is on (a backward run with
// create_graph=True) and one of them needs a gradient.
inline bool gradient_recorded(std::initializer_list<c10::optional<at::Tensor>> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const auto& input : inputs) {
    if (input.has_value() && input->defined() && input->requires_grad()) return true;
  }
  return false;
}

}  // namespace nice_ext
