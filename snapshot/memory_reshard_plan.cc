#include "snapshot/memory_reshard_plan.h"

#include <algorithm>
#include <map>
#include <string>

#include "core/dtype.h"
#include "core/reshard.h"
#include "core/shard.h"
#include "proto/shard_convert.h"

namespace memento {

std::vector<int32_t> ServersOf(const std::vector<int32_t>& old_ranks, const std::vector<int32_t>& new_ranks) {
  std::vector<int32_t> out;
  if (new_ranks.empty()) return out;
  std::vector<int32_t> news = new_ranks;
  std::sort(news.begin(), news.end());
  for (size_t i = 0; i < old_ranks.size(); ++i) out.push_back(news[i % news.size()]);
  return out;
}

Result<std::vector<ReshardPair>> PlanMemoryReshard(const std::vector<proto::RankRecord>& targets,
                                                   const std::vector<ReshardSource>& sources) {
  // Old tensors by name: (source index, tensor index, parsed spec).
  struct Held {
    size_t source;
    const proto::TensorRecord* tensor;
    ShardSpec spec;
  };
  std::map<std::string, std::vector<Held>> by_name;
  std::vector<const ReshardSource*> ordered;
  for (const ReshardSource& s : sources) ordered.push_back(&s);
  std::sort(ordered.begin(), ordered.end(),
            [](const ReshardSource* a, const ReshardSource* b) { return a->record.rank() < b->record.rank(); });
  for (size_t i = 0; i < ordered.size(); ++i) {
    if (i > 0 && ordered[i]->record.rank() == ordered[i - 1]->record.rank()) {
      return InvalidArgument("old rank " + std::to_string(ordered[i]->record.rank()) + " is served twice");
    }
    for (const proto::TensorRecord& t : ordered[i]->record.tensors()) {
      auto spec = FromProto(t.spec());
      if (!spec.ok()) {
        return DataLoss("old rank " + std::to_string(ordered[i]->record.rank()) + " tensor '" + t.name() +
                        "': " + spec.status().message());
      }
      by_name[t.name()].push_back({i, &t, std::move(spec).value()});
    }
  }
  std::map<std::pair<int32_t, int32_t>, ReshardPair> pairs;
  for (size_t target = 0; target < targets.size(); ++target) {
    const proto::RankRecord& rec = targets[target];
    const std::string who = "rank " + std::to_string(target);
    for (int ti = 0; ti < rec.tensors_size(); ++ti) {
      const proto::TensorRecord& t = rec.tensors(ti);
      auto it = by_name.find(t.name());
      if (it == by_name.end()) {
        return NotFound(who + " tensor '" + t.name() + "' is not in the earlier layout");
      }
      MEMENTO_ASSIGN_OR_RETURN(ShardSpec spec, FromProto(t.spec()));
      std::vector<const ShardSpec*> specs;
      for (const Held& h : it->second) {
        if (h.tensor->dtype() != t.dtype()) {
          auto a = DTypeFromInt(h.tensor->dtype()), b = DTypeFromInt(t.dtype());
          return FailedPrecondition(who + " tensor '" + t.name() + "' is " +
                                    (b.ok() ? std::string(DTypeName(*b)) : "?") + " but the earlier layout saved " +
                                    (a.ok() ? std::string(DTypeName(*a)) : "?"));
        }
        if (h.spec.global_shape != spec.global_shape) {
          return FailedPrecondition(who + " tensor '" + t.name() + "' has global shape " +
                                    ShapeString(spec.global_shape) + " but the earlier layout saved " +
                                    ShapeString(h.spec.global_shape));
        }
        specs.push_back(&h.spec);
      }
      MEMENTO_ASSIGN_OR_RETURN(DType dtype, DTypeFromInt(t.dtype()));
      const uint64_t width = DTypeSize(dtype);
      auto plan = PlanReshard(spec, specs);
      if (!plan.ok()) return plan.status().WithContext(who + " tensor '" + t.name() + "'");
      if (!plan->complete()) {
        return FailedPrecondition(who + " tensor '" + t.name() + "': the earlier layout holds " +
                                  std::to_string(plan->covered_elements) + " of its " +
                                  std::to_string(plan->target_elements) + " elements");
      }
      for (const CopyRun& c : plan->runs) {
        const Held& h = it->second[static_cast<size_t>(c.source)];
        const ReshardSource& src = *ordered[h.source];
        ReshardPair& p = pairs[{src.server, static_cast<int32_t>(target)}];
        p.server = src.server;
        p.target = static_cast<int32_t>(target);
        ReshardRun run{src.record.rank(), h.tensor->slot_offset() + static_cast<uint64_t>(c.source_offset) * width, ti,
                       static_cast<uint64_t>(c.target_offset) * width, static_cast<uint64_t>(c.elements) * width};
        if (!p.runs.empty()) {
          ReshardRun& last = p.runs.back();
          if (last.old_rank == run.old_rank && last.tensor == run.tensor &&
              last.src_offset + last.bytes == run.src_offset && last.dst_offset + last.bytes == run.dst_offset) {
            last.bytes += run.bytes;
            p.bytes += run.bytes;
            continue;
          }
        }
        p.runs.push_back(run);
        p.bytes += run.bytes;
      }
    }
  }
  std::vector<ReshardPair> out;
  for (auto& [key, p] : pairs) out.push_back(std::move(p));
  return out;
}

}  // namespace memento
