// Tests of the resharding engine: exact plans for small layouts, errors, and the planner plus
// executor against an element-by-element reference on thousands of random layouts.
#include "core/reshard.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "core/shard.h"
#include "snapshot/shard_reference.h"

namespace memento {
namespace {

using Shape = std::vector<int64_t>;
using Layout = std::vector<ShardSpec>;  // one spec per rank

constexpr int64_t kUnwritten = std::numeric_limits<int64_t>::min();

ShardSpec Must(Result<ShardSpec> r) {
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return r.ok() ? std::move(r).value() : ShardSpec{};
}

std::vector<const ShardSpec*> Pointers(const Layout& layout) {
  std::vector<const ShardSpec*> p;
  for (const ShardSpec& s : layout) p.push_back(&s);
  return p;
}

Fragment BoxFragment(Shape offsets, Shape lengths, int64_t local_offset) {
  Fragment f;
  f.box.offsets = std::move(offsets);
  f.box.lengths = std::move(lengths);
  f.local_offset = local_offset;
  return f;
}

using testing::LocalToGlobal;

// A source buffer: each element holds global * 1000 + source tag; padding holds -(tag + 2).
std::vector<int64_t> FillSource(const ShardSpec& spec, int tag) {
  std::vector<int64_t> buf = LocalToGlobal(spec);
  for (int64_t& v : buf) v = v < 0 ? -(tag + 2) : v * 1000 + tag;
  return buf;
}

struct Reference {
  std::vector<int64_t> target;  // expected target buffer (kUnwritten where nothing fills it)
  int64_t covered = 0;
  int64_t target_elements = 0;
};

// Element by element: each target element takes the value of the lowest-indexed source holding it.
Reference BruteForce(const ShardSpec& target, const Layout& sources,
                     const std::vector<std::vector<int64_t>>& buffers) {
  const int64_t numel = NumElements(target.global_shape);
  std::vector<int64_t> value(static_cast<size_t>(numel), kUnwritten);
  for (size_t k = 0; k < sources.size(); ++k) {
    const std::vector<int64_t> global = LocalToGlobal(sources[k]);
    for (size_t i = 0; i < global.size(); ++i) {
      if (global[i] >= 0 && value[static_cast<size_t>(global[i])] == kUnwritten) {
        value[static_cast<size_t>(global[i])] = buffers[k][i];
      }
    }
  }
  Reference ref;
  const std::vector<int64_t> global = LocalToGlobal(target);
  ref.target.assign(global.size(), kUnwritten);
  for (size_t i = 0; i < global.size(); ++i) {
    if (global[i] < 0) continue;
    ++ref.target_elements;
    ref.target[i] = value[static_cast<size_t>(global[i])];
    if (ref.target[i] != kUnwritten) ++ref.covered;
  }
  return ref;
}

// Runs sorted, disjoint, inside both buffers, non-empty, and not mergeable with their neighbour.
void ExpectWellFormed(const ReshardPlan& plan, const ShardSpec& target, const Layout& sources) {
  int64_t covered = 0;
  for (size_t i = 0; i < plan.runs.size(); ++i) {
    const CopyRun& r = plan.runs[i];
    ASSERT_GT(r.elements, 0);
    ASSERT_GE(r.source, 0);
    ASSERT_LT(static_cast<size_t>(r.source), sources.size());
    ASSERT_GE(r.source_offset, 0);
    ASSERT_LE(r.source_offset + r.elements, sources[static_cast<size_t>(r.source)].local_numel);
    ASSERT_GE(r.target_offset, 0);
    ASSERT_LE(r.target_offset + r.elements, target.local_numel);
    covered += r.elements;
    if (i == 0) continue;
    const CopyRun& p = plan.runs[i - 1];
    ASSERT_LE(p.target_offset + p.elements, r.target_offset) << "runs " << i - 1 << " and " << i;
    ASSERT_FALSE(p.source == r.source && p.target_offset + p.elements == r.target_offset &&
                 p.source_offset + p.elements == r.source_offset)
        << "runs " << i - 1 << " and " << i << " should have been merged";
  }
  ASSERT_EQ(covered, plan.covered_elements);
}

// Plans, executes and compares with the reference; returns the plan.
ReshardPlan CheckAgainstReference(const ShardSpec& target, const Layout& sources, const std::string& what) {
  SCOPED_TRACE(what + " target " + target.DebugString());
  std::vector<std::vector<int64_t>> buffers;
  std::vector<const void*> pointers;
  for (size_t k = 0; k < sources.size(); ++k) buffers.push_back(FillSource(sources[k], static_cast<int>(k)));
  for (const auto& b : buffers) pointers.push_back(b.data());
  Result<ReshardPlan> plan = PlanReshard(target, Pointers(sources));
  EXPECT_TRUE(plan.ok()) << plan.status().ToString();
  if (!plan.ok()) return {};
  ExpectWellFormed(*plan, target, sources);
  const Reference ref = BruteForce(target, sources, buffers);
  std::vector<int64_t> out(static_cast<size_t>(target.local_numel), kUnwritten);
  ExecuteReshard(*plan, sizeof(int64_t), pointers, out.data());
  EXPECT_EQ(plan->target_elements, ref.target_elements);
  EXPECT_EQ(plan->covered_elements, ref.covered);
  EXPECT_EQ(plan->complete(), ref.covered == ref.target_elements);
  for (size_t i = 0; i < out.size(); ++i) {
    if (out[i] != ref.target[i]) {
      ADD_FAILURE() << "target element " << i << " is " << out[i] << ", want " << ref.target[i];
      break;
    }
  }
  return *plan;
}

// ---- exact plans -----------------------------------------------------------------------

TEST(ReshardTest, RowSplitToWhole) {
  const Layout sources = {Must(SplitEvenly({4, 6}, 0, 2, 0)), Must(SplitEvenly({4, 6}, 0, 2, 1))};
  Result<ReshardPlan> plan = PlanReshard(WholeTensor({4, 6}), Pointers(sources));
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->runs, (std::vector<CopyRun>{{0, 0, 0, 12}, {1, 0, 12, 12}}));
  EXPECT_EQ(plan->covered_elements, 24);
  EXPECT_EQ(plan->target_elements, 24);
  EXPECT_TRUE(plan->complete());
}

TEST(ReshardTest, ColumnSplitToWhole) {
  const Layout sources = {Must(SplitEvenly({2, 4}, 1, 2, 0)), Must(SplitEvenly({2, 4}, 1, 2, 1))};
  Result<ReshardPlan> plan = PlanReshard(WholeTensor({2, 4}), Pointers(sources));
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->runs, (std::vector<CopyRun>{{0, 0, 0, 2}, {1, 0, 2, 2}, {0, 2, 4, 2}, {1, 2, 6, 2}}));
  EXPECT_TRUE(plan->complete());
}

TEST(ReshardTest, WholeToColumnSplitOfThreeDims) {
  // Target: columns 2..3 of a [2,3,4] tensor -> one run of 2 per (i, j) row.
  const Layout sources = {WholeTensor({2, 3, 4})};
  Result<ReshardPlan> plan = PlanReshard(Must(SplitEvenly({2, 3, 4}, 2, 2, 1)), Pointers(sources));
  ASSERT_TRUE(plan.ok());
  std::vector<CopyRun> want;
  for (int64_t row = 0; row < 6; ++row) want.push_back({0, row * 4 + 2, row * 2, 2});
  EXPECT_EQ(plan->runs, want);
  // Target: dim 1 rows 1..2 -> whole trailing dim folds into runs of 8.
  plan = PlanReshard(Must(SplitAlongDim({2, 3, 4}, 1, {1, 2}, 1)), Pointers(sources));
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->runs, (std::vector<CopyRun>{{0, 4, 0, 8}, {0, 16, 8, 8}}));
}

TEST(ReshardTest, ZeroFlatToWhole) {
  // [4,6] alone in a ZeRO group over 2 ranks: flat [0,12) and [12,24).
  Layout sources;
  for (int r = 0; r < 2; ++r) {
    Result<std::vector<FlatPartitionEntry>> e = ZeroFlatPartition({{4, 6}}, 2, r);
    ASSERT_TRUE(e.ok());
    sources.push_back((*e)[0].spec);
  }
  Result<ReshardPlan> plan = PlanReshard(WholeTensor({4, 6}), Pointers(sources));
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->runs, (std::vector<CopyRun>{{0, 0, 0, 12}, {1, 0, 12, 12}}));
  // And back: the whole tensor into rank 1's flat range [12,24) of the same group, padded by 2.
  Result<std::vector<FlatPartitionEntry>> e = ZeroFlatPartition({{4, 6}}, 2, 1, 7);  // 24 -> 28
  ASSERT_TRUE(e.ok());
  EXPECT_EQ((*e)[0].spec.fragments[0].flat_begin, 14);
  const Layout whole = {WholeTensor({4, 6})};
  plan = PlanReshard((*e)[0].spec, Pointers(whole));
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->runs, (std::vector<CopyRun>{{0, 14, 0, 10}}));
}

TEST(ReshardTest, ReplicasLowestSourceWins) {
  // Source 0 holds rows 0..1, source 1 everything: source 1 fills only rows 2..3.
  Layout sources = {Must(SplitEvenly({4, 6}, 0, 2, 0)), WholeTensor({4, 6}, 1)};
  Result<ReshardPlan> plan = PlanReshard(WholeTensor({4, 6}), Pointers(sources));
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->runs, (std::vector<CopyRun>{{0, 0, 0, 12}, {1, 12, 12, 12}}));
  // The other order: the whole tensor wins everywhere.
  std::swap(sources[0], sources[1]);
  plan = PlanReshard(WholeTensor({4, 6}), Pointers(sources));
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->runs, (std::vector<CopyRun>{{0, 0, 0, 24}}));
  // A hole in the middle of source 0's coverage is filled by source 1 only there.
  ShardSpec rows_0_and_3;
  rows_0_and_3.global_shape = {4, 6};
  rows_0_and_3.fragments = {BoxFragment({0, 0}, {1, 6}, 0), BoxFragment({3, 0}, {1, 6}, 6)};
  rows_0_and_3.local_numel = 12;
  sources = {rows_0_and_3, WholeTensor({4, 6})};
  plan = PlanReshard(WholeTensor({4, 6}), Pointers(sources));
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->runs, (std::vector<CopyRun>{{0, 0, 0, 6}, {1, 6, 6, 12}, {0, 6, 18, 6}}));
}

TEST(ReshardTest, PartialCoverage) {
  const Layout sources = {Must(SplitEvenly({4, 6}, 0, 2, 0))};
  Result<ReshardPlan> plan = PlanReshard(WholeTensor({4, 6}), Pointers(sources));
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->runs, (std::vector<CopyRun>{{0, 0, 0, 12}}));
  EXPECT_EQ(plan->covered_elements, 12);
  EXPECT_EQ(plan->target_elements, 24);
  EXPECT_FALSE(plan->complete());

  plan = PlanReshard(WholeTensor({4, 6}), {});
  ASSERT_TRUE(plan.ok());
  EXPECT_TRUE(plan->runs.empty());
  EXPECT_EQ(plan->covered_elements, 0);
  EXPECT_EQ(plan->target_elements, 24);
  EXPECT_FALSE(plan->complete());

  // A target with no elements (rank 2 of 3 on two rows) is complete with nothing.
  const Layout small = {WholeTensor({2, 6})};
  plan = PlanReshard(Must(SplitEvenly({2, 6}, 0, 3, 2)), Pointers(small));
  ASSERT_TRUE(plan.ok());
  EXPECT_TRUE(plan->runs.empty());
  EXPECT_TRUE(plan->complete());
}

TEST(ReshardTest, Scalars) {
  ShardSpec flat;
  flat.global_shape = {};
  Fragment f;
  f.kind = Fragment::Kind::kFlat;
  f.flat_length = 1;
  f.local_offset = 2;
  flat.fragments = {f};
  flat.local_numel = 3;
  const Layout sources = {flat};
  Result<ReshardPlan> plan = PlanReshard(WholeTensor({}), Pointers(sources));
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->runs, (std::vector<CopyRun>{{0, 2, 0, 1}}));
  EXPECT_TRUE(plan->complete());
}

TEST(ReshardTest, Errors) {
  const Layout sources = {WholeTensor({4, 6}), WholeTensor({4, 7})};
  Result<ReshardPlan> plan = PlanReshard(WholeTensor({4, 6}), Pointers(sources));
  ASSERT_FALSE(plan.ok());
  EXPECT_EQ(plan.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(plan.status().message(), "source 1 global_shape [4,7] differs from target global_shape [4,6]");

  plan = PlanReshard(WholeTensor({4, 6}), {&sources[0], nullptr});
  ASSERT_FALSE(plan.ok());
  EXPECT_EQ(plan.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(plan.status().message(), "source 1 is null");

  ShardSpec bad = WholeTensor({4, 6});
  bad.local_numel = 20;
  plan = PlanReshard(WholeTensor({4, 6}), {&sources[0], &bad});
  ASSERT_FALSE(plan.ok());
  EXPECT_EQ(plan.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(plan.status().message(), "source 1: fragment 0: local run [0,24) exceeds local_numel 20");

  plan = PlanReshard(bad, {&sources[0]});
  ASSERT_FALSE(plan.ok());
  EXPECT_EQ(plan.status().message(), "target: fragment 0: local run [0,24) exceeds local_numel 20");

  const Layout vocab = {Must(VocabPaddedSplit(1000, 4, 64, 2, 0))};  // [1024,4]
  ShardSpec other = WholeTensor({1024, 4});
  other.original_shape = {1010, 4};
  plan = PlanReshard(other, Pointers(vocab));
  ASSERT_FALSE(plan.ok());
  EXPECT_EQ(plan.status().message(), "source 0 original_shape [1000,4] differs from target original_shape [1010,4]");
}

// Bytes, not elements: three-byte elements land where they should.
TEST(ReshardTest, OddElementSize) {
  const Shape shape = {5, 7};
  const Layout sources = {Must(SplitAlongDim(shape, 1, {2, 5}, 1)), Must(SplitAlongDim(shape, 1, {2, 5}, 0))};
  const ShardSpec target = Must(SplitEvenly(shape, 0, 2, 1));  // rows 3..4
  std::vector<std::vector<uint8_t>> buffers;
  std::vector<const void*> pointers;
  for (size_t k = 0; k < sources.size(); ++k) {
    const std::vector<int64_t> global = LocalToGlobal(sources[k]);
    std::vector<uint8_t> b;
    for (int64_t g : global) {
      b.push_back(static_cast<uint8_t>(g));
      b.push_back(static_cast<uint8_t>(g * 3));
      b.push_back(static_cast<uint8_t>(k));
    }
    buffers.push_back(std::move(b));
  }
  for (const auto& b : buffers) pointers.push_back(b.data());
  Result<ReshardPlan> plan = PlanReshard(target, Pointers(sources));
  ASSERT_TRUE(plan.ok());
  ASSERT_TRUE(plan->complete());
  std::vector<uint8_t> out(static_cast<size_t>(target.local_numel) * 3, 0xee);
  ExecuteReshard(*plan, 3, pointers, out.data());
  const std::vector<int64_t> global = LocalToGlobal(target);
  for (size_t i = 0; i < global.size(); ++i) {
    const int64_t col = global[i] % 7;
    EXPECT_EQ(out[3 * i], static_cast<uint8_t>(global[i])) << i;
    EXPECT_EQ(out[3 * i + 1], static_cast<uint8_t>(global[i] * 3)) << i;
    EXPECT_EQ(out[3 * i + 2], col < 2 ? 1 : 0) << i;
  }
}

// ---- random layouts against the reference ----------------------------------------------

class LayoutGen {
 public:
  explicit LayoutGen(uint64_t seed) : rng_(seed) {}

  int64_t Uniform(int64_t lo, int64_t hi) {  // inclusive
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng_);
  }
  bool Chance(double p) { return std::bernoulli_distribution(p)(rng_); }
  std::mt19937_64& rng() { return rng_; }

  Shape RandomShape() {
    const int64_t rank = Chance(0.03) ? 0 : Uniform(1, 4);
    Shape shape(static_cast<size_t>(rank));
    for (int64_t& d : shape) d = Chance(0.02) ? 0 : Uniform(1, rank <= 2 ? 9 : 6);
    return shape;
  }

  // Random sizes >= 0 summing to n.
  std::vector<int64_t> Composition(int64_t n, int64_t parts) {
    std::vector<int64_t> cuts = {0, n};
    for (int64_t p = 1; p < parts; ++p) cuts.push_back(Uniform(0, n));
    std::sort(cuts.begin(), cuts.end());
    std::vector<int64_t> sizes;
    for (size_t i = 1; i < cuts.size(); ++i) sizes.push_back(cuts[i] - cuts[i - 1]);
    return sizes;
  }

  // A layout whose ranks together hold every element exactly once.
  Layout RandomLayout(const Shape& shape, int32_t replica, std::string* kind) {
    Layout layout;
    const int rank = static_cast<int>(shape.size());
    int choice = static_cast<int>(Uniform(0, 6));
    if (rank == 0 && choice != 3 && choice != 5) choice = 0;
    const int dim = rank > 0 ? static_cast<int>(Uniform(0, rank - 1)) : 0;
    switch (choice) {
      case 0:
        *kind = "whole";
        layout.push_back(WholeTensor(shape));
        break;
      case 1: {
        *kind = "split";
        const std::vector<int64_t> sizes = Composition(shape[static_cast<size_t>(dim)], Uniform(1, 4));
        for (size_t i = 0; i < sizes.size(); ++i) layout.push_back(Must(SplitAlongDim(shape, dim, sizes, static_cast<int>(i))));
        break;
      }
      case 2: {
        *kind = "even";
        const int parts = static_cast<int>(Uniform(1, 5));
        for (int i = 0; i < parts; ++i) layout.push_back(Must(SplitEvenly(shape, dim, parts, i)));
        break;
      }
      case 3:
        *kind = "zero";
        layout = ZeroLayout(shape);
        break;
      case 4:
        *kind = "boxes";
        layout = BoxTreeLayout(shape);
        break;
      case 5:
        *kind = "flatcuts";
        layout = FlatCutLayout(shape);
        break;
      default: {
        *kind = "fused";
        const std::vector<int64_t> subs = Composition(shape[static_cast<size_t>(dim)], Uniform(1, 3));
        const int parts = static_cast<int>(Uniform(1, 4));
        for (int i = 0; i < parts; ++i) layout.push_back(Must(FusedSubParamSplit(shape, dim, subs, parts, i)));
        break;
      }
    }
    for (ShardSpec& s : layout) {
      for (Fragment& f : s.fragments) f.replica_id = replica;
      EXPECT_TRUE(s.Validate().ok()) << *kind << ": " << s.Validate().ToString();
    }
    return layout;
  }

 private:
  // The tensor inside a ZeRO group of random neighbours; each rank's buffer is its whole partition.
  Layout ZeroLayout(const Shape& shape) {
    std::vector<Shape> group;
    const int64_t params = Uniform(1, 3);
    const size_t self = static_cast<size_t>(Uniform(0, params - 1));
    for (int64_t p = 0; p < params; ++p) {
      if (static_cast<size_t>(p) == self) {
        group.push_back(shape);
      } else {
        Shape other(static_cast<size_t>(Uniform(1, 2)));
        for (int64_t& d : other) d = Uniform(1, 5);
        group.push_back(other);
      }
    }
    const int dp = static_cast<int>(Uniform(1, 5));
    const int64_t alignment = Uniform(1, 4);
    const int64_t partition = ZeroPartitionSize(group, dp, alignment);
    Layout layout;
    for (int r = 0; r < dp; ++r) {
      Result<std::vector<FlatPartitionEntry>> entries = ZeroFlatPartition(group, dp, r, alignment);
      EXPECT_TRUE(entries.ok());
      FlatPartitionEntry e = (*entries)[self];
      for (Fragment& f : e.spec.fragments) f.local_offset += e.partition_offset;
      e.spec.local_numel = partition;
      layout.push_back(std::move(e.spec));
    }
    return layout;
  }

  void SplitBox(const Box& box, int depth, std::vector<Box>* leaves) {
    if (depth == 0 || box.numel() == 0 || Chance(0.3)) {
      leaves->push_back(box);
      return;
    }
    const size_t dim = static_cast<size_t>(Uniform(0, static_cast<int64_t>(box.offsets.size()) - 1));
    int64_t offset = box.offsets[dim];
    for (int64_t size : Composition(box.lengths[dim], Uniform(2, 3))) {
      Box child = box;
      child.offsets[dim] = offset;
      child.lengths[dim] = size;
      offset += size;
      SplitBox(child, depth - 1, leaves);
    }
  }

  // Pieces dealt to a few ranks in random order, with random gaps and trailing padding.
  Layout Deal(const Shape& shape, std::vector<Fragment> pieces) {
    const int64_t ranks = Uniform(1, 4);
    std::vector<std::vector<Fragment>> per_rank(static_cast<size_t>(ranks));
    for (Fragment& f : pieces) per_rank[static_cast<size_t>(Uniform(0, ranks - 1))].push_back(std::move(f));
    Layout layout;
    for (auto& frags : per_rank) {
      std::shuffle(frags.begin(), frags.end(), rng_);
      ShardSpec spec;
      spec.global_shape = shape;
      int64_t local = Chance(0.3) ? Uniform(1, 3) : 0;
      for (Fragment& f : frags) {
        f.local_offset = local;
        local += f.numel() + (Chance(0.2) ? Uniform(1, 2) : 0);
      }
      spec.fragments = std::move(frags);
      spec.local_numel = local + (Chance(0.3) ? Uniform(1, 3) : 0);
      layout.push_back(std::move(spec));
    }
    return layout;
  }

  Layout BoxTreeLayout(const Shape& shape) {
    std::vector<Box> leaves;
    SplitBox(WholeTensor(shape).fragments[0].box, static_cast<int>(Uniform(1, 3)), &leaves);
    std::vector<Fragment> pieces;
    for (Box& b : leaves) {
      Fragment f;
      f.box = std::move(b);
      pieces.push_back(std::move(f));
    }
    return Deal(shape, std::move(pieces));
  }

  // [0, numel) cut at random points; each piece a flat fragment or the boxes of its range.
  Layout FlatCutLayout(const Shape& shape) {
    const int64_t numel = NumElements(shape);
    std::vector<Fragment> pieces;
    int64_t begin = 0;
    for (int64_t size : Composition(numel, Uniform(1, 6))) {
      if (Chance(0.5)) {
        Fragment f;
        f.kind = Fragment::Kind::kFlat;
        f.flat_begin = begin;
        f.flat_length = size;
        pieces.push_back(f);
      } else {
        for (Box& b : FlatRangeToBoxes(shape, begin, size)) {
          Fragment f;
          f.box = std::move(b);
          pieces.push_back(std::move(f));
        }
      }
      begin += size;
    }
    return Deal(shape, std::move(pieces));
  }

  std::mt19937_64 rng_;
};

TEST(ReshardTest, RandomLayoutsMatchReference) {
  int plans = 0, incomplete = 0, replicated = 0;
  for (uint64_t seed = 1; seed <= 6000; ++seed) {
    LayoutGen gen(seed);
    const Shape shape = gen.RandomShape();
    Layout sources;
    std::string what = "seed " + std::to_string(seed) + " shape " + ShapeString(shape) + " sources";
    const int64_t layouts = gen.Uniform(1, 3);
    for (int32_t replica = 0; replica < layouts; ++replica) {
      std::string kind;
      for (ShardSpec& s : gen.RandomLayout(shape, replica, &kind)) sources.push_back(std::move(s));
      what += " " + kind;
    }
    if (gen.Chance(0.5)) std::shuffle(sources.begin(), sources.end(), gen.rng());
    if (gen.Chance(0.3)) {  // lose some ranks
      Layout kept;
      for (ShardSpec& s : sources) {
        if (!gen.Chance(0.4)) kept.push_back(std::move(s));
      }
      sources = std::move(kept);
      what += " (some lost)";
    }
    std::string kind;
    const Layout targets = gen.RandomLayout(shape, 0, &kind);
    what += " target " + kind;
    for (const ShardSpec& target : targets) {
      const ReshardPlan plan = CheckAgainstReference(target, sources, what);
      if (::testing::Test::HasFailure()) return;
      ++plans;
      if (!plan.complete()) ++incomplete;
      if (layouts > 1) ++replicated;
    }
  }
  EXPECT_GT(plans, 12000);
  EXPECT_GT(incomplete, 700);
  EXPECT_GT(replicated, 6000);
}

// ---- round trips through the usual helpers ---------------------------------------------

// torch.tensor_split sizes, written out independently of the library.
std::vector<int64_t> TorchSplitSizes(int64_t n, int parts) {
  std::vector<int64_t> sizes;
  for (int p = 0; p < parts; ++p) sizes.push_back(n / parts + (p < n % parts ? 1 : 0));
  return sizes;
}

// What rank `index` of a fused dim-0 split really holds: its rows of each sub-tensor, in order.
std::vector<int64_t> FusedRankBuffer(const std::vector<int64_t>& full, int64_t hidden,
                                     const std::vector<int64_t>& subs, int parts, int index) {
  std::vector<int64_t> out;
  int64_t sub_begin = 0;
  for (int64_t sub : subs) {
    const std::vector<int64_t> sizes = TorchSplitSizes(sub, parts);
    int64_t row = sub_begin;
    for (int p = 0; p < index; ++p) row += sizes[static_cast<size_t>(p)];
    for (int64_t r = row; r < row + sizes[static_cast<size_t>(index)]; ++r) {
      out.insert(out.end(), full.begin() + r * hidden, full.begin() + (r + 1) * hidden);
    }
    sub_begin += sub;
  }
  return out;
}

TEST(ReshardTest, FusedQkvRoundTrip) {
  // GQA QKV: 8 query heads, 2 key/value heads of head_dim 3 -> rows 24 | 6 | 6, hidden 5.
  const std::vector<int64_t> subs = {24, 6, 6};
  const int64_t hidden = 5;
  const Shape shape = {36, hidden};
  std::vector<int64_t> full(36 * hidden);
  for (size_t i = 0; i < full.size(); ++i) full[i] = static_cast<int64_t>(i) * 7 + 1;

  for (int from : {1, 2, 3, 4}) {
    Layout sources;
    std::vector<std::vector<int64_t>> buffers;
    std::vector<const void*> pointers;
    for (int i = 0; i < from; ++i) {
      sources.push_back(Must(FusedSubParamSplit(shape, 0, subs, from, i)));
      buffers.push_back(FusedRankBuffer(full, hidden, subs, from, i));
      ASSERT_EQ(static_cast<int64_t>(buffers.back().size()), sources.back().local_numel);
    }
    for (const auto& b : buffers) pointers.push_back(b.data());
    // Gather into the whole tensor.
    Result<ReshardPlan> plan = PlanReshard(WholeTensor(shape), Pointers(sources));
    ASSERT_TRUE(plan.ok());
    ASSERT_TRUE(plan->complete());
    std::vector<int64_t> whole(full.size(), -1);
    ExecuteReshard(*plan, sizeof(int64_t), pointers, whole.data());
    EXPECT_EQ(whole, full) << "from " << from;
    // Reshard to every other TP degree.
    for (int to : {1, 2, 3, 4, 6}) {
      for (int j = 0; j < to; ++j) {
        const ShardSpec target = Must(FusedSubParamSplit(shape, 0, subs, to, j));
        plan = PlanReshard(target, Pointers(sources));
        ASSERT_TRUE(plan.ok());
        ASSERT_TRUE(plan->complete());
        std::vector<int64_t> out(static_cast<size_t>(target.local_numel), -1);
        ExecuteReshard(*plan, sizeof(int64_t), pointers, out.data());
        EXPECT_EQ(out, FusedRankBuffer(full, hidden, subs, to, j)) << from << " -> " << to << " rank " << j;
      }
    }
  }
}

TEST(ReshardTest, VocabPaddedRoundTrip) {
  const int64_t vocab = 1000, hidden = 4, multiple = 64;
  std::vector<int64_t> embedding(vocab * hidden);
  for (size_t i = 0; i < embedding.size(); ++i) embedding[i] = static_cast<int64_t>(i) + 100;
  // TP 2 and TP 4 both pad to 1024 rows; padding rows hold zeros.
  Layout sources;
  std::vector<std::vector<int64_t>> buffers;
  std::vector<const void*> pointers;
  for (int i = 0; i < 2; ++i) {
    sources.push_back(Must(VocabPaddedSplit(vocab, hidden, multiple, 2, i)));
    ASSERT_EQ(sources.back().global_shape, (Shape{1024, hidden}));
    std::vector<int64_t> b(512 * hidden, 0);
    for (int64_t r = 0; r < 512; ++r) {
      const int64_t row = i * 512 + r;
      if (row >= vocab) continue;
      std::copy_n(embedding.begin() + row * hidden, hidden, b.begin() + r * hidden);
    }
    buffers.push_back(std::move(b));
  }
  for (const auto& b : buffers) pointers.push_back(b.data());

  ShardSpec whole = WholeTensor({1024, hidden});
  whole.original_shape = {vocab, hidden};
  Result<ReshardPlan> plan = PlanReshard(whole, Pointers(sources));
  ASSERT_TRUE(plan.ok()) << plan.status().ToString();
  ASSERT_TRUE(plan->complete());
  std::vector<int64_t> gathered(1024 * hidden, -1);
  ExecuteReshard(*plan, sizeof(int64_t), pointers, gathered.data());
  EXPECT_TRUE(std::equal(embedding.begin(), embedding.end(), gathered.begin()));
  EXPECT_TRUE(std::all_of(gathered.begin() + vocab * hidden, gathered.end(), [](int64_t v) { return v == 0; }));

  for (int j = 0; j < 4; ++j) {
    const ShardSpec target = Must(VocabPaddedSplit(vocab, hidden, multiple, 4, j));
    plan = PlanReshard(target, Pointers(sources));
    ASSERT_TRUE(plan.ok());
    ASSERT_TRUE(plan->complete());
    std::vector<int64_t> out(static_cast<size_t>(target.local_numel), -1);
    ExecuteReshard(*plan, sizeof(int64_t), pointers, out.data());
    EXPECT_TRUE(std::equal(out.begin(), out.end(), gathered.begin() + j * 256 * hidden)) << "rank " << j;
  }

  // TP 3 pads to a multiple of 192 -> 1152 rows: a different global shape the planner refuses.
  const ShardSpec tp3 = Must(VocabPaddedSplit(vocab, hidden, multiple, 3, 0));
  plan = PlanReshard(tp3, Pointers(sources));
  ASSERT_FALSE(plan.ok());
  EXPECT_EQ(plan.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(plan.status().message(), "source 0 global_shape [1024,4] differs from target global_shape [1152,4]");
}

// ---- scale: a million elements, without per-element work in the planner ------------------

TEST(ReshardTest, MillionElementsTensorParallelWithReplicas) {
  const Shape shape = {1000, 1000};
  // TP 8 along columns, two data-parallel replicas.
  Layout sources;
  for (int32_t replica = 0; replica < 2; ++replica) {
    for (int i = 0; i < 8; ++i) sources.push_back(Must(SplitEvenly(shape, 1, 8, i, replica)));
  }
  std::vector<std::vector<int64_t>> buffers;
  std::vector<const void*> pointers;
  for (size_t k = 0; k < sources.size(); ++k) {
    const Box& b = sources[k].fragments[0].box;
    std::vector<int64_t> buf(static_cast<size_t>(b.numel()));
    for (int64_t r = 0; r < 1000; ++r) {
      for (int64_t c = 0; c < 125; ++c) buf[static_cast<size_t>(r * 125 + c)] = (r * 1000 + b.offsets[1] + c) * 100 + static_cast<int64_t>(k);
    }
    buffers.push_back(std::move(buf));
  }
  for (const auto& b : buffers) pointers.push_back(b.data());
  const ShardSpec target = Must(SplitEvenly(shape, 0, 3, 1));  // rows 334..666
  Result<ReshardPlan> plan = PlanReshard(target, Pointers(sources));
  ASSERT_TRUE(plan.ok());
  ASSERT_TRUE(plan->complete());
  EXPECT_EQ(plan->runs.size(), 333u * 8u);  // one run per row per column block, replicas unused
  std::vector<int64_t> out(static_cast<size_t>(target.local_numel), -1);
  ExecuteReshard(*plan, sizeof(int64_t), pointers, out.data());
  for (int64_t r = 0; r < 333; ++r) {
    for (int64_t c = 0; c < 1000; ++c) {
      const int64_t want = ((334 + r) * 1000 + c) * 100 + c / 125;
      ASSERT_EQ(out[static_cast<size_t>(r * 1000 + c)], want) << r << "," << c;
    }
  }
}

TEST(ReshardTest, MillionElementsWorstCaseRuns) {
  // 1000 column-wide sources gathered into the whole tensor: a million one-element runs.
  const Shape shape = {1000, 1000};
  Layout sources;
  for (int i = 0; i < 1000; ++i) sources.push_back(Must(SplitEvenly(shape, 1, 1000, i)));
  Result<ReshardPlan> plan = PlanReshard(WholeTensor(shape), Pointers(sources));
  ASSERT_TRUE(plan.ok());
  ASSERT_TRUE(plan->complete());
  ASSERT_EQ(plan->runs.size(), 1000000u);
  EXPECT_EQ(plan->runs[1001], (CopyRun{1, 1, 1001, 1}));

  // A ZeRO group (dp 8, alignment 16) holding the tensor after a 12345-element neighbour, into TP 4 rows.
  const std::vector<Shape> group = {{12345}, shape};
  const int64_t partition = ZeroPartitionSize(group, 8, 16);
  Layout zero;
  std::vector<std::vector<int64_t>> buffers;
  std::vector<const void*> pointers;
  for (int r = 0; r < 8; ++r) {
    Result<std::vector<FlatPartitionEntry>> e = ZeroFlatPartition(group, 8, r, 16);
    ASSERT_TRUE(e.ok());
    ShardSpec spec = (*e)[1].spec;
    for (Fragment& f : spec.fragments) f.local_offset += (*e)[1].partition_offset;
    spec.local_numel = partition;
    std::vector<int64_t> buf(static_cast<size_t>(partition), -5);
    for (const Fragment& f : spec.fragments) {
      for (int64_t i = 0; i < f.flat_length; ++i) buf[static_cast<size_t>(f.local_offset + i)] = f.flat_begin + i;
    }
    zero.push_back(std::move(spec));
    buffers.push_back(std::move(buf));
  }
  for (const auto& b : buffers) pointers.push_back(b.data());
  for (int j = 0; j < 4; ++j) {
    const ShardSpec target = Must(SplitEvenly(shape, 1, 4, j));
    plan = PlanReshard(target, Pointers(zero));
    ASSERT_TRUE(plan.ok());
    ASSERT_TRUE(plan->complete());
    EXPECT_LE(plan->runs.size(), 1000u + 8u);
    std::vector<int64_t> out(static_cast<size_t>(target.local_numel), -1);
    ExecuteReshard(*plan, sizeof(int64_t), pointers, out.data());
    for (int64_t r = 0; r < 1000; ++r) {
      for (int64_t c = 0; c < 250; ++c) {
        ASSERT_EQ(out[static_cast<size_t>(r * 250 + c)], r * 1000 + j * 250 + c) << j << ": " << r << "," << c;
      }
    }
  }
}

}  // namespace
}  // namespace memento
