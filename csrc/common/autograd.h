// Shared pieces of the C++ autograd of the native ops (csrc/<op>/<op>_autograd.cpp).
//
// Each differentiable op (`native_softmax`, `native_cross_entropy`, `native_attention`) joins
// the op's forward and backward kernels under a torch::autograd::Function, so an eager
// forward+backward on the native backend runs no Python between or inside the two kernels.
// The kernels are reached through the dispatcher, so one autograd serves CPU and CUDA tensors.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

namespace fastattn {

// The typed handle of the C++ op `fastattn::<name>`, looked up once per call site.
template <class Signature>
c10::TypedOperatorHandle<Signature> native_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Registered as the Autograd kernel of the backward ops: computing a gradient with
// create_graph=True works, differentiating that gradient again raises "derivative for
// fastattn::native_<op>_bwd is not implemented" instead of silently leaving out the backward's
// own dependence on its inputs.
inline torch::CppFunction no_double_backward() {
  return torch::autograd::autogradNotImplementedFallback();
}

// Runs `call` (a backward op) from a Function's backward: below autograd in a plain backward,
// through the op's no_double_backward() kernel under create_graph=True, so that the gradient
// it returns refuses to be differentiated.
template <typename F>
auto backward_op(F&& call) {
  if (at::GradMode::is_enabled()) return call();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return call();
}

}  // namespace fastattn
