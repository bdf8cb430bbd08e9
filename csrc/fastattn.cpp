// The schema of every C++ op of fastattn, and the stub that makes the library importable.
//
// The ops live in the `fastattn` namespace beside the Python custom ops of fastattn/ops/
// (`fastattn::softmax_fwd`, ... registered from Python as a FRAGMENT of the same namespace), so
// every C++ op carries the `native_` prefix. Kernels register per device in the op folders
// (TORCH_LIBRARY_IMPL(fastattn, CPU, m) in csrc/<op>/<op>_cpu.cpp); the fake (meta) functions
// that torch.compile and opcheck need are registered in Python, in fastattn/_ext.py, named here
// by set_python_module so that torch finds them.
//
// The `_fwd`/`_bwd` ops are the kernels of the `native` backend, not differentiable on their
// own: fastattn/ops/ gives them autograd in Python (custom ops, traced by torch.compile). The
// differentiable ops without a suffix (`native_softmax`, ...) join a forward and its backward
// in C++ (csrc/<op>/<op>_autograd.cpp), for eager calls: no Python runs between the kernels.

#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import fastattn._C` loads this library, which runs the static registrars below and in
// the op folders. There is no Python API: the module is empty and the ops are reached through
// torch.ops.fastattn.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastattn, m) {
  m.set_python_module("fastattn._ext");
  // (Log-)softmax of `input` along `dim` with fused scale, mask and causal mask; the launcher
  // contract of fastattn.reference.softmax_fwd. The output is laid out as
  // fastattn.reference.row_output (contiguous with `dim` moved last).
  m.def(
      "native_softmax_fwd(Tensor input, int dim, float scale, Tensor? mask, bool causal, "
      "bool log, ScalarType out_dtype) -> Tensor");
  // d(input) from d(output) and the saved output; fastattn.reference.softmax_bwd.
  m.def(
      "native_softmax_bwd(Tensor grad_output, Tensor output, int dim, float scale, Tensor? mask, "
      "bool causal, bool log, ScalarType input_dtype) -> Tensor");
  // Differentiable in `input`: native_softmax_fwd, with native_softmax_bwd as its backward.
  // `mask` must not require grad.
  m.def(
      "native_softmax(Tensor input, int dim, float scale, Tensor? mask, bool causal, bool log, "
      "ScalarType out_dtype) -> Tensor");
  // Cross-entropy of (N, C, d1, ...) logits: (loss, lse) and, when `grad` is given, the
  // gradient of the loss for a unit upstream gradient written into it (`grad` may be `input`
  // itself); fastattn.reference.cross_entropy_fwd. `reduction` indexes ("none", "mean", "sum").
  m.def(
      "native_cross_entropy_fwd(Tensor input, Tensor target, Tensor? weight, int ignore_index, "
      "int reduction, float label_smoothing, float z_loss, float softcap, Tensor(a!)? grad) "
      "-> (Tensor, Tensor)");
  // Differentiable in `input`: (loss, lse) of native_cross_entropy_fwd, which also writes the
  // gradient when `input` requires grad; backward scales it. `target` must not require grad.
  m.def(
      "native_cross_entropy(Tensor input, Tensor target, Tensor? weight, int ignore_index, "
      "int reduction, float label_smoothing, float z_loss, float softcap) -> (Tensor, Tensor)");
  // Attention in the normalised form of fastattn.reference: q (B, Hq, L, D), k (B, Hk, S, D),
  // v (B, Hk, S, Dv) with any strides, mask broadcast to (B, Hq, L, S); (out, lse) as
  // fastattn.reference.attention_fwd (out laid out by fastattn.reference.attention_output).
  m.def(
      "native_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? seed, "
      "float dropout_p, float scale, int window_left, int window_right, bool align_bottom, "
      "float softcap) -> (Tensor, Tensor)");
  // (dq, dk, dv, dmask) as fastattn.reference.attention_bwd: dq, dk, dv like q, k, v; dmask
  // (B, Hq, L, S) in the accumulation dtype when mask_grad, else empty. Always deterministic.
  m.def(
      "native_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor? mask, Tensor? seed, float dropout_p, float scale, int window_left, "
      "int window_right, bool align_bottom, float softcap, bool mask_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Differentiable in q, k and v: native_attention_fwd, with native_attention_bwd as its
  // backward (no mask gradient: `mask` must not require grad).
  m.def(
      "native_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? seed, "
      "float dropout_p, float scale, int window_left, int window_right, bool align_bottom, "
      "float softcap) -> (Tensor, Tensor)");
  // The dropout keep mask (bool, shape (B, Hq, L, S)) the attention kernels draw for `seed`.
  m.def("native_attention_dropout_mask(Tensor seed, int[] shape, float dropout_p) -> Tensor");
}
