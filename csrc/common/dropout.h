// The attention dropout generator, shared by the CPU kernels, the CUDA kernels and the launcher
// of native_attention_dropout_mask, so that every one of them draws the same keep mask for a
// seed, bit for bit. Plain integer arithmetic only: compiled by the host compiler for the CPU
// kernels and by nvcc for host and device (FASTATTN_HOST_DEVICE).
#pragma once

#include <cstdint>

#include "host_device.h"

namespace fastattn {

// Dropout keep decision for element (b * Hq + h, i, j), flat index ((b*Hq + h)*L + i)*S + j:
// SplitMix64 at that position of the stream seeded with `seed` (a counter-based generator, so
// forward, backward and native_attention_dropout_mask draw the same bits with no state), kept
// when its top 32 bits reach `threshold` = round(dropout_p * 2^32): keep probability 1 - p.
FASTATTN_HOST_DEVICE inline bool dropout_keep(uint64_t seed, uint64_t index, uint64_t threshold) {
  uint64_t z = seed + (index + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return (z >> 32) >= threshold;
}

FASTATTN_HOST_DEVICE inline uint64_t dropout_threshold(double p) {
  const double t = p * 4294967296.0 + 0.5;
  return t >= 4294967295.0 ? 4294967295ull : static_cast<uint64_t>(t);
}

}  // namespace fastattn
