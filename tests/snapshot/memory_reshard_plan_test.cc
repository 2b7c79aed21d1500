// The in-memory resharding plan (snapshot/memory_reshard_plan.h) executed with memcpy between
// simulated slots: every target byte equals the element the global tensor holds there. The NCCL
// transfer that carries out the same plan between GPUs is tested in gpu_reshard_test.cc.
#include <gtest/gtest.h>

#include <cstring>
#include <map>

#include "core/dtype.h"
#include "core/shard.h"
#include "proto/shard_convert.h"
#include "snapshot/memory_reshard_plan.h"
#include "snapshot/shard_reference.h"

namespace memento {
namespace {

using testing::ElementBytes;
using testing::LocalToGlobal;

ShardSpec Must(Result<ShardSpec> r) {
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return std::move(r).value();
}

struct Tensor {
  std::string name;
  DType dtype;
  ShardSpec spec;
};

// A rank's registration record; with `slot` the tensors are laid out in it and filled.
proto::RankRecord Record(int rank, const std::vector<Tensor>& tensors, std::vector<uint8_t>* slot,
                         const std::map<std::string, int>& ids) {
  proto::RankRecord rec;
  rec.set_rank(rank);
  uint64_t offset = 0;
  for (const Tensor& t : tensors) {
    proto::TensorRecord* tr = rec.add_tensors();
    tr->set_name(t.name);
    tr->set_dtype(static_cast<int32_t>(t.dtype));
    ToProto(t.spec, tr->mutable_spec());
    const size_t width = DTypeSize(t.dtype);
    tr->set_bytes(static_cast<uint64_t>(t.spec.local_numel) * width);
    tr->set_slot_offset(offset);
    offset += tr->bytes() + 100;  // gaps, as the agent's alignment leaves
  }
  rec.set_slot_bytes(offset);
  if (slot != nullptr) {
    slot->assign(offset, 0xEE);
    for (const auto& tr : rec.tensors()) {
      const Tensor& t = *std::find_if(tensors.begin(), tensors.end(), [&](const Tensor& x) { return x.name == tr.name(); });
      const size_t width = DTypeSize(t.dtype);
      const std::vector<int64_t> g = LocalToGlobal(t.spec);
      for (size_t i = 0; i < g.size(); ++i) {
        if (g[i] >= 0) ElementBytes(ids.at(t.name), g[i], width, slot->data() + tr.slot_offset() + i * width);
      }
    }
  }
  return rec;
}

// Executes the plan and checks every target byte.
void ExecuteAndCheck(const std::vector<ReshardPair>& pairs, const std::vector<std::vector<Tensor>>& targets,
                     const std::map<int, std::vector<uint8_t>>& slots, const std::map<std::string, int>& ids) {
  std::vector<std::vector<std::vector<uint8_t>>> bufs(targets.size());
  for (size_t r = 0; r < targets.size(); ++r) {
    for (const Tensor& t : targets[r]) bufs[r].emplace_back(static_cast<size_t>(t.spec.local_numel) * DTypeSize(t.dtype), 0);
  }
  for (const ReshardPair& p : pairs) {
    uint64_t total = 0;
    for (const ReshardRun& run : p.runs) {
      std::vector<uint8_t>& dst = bufs[static_cast<size_t>(p.target)][static_cast<size_t>(run.tensor)];
      const std::vector<uint8_t>& src = slots.at(run.old_rank);
      ASSERT_LE(run.dst_offset + run.bytes, dst.size());
      ASSERT_LE(run.src_offset + run.bytes, src.size());
      std::memcpy(dst.data() + run.dst_offset, src.data() + run.src_offset, run.bytes);
      total += run.bytes;
    }
    EXPECT_EQ(total, p.bytes);
  }
  for (size_t r = 0; r < targets.size(); ++r) {
    for (size_t i = 0; i < targets[r].size(); ++i) {
      const Tensor& t = targets[r][i];
      const size_t width = DTypeSize(t.dtype);
      const std::vector<int64_t> g = LocalToGlobal(t.spec);
      std::vector<uint8_t> expect(bufs[r][i].size(), 0);
      for (size_t e = 0; e < g.size(); ++e) {
        if (g[e] >= 0) ElementBytes(ids.at(t.name), g[e], width, expect.data() + e * width);
      }
      EXPECT_EQ(bufs[r][i], expect) << "rank " << r << " tensor " << t.name;
    }
  }
}

TEST(MemoryReshardPlanTest, ServersOfSpreadsOldRanksOverTheNodesNewRanks) {
  EXPECT_EQ(ServersOf({3, 5, 7}, {1, 0}), (std::vector<int32_t>{0, 1, 0}));
  EXPECT_EQ(ServersOf({2}, {4, 6}), (std::vector<int32_t>{4}));
  EXPECT_TRUE(ServersOf({2}, {}).empty());
}

// Two old ranks on two nodes (TP rows, a ZeRO-1 flat partition, replicated scalars) to three new
// ranks (two on node 0, one on node 1): TP columns, whole tensors, replicated scalars.
TEST(MemoryReshardPlanTest, RowsAndZeroPartitionsToColumnsAndWholeTensors) {
  const std::map<std::string, int> ids = {{"w", 0}, {"m", 1}, {"s", 2}};
  auto zero = ZeroFlatPartition({{5, 7}}, 2, 0);
  auto zero1 = ZeroFlatPartition({{5, 7}}, 2, 1);
  ASSERT_TRUE(zero.ok() && zero1.ok());
  std::vector<std::vector<Tensor>> old = {
      {{"w", DType::kI64, Must(SplitEvenly({6, 8}, 0, 2, 0))}, {"m", DType::kBF16, (*zero)[0].spec},
       {"s", DType::kF32, WholeTensor({}, 0)}},
      {{"w", DType::kI64, Must(SplitEvenly({6, 8}, 0, 2, 1))}, {"m", DType::kBF16, (*zero1)[0].spec},
       {"s", DType::kF32, WholeTensor({}, 1)}},
  };
  std::vector<std::vector<Tensor>> now;
  for (int r = 0; r < 3; ++r) {
    now.push_back({{"s", DType::kF32, WholeTensor({}, r)},
                   {"w", DType::kI64, Must(SplitAlongDim({6, 8}, 1, {3, 3, 2}, r))},
                   {"m", DType::kBF16, WholeTensor({5, 7}, r)}});
  }
  std::map<int, std::vector<uint8_t>> slots;
  std::vector<ReshardSource> sources;
  const std::vector<int32_t> node0 = ServersOf({0}, {0, 1}), node1 = ServersOf({1}, {2});
  for (int r = 0; r < 2; ++r) {
    ReshardSource s;
    s.record = Record(r, old[r], &slots[r], ids);
    s.server = r == 0 ? node0[0] : node1[0];
    sources.push_back(s);
  }
  std::vector<proto::RankRecord> targets;
  for (int r = 0; r < 3; ++r) targets.push_back(Record(r, now[r], nullptr, ids));
  auto pairs = PlanMemoryReshard(targets, sources);
  ASSERT_TRUE(pairs.ok()) << pairs.status().ToString();
  // Old rank 0 is served by new rank 0, old rank 1 by new rank 2: pairs (0,0) (0,1) (0,2) (2,0) (2,1) (2,2).
  ASSERT_EQ(pairs->size(), 6u);
  EXPECT_EQ((*pairs)[0].server, 0);
  EXPECT_EQ((*pairs)[0].target, 0);
  EXPECT_EQ((*pairs)[5].server, 2);
  EXPECT_EQ((*pairs)[5].target, 2);
  // Whole rows of w's columns cannot merge, m's flat halves arrive in one run each.
  uint64_t total = 0;
  for (const ReshardPair& p : *pairs) total += p.bytes;
  EXPECT_EQ(total, 3u * 4 + 6 * 8 * 8 + 3u * 35 * 2);
  ExecuteAndCheck(*pairs, now, slots, ids);
}

TEST(MemoryReshardPlanTest, ErrorsNameTheRankAndTensor) {
  const std::map<std::string, int> ids = {{"w", 0}, {"extra", 1}};
  std::map<int, std::vector<uint8_t>> slots;
  ReshardSource half;
  half.server = 0;
  half.record = Record(0, {{"w", DType::kF32, Must(SplitEvenly({6, 8}, 0, 2, 0))}}, &slots[0], ids);

  auto missing = PlanMemoryReshard({Record(0, {{"extra", DType::kF32, WholeTensor({2})}}, nullptr, ids)}, {half});
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_EQ(missing.status().message(), "rank 0 tensor 'extra' is not in the earlier layout");

  auto dtype = PlanMemoryReshard({Record(0, {{"w", DType::kBF16, WholeTensor({6, 8})}}, nullptr, ids)}, {half});
  ASSERT_FALSE(dtype.ok());
  EXPECT_EQ(dtype.status().message(), "rank 0 tensor 'w' is BF16 but the earlier layout saved F32");

  auto shape = PlanMemoryReshard({Record(0, {{"w", DType::kF32, WholeTensor({8, 6})}}, nullptr, ids)}, {half});
  ASSERT_FALSE(shape.ok());
  EXPECT_EQ(shape.status().message(), "rank 0 tensor 'w' has global shape [8,6] but the earlier layout saved [6,8]");

  auto partial = PlanMemoryReshard({Record(0, {{"w", DType::kF32, WholeTensor({6, 8})}}, nullptr, ids)}, {half});
  ASSERT_FALSE(partial.ok());
  EXPECT_EQ(partial.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(partial.status().message(), "rank 0 tensor 'w': the earlier layout holds 24 of its 48 elements");

  auto twice = PlanMemoryReshard({Record(0, {{"w", DType::kF32, WholeTensor({6, 8})}}, nullptr, ids)}, {half, half});
  ASSERT_FALSE(twice.ok());
  EXPECT_EQ(twice.status().message(), "old rank 0 is served twice");
}

}  // namespace
}  // namespace memento
