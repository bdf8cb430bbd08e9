// What the softmax CPU kernels receive: raw pointers, dtypes and the row layout, built and
// checked by csrc/softmax/softmax_cpu.cpp.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "../common/cpu_dispatch.h"
#include "../common/rows.h"

namespace fastattn::cpu {

enum class MaskKind { kNone, kBool, kAdditive };

// Row tensors: fwd 0 input, 1 output, 2 mask; bwd 0 grad_output, 1 output, 2 grad_input, 3 mask.
struct SoftmaxParams {
  const RowLayout* layout;
  const void* in[2];  // fwd: {input}; bwd: {grad_output, output}
  c10::ScalarType in_dtype[2];
  void* out;  // fwd: output; bwd: grad_input (rows contiguous)
  c10::ScalarType out_dtype;
  const void* mask;
  c10::ScalarType mask_dtype;
  MaskKind mask_kind;
  double scale;
  bool causal;
  bool log;
  bool acc_double;  // accumulate in double (a float64 tensor is involved), else float
};

FASTATTN_DECLARE_CPU_KERNEL(void, softmax_fwd_rows, const SoftmaxParams&, int64_t, int64_t)
FASTATTN_DECLARE_CPU_KERNEL(void, softmax_bwd_rows, const SoftmaxParams&, int64_t, int64_t)

}  // namespace fastattn::cpu
