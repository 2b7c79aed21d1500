// In-memory resharding, the plan: which bytes of the earlier layout's slots each rank of the new
// layout needs, and which rank sends them. Pure (no CUDA, no NCCL): every rank computes the same
// plan from the same inputs, and the CPU tests check it byte for byte
// (tests/snapshot/memory_reshard_plan_test.cc). The NCCL transfer is snapshot/memory_reshard.h.
#pragma once

#include <cstdint>
#include <vector>

#include "core/status.h"
#include "proto/memento.pb.h"

namespace memento {

// One old rank of the earlier layout, as a rank of the new layout serves it: `server` maps its slot
// (it runs on the node that holds it) and sends its bytes to the ranks that need them.
struct ReshardSource {
  int32_t server = -1;
  proto::RankRecord record;  // the old rank's layout: rank, tensors with slot offsets
};

// A contiguous copy: `bytes` from byte `src_offset` of old rank `old_rank`'s slot to byte
// `dst_offset` of tensor `tensor` (index in the target's registration) of the target rank.
struct ReshardRun {
  int32_t old_rank = 0;
  uint64_t src_offset = 0;
  int32_t tensor = 0;
  uint64_t dst_offset = 0;
  uint64_t bytes = 0;
  bool operator==(const ReshardRun&) const = default;
};

// Everything `server` sends to `target`, in stream order: the runs' bytes concatenated.
struct ReshardPair {
  int32_t server = 0;
  int32_t target = 0;
  std::vector<ReshardRun> runs;
  uint64_t bytes = 0;
};

// Plans the new layout `targets` (index = new rank; the tensors of each registration) from the
// earlier layout's `sources` (every old rank exactly once). Pairs are ordered by (server, target),
// runs by target tensor and offset, adjacent runs merged. Errors name the rank and tensor: a tensor
// the earlier layout does not have, another dtype or global shape, elements no old rank holds.
Result<std::vector<ReshardPair>> PlanMemoryReshard(const std::vector<proto::RankRecord>& targets,
                                                   const std::vector<ReshardSource>& sources);

// Which old ranks of a node each new rank of that node serves: old_ranks[i] (ascending) is served
// by new_ranks[i % new_ranks.size()] (ascending). Empty when the node runs no new rank.
std::vector<int32_t> ServersOf(const std::vector<int32_t>& old_ranks, const std::vector<int32_t>& new_ranks);

}  // namespace memento
