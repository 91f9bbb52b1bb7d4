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

// Whether an argument is a tensor that needs a gradient (any other argument does not).
inline bool needs_gradient(const at::Tensor& t) { return t.defined() && t.requires_grad(); }
inline bool needs_gradient(const c10::optional<at::Tensor>& t) { return t.has_value() && needs_gradient(*t); }
template <typename T>
bool needs_gradient(const T&) {
  return false;
}

// The autograd kernel of a backward op with the C++ signature Fn, named Fused, whose composite twin is
// named Composite: autograd records the call when gradient mode is on (a backward run with
// create_graph=True) and an argument needs a gradient; the twin runs then, the fused kernel otherwise.
template <const char* Fused, const char* Composite, typename Fn>
struct BackwardOpAutograd;

template <const char* Fused, const char* Composite, typename Result, typename... Args>
struct BackwardOpAutograd<Fused, Composite, Result(Args...)> {
  static Result call(Args... args) {
    if (at::GradMode::is_enabled() && (needs_gradient(args) || ...)) {
      static const auto composite = typed_op<Result(Args...)>(Composite);
      return composite.call(args...);
    }
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto fused = typed_op<Result(Args...)>(Fused);
    return fused.call(args...);
  }
};

}  // namespace nice_ext
