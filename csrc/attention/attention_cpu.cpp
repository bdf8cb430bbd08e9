// CPU launcher of fastattn::native_attention_fwd / native_attention_bwd /
// native_attention_dropout_mask: checks, outputs, at::parallel_for over the kernels' tasks, and
// the kernel copy for this CPU (attention_cpu_kernel.h).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <optional>
#include <tuple>

#include "../common/checks.h"
#include "attention.h"
#include "attention_args.h"

namespace fastattn {
namespace {

using cpu::AttentionParams;
using cpu::AttnMask;

void strides4(const at::Tensor& t, int64_t* s) {
  for (int d = 0; d < 4; ++d) s[d] = t.size(d) == 1 ? 0 : t.stride(d);
}

// Runs f(tasks) on up to n of at::parallel_for's threads, each popping tasks from one queue
// (cpu::TaskQueue says why) until all n are done.
template <typename F>
void parallel_tasks(int64_t n, const F& f) {
  cpu::TaskQueue tasks;
  tasks.n = n;
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { f(tasks); });
}

// fastattn.reference.attention_output: (B, Hq, L, Dv), laid out (B, L, Hq, Dv) in memory when q
// is (flash-attn's layout), else contiguous.
at::Tensor attention_output(const at::Tensor& q, int64_t Dv) {
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2);
  if (H > 1 && L > 1 && q.stride(1) < q.stride(2)) {
    return at::empty({B, L, H, Dv}, q.options()).transpose(1, 2);
  }
  return at::empty({B, H, L, Dv}, q.options());
}

// Checks every argument the forward and backward share and fills the shape, input and option
// fields of `p`; `mask_view` keeps the mask broadcast to (B, Hq, L, S) alive.
void check_and_fill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& seed,
                    double dropout_p, double scale, int64_t left, int64_t right,
                    bool align_bottom, double softcap, AttentionParams& p,
                    at::Tensor& mask_view) {
  check_cpu_float(q, "q");
  check_cpu_float(k, "k");
  check_cpu_float(v, "v");
  check_attention_args(q, k, v, scale, softcap, left, right, dropout_p);
  p = AttentionParams{};
  p.B = q.size(0);
  p.Hq = q.size(1);
  p.L = q.size(2);
  p.D = q.size(3);
  p.Hk = k.size(1);
  p.S = k.size(2);
  p.Dv = v.size(3);
  p.dtype = q.scalar_type();
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  strides4(q, p.sq);
  strides4(k, p.sk);
  strides4(v, p.sv);
  p.mask_kind = AttnMask::kNone;
  p.mask_dtype = at::kFloat;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.device().is_cpu(), "mask must be a CPU tensor, got a tensor on ", m.device());
    TORCH_CHECK(m.scalar_type() == at::kBool || is_kernel_float(m.scalar_type()),
                "mask must be bool or float32/float64/float16/bfloat16, got ", m.scalar_type());
    const std::vector<int64_t> full{p.B, p.Hq, p.L, p.S};
    check_broadcasts(m, full, "mask");
    mask_view = m.expand(full);
    p.mask = mask_view.data_ptr();
    p.mask_dtype = m.scalar_type();
    p.mask_kind = m.scalar_type() == at::kBool ? AttnMask::kBool : AttnMask::kAdditive;
    strides4(mask_view, p.sm);
  }
  p.dropout_p = dropout_p;
  if (dropout_p > 0) {
    TORCH_CHECK(seed.has_value(), "seed must be given when dropout_p > 0");
    const at::Tensor& s = *seed;
    TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kLong && s.numel() >= 1,
                "seed must be a CPU int64 tensor with at least one element, got ",
                s.scalar_type(), " of shape ", s.sizes(), " on ", s.device());
    p.seed = static_cast<uint64_t>(s.reshape(-1)[0].item<int64_t>());
  }
  p.scale = scale;
  p.softcap = softcap;
  p.left = left;
  p.right = right;
  p.offset = align_bottom ? p.S - p.L : 0;
  p.acc_double = p.dtype == at::kDouble;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& seed,
    double dropout_p, double scale, int64_t window_left, int64_t window_right, bool align_bottom,
    double softcap) {
  AttentionParams p;
  at::Tensor mask_view;
  check_and_fill(q, k, v, mask, seed, dropout_p, scale, window_left, window_right, align_bottom,
                 softcap, p, mask_view);
  at::Tensor out = attention_output(q, p.Dv);
  at::Tensor lse = at::empty({p.B, p.Hq, p.L}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  p.out = out.data_ptr();
  strides4(out, p.so);
  p.lse = lse.data_ptr<float>();
  const int64_t blocks = (p.S + cpu::kBlockN - 1) / cpu::kBlockN;
  const int64_t tiles = (p.L + cpu::kBlockM - 1) / cpu::kBlockM;
  at::Tensor work = at::empty({cpu::fwd_work_elements(p)},
                              q.options().dtype(p.acc_double ? at::kDouble : at::kFloat));
  p.work = work.data_ptr();
  auto tiles_kernel = FASTATTN_CPU_KERNEL(attention_fwd_tiles);
  const int64_t nblocks = p.B * p.Hk * blocks;
  std::unique_ptr<std::atomic<uint8_t>[]> pack_state(new std::atomic<uint8_t>[nblocks]);
  for (int64_t i = 0; i < nblocks; ++i) pack_state[i].store(0);
  p.pack_state = pack_state.get();
  parallel_tasks(p.B * p.Hq * tiles, [&](cpu::TaskQueue& tasks) { tiles_kernel(p, tasks); });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& seed, double dropout_p, double scale, int64_t window_left,
    int64_t window_right, bool align_bottom, double softcap, bool mask_grad) {
  AttentionParams p;
  at::Tensor mask_view;
  check_and_fill(q, k, v, mask, seed, dropout_p, scale, window_left, window_right, align_bottom,
                 softcap, p, mask_view);
  const std::vector<int64_t> out_shape{p.B, p.Hq, p.L, p.Dv};
  check_cpu_float(grad_out, "grad_out");
  check_cpu_float(out, "out");
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(out_shape), "grad_out must have shape ",
              out_shape, " (B, Hq, L, Dv), got ", grad_out.sizes());
  TORCH_CHECK(out.sizes() == at::IntArrayRef(out_shape), "out must have shape ", out_shape,
              " (B, Hq, L, Dv), got ", out.sizes());
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == at::kFloat,
              "lse must be a CPU float32 tensor, got ", lse.scalar_type(), " on ", lse.device());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({p.B, p.Hq, p.L}), "lse must have shape [", p.B,
              ", ", p.Hq, ", ", p.L, "] (B, Hq, L), got ", lse.sizes());
  TORCH_CHECK(!mask_grad || p.mask_kind == AttnMask::kAdditive,
              "mask_grad=True needs an additive (floating) mask");
  at::Tensor dq = at::empty_like(q);
  at::Tensor dk = at::empty_like(k);
  at::Tensor dv = at::empty_like(v);
  const auto acc = p.acc_double ? at::kDouble : at::kFloat;
  at::Tensor dmask = mask_grad ? at::zeros({p.B, p.Hq, p.L, p.S}, q.options().dtype(acc))
                               : at::empty({0}, q.options().dtype(acc));
  if (p.B * p.Hk == 0) return {dq, dk, dv, dmask};
  const at::Tensor lse_c = lse.contiguous();
  p.grad_out = grad_out.data_ptr();
  p.grad_out_dtype = grad_out.scalar_type();
  strides4(grad_out, p.sg);
  p.out_in = out.data_ptr();
  p.out_dtype = out.scalar_type();
  strides4(out, p.soi);
  p.lse_in = lse_c.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  strides4(dq, p.sdq);
  strides4(dk, p.sdk);
  strides4(dv, p.sdv);
  p.dmask = mask_grad ? dmask.data_ptr() : nullptr;
  // Fewer key/value heads than threads: split each head's keys into ranges, each adding its
  // part of dq into its own buffer, summed in range order afterwards (so the result depends on
  // the thread count, never on scheduling). Float64 keeps one range: it recomputes lse over
  // every key.
  const int64_t heads = p.B * p.Hk, threads = at::get_num_threads();
  const int64_t blocks = (p.S + cpu::kBlockN - 1) / cpu::kBlockN;
  p.chunks = 1;
  if (!p.acc_double && heads < threads && blocks > 1) {
    p.chunks = std::min(blocks, (2 * threads + heads - 1) / heads);
  }
  at::Tensor dq_part;
  if (p.chunks > 1) {
    dq_part = at::empty({p.chunks, p.B, p.Hq, p.L, p.D}, q.options().dtype(acc));
    p.dq_part = dq_part.data_ptr();
  }
  auto kernel = FASTATTN_CPU_KERNEL(attention_bwd_heads);
  parallel_tasks(heads * p.chunks, [&](cpu::TaskQueue& tasks) { kernel(p, tasks); });
  if (p.chunks > 1) {
    auto reduce = FASTATTN_CPU_KERNEL(attention_bwd_dq_reduce);
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(p.D * p.chunks, 1));
    at::parallel_for(0, p.B * p.Hq * p.L, grain,
                     [&](int64_t begin, int64_t end) { reduce(p, begin, end); });
  }
  return {dq, dk, dv, dmask};
}

at::Tensor attention_dropout_mask_cpu(const at::Tensor& seed, at::IntArrayRef shape,
                                      double dropout_p) {
  TORCH_CHECK(seed.device().is_cpu() && seed.scalar_type() == at::kLong && seed.numel() >= 1,
              "seed must be a CPU int64 tensor with at least one element, got ",
              seed.scalar_type(), " of shape ", seed.sizes(), " on ", seed.device());
  TORCH_CHECK(shape.size() == 4, "shape must be (B, Hq, L, S), got ", shape);
  for (int64_t s : shape) TORCH_CHECK(s >= 0, "shape must be non-negative, got ", shape);
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, "dropout_p must be in [0, 1), got ", dropout_p);
  at::Tensor keep = at::empty(shape, seed.options().dtype(at::kBool));
  const uint64_t s = static_cast<uint64_t>(seed.reshape(-1)[0].item<int64_t>());
  const uint64_t threshold = cpu::dropout_threshold(dropout_p);
  bool* out = keep.data_ptr<bool>();
  // The flat index of element (b, h, i, j) of a contiguous (B, Hq, L, S) tensor is the
  // generator's counter.
  at::parallel_for(0, keep.numel(), 32768, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      out[n] = cpu::dropout_keep(s, static_cast<uint64_t>(n), threshold);
    }
  });
  return keep;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("native_attention_fwd", &attention_fwd_cpu);
  m.impl("native_attention_bwd", &attention_bwd_cpu);
  m.impl("native_attention_dropout_mask", &attention_dropout_mask_cpu);
}

}  // namespace fastattn
