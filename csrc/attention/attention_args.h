// The argument checks the CPU and CUDA attention launchers share (attention_cpu.cpp,
// attention_cuda.cuh): the shapes of q, k and v against each other and the options. Each
// launcher checks devices and dtypes its own way first and its own limits after.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

namespace fastattn {

inline void check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 double scale, double softcap, int64_t left, int64_t right,
                                 double dropout_p) {
  TORCH_CHECK(q.dim() == 4, "q must be 4-d (B, Hq, L, D), got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "k must be 4-d (B, Hk, S, D), got shape ", k.sizes());
  TORCH_CHECK(v.dim() == 4, "v must be 4-d (B, Hk, S, Dv), got shape ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k and v must have the same dtype, got ", q.scalar_type(), ", ",
              k.scalar_type(), " and ", v.scalar_type());
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0),
              "k and v must have q's batch size ", q.size(0), ", got ", k.size(0), " and ",
              v.size(0));
  TORCH_CHECK(v.size(1) == k.size(1), "v must have k's number of heads ", k.size(1), ", got ",
              v.size(1));
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "q's heads (", q.size(1),
              ") must be a multiple of k's heads (", k.size(1), ")");
  TORCH_CHECK(k.size(3) == q.size(3), "k must have q's head dim ", q.size(3), ", got ",
              k.size(3));
  TORCH_CHECK(v.size(2) == k.size(2), "v must have k's number of positions ", k.size(2),
              ", got ", v.size(2));
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, "softcap must be finite and >= 0, got ",
              softcap);
  TORCH_CHECK(left >= -1 && right >= -1, "window_left and window_right must be >= -1, got ",
              left, " and ", right);
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, "dropout_p must be in [0, 1), got ", dropout_p);
}

}  // namespace fastattn
