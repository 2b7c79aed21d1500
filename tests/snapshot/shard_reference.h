// Reference data for resharding tests: which global element each local element of a ShardSpec
// holds, and distinct bytes per (tensor, global element), so that a resharded buffer can be
// checked byte for byte without the resharding engine.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "core/shard.h"

namespace memento::testing {

// Global row-major index of each local element (-1 = padding).
inline std::vector<int64_t> LocalToGlobal(const ShardSpec& spec) {
  std::vector<int64_t> global(static_cast<size_t>(spec.local_numel), -1);
  const size_t dims = spec.global_shape.size();
  for (const Fragment& f : spec.fragments) {
    if (f.kind == Fragment::Kind::kFlat) {
      for (int64_t i = 0; i < f.flat_length; ++i) global[static_cast<size_t>(f.local_offset + i)] = f.flat_begin + i;
      continue;
    }
    std::vector<int64_t> idx(dims, 0);
    for (int64_t i = 0; i < f.box.numel(); ++i) {
      int64_t g = 0;
      for (size_t d = 0; d < dims; ++d) g = g * spec.global_shape[d] + f.box.offsets[d] + idx[d];
      global[static_cast<size_t>(f.local_offset + i)] = g;
      for (size_t d = dims; d-- > 0;) {
        if (++idx[d] < f.box.lengths[d]) break;
        idx[d] = 0;
      }
    }
  }
  return global;
}

// The bytes of element `g` of tensor `tensor` (distinct per tensor and element).
inline void ElementBytes(int tensor, int64_t g, size_t width, uint8_t* out) {
  const uint64_t v = (static_cast<uint64_t>(tensor + 1) << 40) ^ (static_cast<uint64_t>(g) * 0x9E3779B1u + 7);
  std::memcpy(out, &v, width);
}

// A rank's local buffer of `spec` for tensor `tensor`: every element's reference bytes, padding 0.
inline std::vector<uint8_t> LocalBytes(int tensor, const ShardSpec& spec, size_t width) {
  std::vector<uint8_t> out(static_cast<size_t>(spec.local_numel) * width, 0);
  const std::vector<int64_t> g = LocalToGlobal(spec);
  for (size_t i = 0; i < g.size(); ++i) {
    if (g[i] >= 0) ElementBytes(tensor, g[i], width, out.data() + i * width);
  }
  return out;
}

}  // namespace memento::testing
