// Resharding by box intersection: fills the fragments of a target ShardSpec from every source
// fragment that overlaps them. Serves native snapshots and foreign checkpoints alike.
// Thread-compatible; the plan is a value that several threads may execute in parts.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/shard.h"
#include "core/status.h"

namespace memento {

// One contiguous copy: `elements` elements from source `source` at element offset `source_offset`
// of its local buffer to element offset `target_offset` of the target's local buffer.
struct CopyRun {
  int32_t source = 0;
  int64_t source_offset = 0;
  int64_t target_offset = 0;
  int64_t elements = 0;
  bool operator==(const CopyRun&) const = default;
};

struct ReshardPlan {
  std::vector<CopyRun> runs;      // sorted by target_offset; adjacent runs merged
  int64_t covered_elements = 0;   // target elements that some source fills
  int64_t target_elements = 0;    // elements in all target fragments
  bool complete() const { return covered_elements == target_elements; }
};

// Plans how to fill `target` from `sources` (all with the same global shape). When several
// sources hold the same element (replicas), the one with the lowest index wins.
Result<ReshardPlan> PlanReshard(const ShardSpec& target, const std::vector<const ShardSpec*>& sources);

// Executes a plan: copies bytes (`element_size` bytes per element).
void ExecuteReshard(const ReshardPlan& plan, size_t element_size,
                    const std::vector<const void*>& source_buffers, void* target_buffer);

}  // namespace memento
