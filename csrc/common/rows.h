// Rows of a row-wise op: every dim but the reduced one is a *leading* dim, and each tensor
// reaches its rows through its own strides (a broadcast mask through zero strides, a class dim
// in the middle of (N, C, d1, ...) through the stride of dim 1), so nothing is copied or
// expanded in memory. Offsets are in elements and 64-bit: rows x columns exceeds 2^31 elements
// in real training.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdint>
#include <vector>

namespace fastattn::cpu {

constexpr int kMaxRowTensors = 4;

struct RowLayout {
  std::vector<int64_t> sizes;                                // leading sizes, outermost first
  std::array<std::vector<int64_t>, kMaxRowTensors> strides;  // per tensor, per leading dim
  std::array<int64_t, kMaxRowTensors> col_stride{};          // per tensor, along the row
  int64_t rows = 1;
  int64_t cols = 0;

  // Whether tensor `slot`'s rows are contiguous: column stride 1, or a single column (stride
  // 0). A broadcast row (stride 0, more than one column) is not.
  bool unit_cols(int slot) const { return col_stride[slot] == 1 || cols == 1; }

  // Rows of `shape` reduced along `dim`; tensors are added with add(), in order.
  RowLayout(at::IntArrayRef shape, int64_t dim) : cols(shape[dim]) {
    for (int64_t d = 0; d < static_cast<int64_t>(shape.size()); ++d) {
      if (d != dim) {
        sizes.push_back(shape[d]);
        rows *= shape[d];
      }
    }
    dim_ = dim;
  }

  // Register tensor `slot` with the strides of `t` (same number of dims as the shape, size-1 or
  // broadcast dims allowed with any stride), or of nothing (all strides 0) when undefined.
  void add(int slot, const at::Tensor& t) {
    TORCH_INTERNAL_ASSERT(slot < kMaxRowTensors);
    auto& s = strides[slot];
    s.clear();
    if (!t.defined()) {
      s.assign(sizes.size(), 0);
      col_stride[slot] = 0;
      return;
    }
    for (int64_t d = 0; d < t.dim(); ++d) {
      if (d != dim_) s.push_back(t.size(d) == 1 ? 0 : t.stride(d));
    }
    col_stride[slot] = t.size(dim_) == 1 ? 0 : t.stride(dim_);
  }

 private:
  int64_t dim_;
};

// Walks rows begin, begin + 1, ... keeping each tensor's row offset (an odometer over the
// leading dims, one division per dim at the start only).
class RowCursor {
 public:
  RowCursor(const RowLayout& layout, int64_t row) : l_(layout), index_(layout.sizes.size()) {
    for (int64_t d = static_cast<int64_t>(index_.size()) - 1; d >= 0; --d) {
      index_[d] = row % l_.sizes[d];
      row /= l_.sizes[d];
    }
    for (int t = 0; t < kMaxRowTensors; ++t) {
      offset_[t] = 0;
      for (size_t d = 0; d < index_.size(); ++d) offset_[t] += index_[d] * stride(t, d);
    }
  }

  int64_t offset(int t) const { return offset_[t]; }
  // Index along the innermost leading dim (the query row of causal masking).
  int64_t inner_index() const { return index_.empty() ? 0 : index_.back(); }

  void next() {
    for (int64_t d = static_cast<int64_t>(index_.size()) - 1; d >= 0; --d) {
      if (++index_[d] < l_.sizes[d]) {
        for (int t = 0; t < kMaxRowTensors; ++t) offset_[t] += stride(t, d);
        return;
      }
      for (int t = 0; t < kMaxRowTensors; ++t) offset_[t] -= (l_.sizes[d] - 1) * stride(t, d);
      index_[d] = 0;
    }
  }

 private:
  int64_t stride(int t, size_t d) const {
    return l_.strides[t].empty() ? 0 : l_.strides[t][d];
  }

  const RowLayout& l_;
  std::vector<int64_t> index_;
  std::array<int64_t, kMaxRowTensors> offset_{};
};

}  // namespace fastattn::cpu
