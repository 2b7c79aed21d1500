// Resharding by box intersection. Flat ranges become at most 2 * rank - 1 boxes each, so every
// fragment is a list of boxes held row-major in the local buffer; each target/source box pair
// yields its intersection, emitted as runs that are contiguous in both buffers.
#include "core/reshard.h"

#include <algorithm>
#include <cstring>
#include <iterator>
#include <map>
#include <string>
#include <utility>

namespace memento {
namespace {

// A box held row-major in a local buffer starting at element `local`.
struct PlacedBox {
  Box box;
  int64_t local = 0;
};

void AppendPlaced(const Fragment& f, const std::vector<int64_t>& shape, std::vector<PlacedBox>* out) {
  if (f.numel() == 0) return;
  if (f.kind == Fragment::Kind::kBox) {
    out->push_back({f.box, f.local_offset});
    return;
  }
  int64_t local = f.local_offset;
  for (Box& b : FlatRangeToBoxes(shape, f.flat_begin, f.flat_length)) {
    const int64_t n = b.numel();
    out->push_back({std::move(b), local});
    local += n;
  }
}

bool Intersect(const Box& a, const Box& b, Box* out) {
  const size_t rank = a.offsets.size();
  out->offsets.resize(rank);
  out->lengths.resize(rank);
  for (size_t d = 0; d < rank; ++d) {
    const int64_t lo = std::max(a.offsets[d], b.offsets[d]);
    const int64_t hi = std::min(a.offsets[d] + a.lengths[d], b.offsets[d] + b.lengths[d]);
    if (hi <= lo) return false;
    out->offsets[d] = lo;
    out->lengths[d] = hi - lo;
  }
  return true;
}

// Calls emit(target_offset, source_offset, elements) for the runs that copy `meet` (inside both
// boxes) from `s` to `t`. Trailing dims that `meet` spans whole in both boxes fold into one run.
template <typename Emit>
void EmitIntersection(const PlacedBox& t, const PlacedBox& s, const Box& meet, Emit&& emit) {
  const size_t rank = meet.lengths.size();
  if (rank == 0) {
    emit(t.local, s.local, int64_t{1});
    return;
  }
  std::vector<int64_t> t_stride(rank, 1), s_stride(rank, 1);
  for (size_t d = rank - 1; d > 0; --d) {
    t_stride[d - 1] = t_stride[d] * t.box.lengths[d];
    s_stride[d - 1] = s_stride[d] * s.box.lengths[d];
  }
  // Dims after `k` are whole in both boxes, so a run covers dims k.. of `meet`.
  size_t k = rank - 1;
  while (k > 0 && meet.lengths[k] == t.box.lengths[k] && meet.lengths[k] == s.box.lengths[k]) --k;
  int64_t run = 1;
  for (size_t d = k; d < rank; ++d) run *= meet.lengths[d];
  int64_t t_pos = t.local, s_pos = s.local;
  for (size_t d = 0; d < rank; ++d) {
    t_pos += (meet.offsets[d] - t.box.offsets[d]) * t_stride[d];
    s_pos += (meet.offsets[d] - s.box.offsets[d]) * s_stride[d];
  }
  // Odometer over dims 0..k-1 of `meet`.
  std::vector<int64_t> index(k, 0);
  while (true) {
    emit(t_pos, s_pos, run);
    size_t d = k;
    while (d > 0) {
      --d;
      if (++index[d] < meet.lengths[d]) {
        t_pos += t_stride[d];
        s_pos += s_stride[d];
        break;
      }
      t_pos -= (meet.lengths[d] - 1) * t_stride[d];
      s_pos -= (meet.lengths[d] - 1) * s_stride[d];
      index[d] = 0;
      if (d == 0) return;
    }
    if (k == 0) return;
  }
}

// Target elements (local offsets) already filled by a lower-indexed source, as disjoint, merged
// [begin, end) intervals.
class Coverage {
 public:
  // Calls fill(begin, end) for each part of [begin, end) not yet covered, then covers all of it.
  template <typename Fill>
  void Claim(int64_t begin, int64_t end, Fill&& fill) {
    auto it = covered_.upper_bound(begin);
    if (it != covered_.begin()) {
      auto prev = std::prev(it);
      if (prev->second >= begin) it = prev;
    }
    int64_t merged_begin = begin, merged_end = end, cursor = begin;
    while (it != covered_.end() && it->first <= end) {
      if (it->first > cursor) fill(cursor, it->first);
      cursor = std::max(cursor, it->second);
      merged_begin = std::min(merged_begin, it->first);
      merged_end = std::max(merged_end, it->second);
      it = covered_.erase(it);
    }
    if (cursor < end) fill(cursor, end);
    covered_.emplace(merged_begin, merged_end);
  }

 private:
  std::map<int64_t, int64_t> covered_;
};

}  // namespace

Result<ReshardPlan> PlanReshard(const ShardSpec& target, const std::vector<const ShardSpec*>& sources) {
  MEMENTO_RETURN_IF_ERROR(target.Validate().WithContext("target"));
  for (size_t k = 0; k < sources.size(); ++k) {
    const std::string name = "source " + std::to_string(k);
    if (sources[k] == nullptr) return InvalidArgument(name + " is null");
    const ShardSpec& s = *sources[k];
    MEMENTO_RETURN_IF_ERROR(s.Validate().WithContext(name));
    if (s.global_shape != target.global_shape) {
      return InvalidArgument(name + " global_shape " + ShapeString(s.global_shape) +
                             " differs from target global_shape " + ShapeString(target.global_shape));
    }
    if (!s.original_shape.empty() && !target.original_shape.empty() &&
        s.original_shape != target.original_shape) {
      return InvalidArgument(name + " original_shape " + ShapeString(s.original_shape) +
                             " differs from target original_shape " + ShapeString(target.original_shape));
    }
  }

  const std::vector<int64_t>& shape = target.global_shape;
  ReshardPlan plan;
  std::vector<PlacedBox> target_boxes;
  for (const Fragment& f : target.fragments) {
    plan.target_elements += f.numel();
    AppendPlaced(f, shape, &target_boxes);
  }

  std::vector<CopyRun> runs;
  Coverage coverage;
  const bool single_source = sources.size() == 1;
  std::vector<PlacedBox> source_boxes;
  Box meet;
  for (size_t k = 0; k < sources.size(); ++k) {
    source_boxes.clear();
    for (const Fragment& f : sources[k]->fragments) AppendPlaced(f, shape, &source_boxes);
    const int32_t source = static_cast<int32_t>(k);
    auto emit = [&](int64_t t_pos, int64_t s_pos, int64_t n) {
      if (single_source) {
        runs.push_back({source, s_pos, t_pos, n});
        return;
      }
      coverage.Claim(t_pos, t_pos + n, [&](int64_t begin, int64_t end) {
        runs.push_back({source, s_pos + (begin - t_pos), begin, end - begin});
      });
    };
    for (const PlacedBox& t : target_boxes) {
      for (const PlacedBox& s : source_boxes) {
        if (Intersect(t.box, s.box, &meet)) EmitIntersection(t, s, meet, emit);
      }
    }
  }

  std::sort(runs.begin(), runs.end(),
            [](const CopyRun& a, const CopyRun& b) { return a.target_offset < b.target_offset; });
  for (const CopyRun& r : runs) {
    plan.covered_elements += r.elements;
    if (!plan.runs.empty()) {
      CopyRun& last = plan.runs.back();
      if (last.source == r.source && last.target_offset + last.elements == r.target_offset &&
          last.source_offset + last.elements == r.source_offset) {
        last.elements += r.elements;
        continue;
      }
    }
    plan.runs.push_back(r);
  }
  return plan;
}

void ExecuteReshard(const ReshardPlan& plan, size_t element_size, const std::vector<const void*>& source_buffers,
                    void* target_buffer) {
  auto* target = static_cast<unsigned char*>(target_buffer);
  for (const CopyRun& r : plan.runs) {
    const auto* source = static_cast<const unsigned char*>(source_buffers[static_cast<size_t>(r.source)]);
    std::memcpy(target + static_cast<size_t>(r.target_offset) * element_size,
                source + static_cast<size_t>(r.source_offset) * element_size,
                static_cast<size_t>(r.elements) * element_size);
  }
}

}  // namespace memento
