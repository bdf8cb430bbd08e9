// What the cross-entropy CPU kernels receive, built and checked by cross_entropy_cpu.cpp.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "../common/cpu_dispatch.h"
#include "../common/rows.h"

namespace fastattn::cpu {

// Row tensors (tokens; the row is the class dim): 0 input, 1 target, 2 grad.
struct CrossEntropyParams {
  const RowLayout* layout;
  const void* input;
  c10::ScalarType input_dtype;
  const void* target;  // int64 class indices (one per token), or probabilities (a row)
  c10::ScalarType target_dtype;
  bool probability;
  const void* weight;  // (C,) contiguous in the accumulation dtype, or null
  void* grad;          // input's dtype, or null
  void* loss;          // (tokens,) accumulation dtype, per token
  float* lse;          // (tokens,)
  int64_t ignore_index;
  double one_minus_eps;  // 1 - label_smoothing
  double eps_per_class;  // label_smoothing / C
  double z_loss;
  double softcap;        // 0: off
  double grad_scale;     // 1 / denominator for mean, else 1
  bool acc_double;
};

FASTATTN_DECLARE_CPU_KERNEL(void, cross_entropy_fwd_rows, const CrossEntropyParams&, int64_t,
                            int64_t)

}  // namespace fastattn::cpu
