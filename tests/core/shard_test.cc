// Tests of the shard model: helpers build the expected specs, Validate names what is wrong, and
// FlatRangeToBoxes covers exactly its range.
#include "core/shard.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace memento {
namespace {

using Shape = std::vector<int64_t>;

Fragment BoxFragment(Shape offsets, Shape lengths, int64_t local_offset, int32_t replica_id = 0) {
  Fragment f;
  f.kind = Fragment::Kind::kBox;
  f.box.offsets = std::move(offsets);
  f.box.lengths = std::move(lengths);
  f.local_offset = local_offset;
  f.replica_id = replica_id;
  return f;
}

Fragment FlatFragment(int64_t begin, int64_t length, int64_t local_offset, int32_t replica_id = 0) {
  Fragment f;
  f.kind = Fragment::Kind::kFlat;
  f.flat_begin = begin;
  f.flat_length = length;
  f.local_offset = local_offset;
  f.replica_id = replica_id;
  return f;
}

ShardSpec Spec(Shape shape, std::vector<Fragment> fragments, int64_t local_numel, Shape original = {}) {
  ShardSpec s;
  s.global_shape = std::move(shape);
  s.fragments = std::move(fragments);
  s.local_numel = local_numel;
  s.original_shape = std::move(original);
  return s;
}

// Expects Validate to fail with InvalidArgument and a message containing `text`.
void ExpectInvalid(const ShardSpec& spec, const std::string& text) {
  const Status st = spec.Validate();
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << spec.DebugString();
  EXPECT_NE(st.message().find(text), std::string::npos) << "message: " << st.message() << "\nwanted: " << text;
}

template <typename T>
void ExpectError(const Result<T>& r, const std::string& text) {
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find(text), std::string::npos)
      << "message: " << r.status().message() << "\nwanted: " << text;
}

TEST(ShardTest, ElementCounts) {
  EXPECT_EQ(NumElements({}), 1);
  EXPECT_EQ(NumElements({3, 4}), 12);
  EXPECT_EQ(NumElements({3, 0, 5}), 0);
  EXPECT_EQ((Box{{1, 2}, {3, 4}}).numel(), 12);
  EXPECT_EQ(Box{}.numel(), 1);
  EXPECT_EQ(BoxFragment({0, 0}, {2, 5}, 0).numel(), 10);
  EXPECT_EQ(FlatFragment(3, 7, 0).numel(), 7);
  EXPECT_EQ(ShapeString({}), "[]");
  EXPECT_EQ(ShapeString({1024, 512}), "[1024,512]");
}

TEST(ShardTest, WholeTensor) {
  EXPECT_EQ(WholeTensor({3, 4}), Spec({3, 4}, {BoxFragment({0, 0}, {3, 4}, 0)}, 12));
  EXPECT_EQ(WholeTensor({5}, 2), Spec({5}, {BoxFragment({0}, {5}, 0, 2)}, 5));
  EXPECT_EQ(WholeTensor({}), Spec({}, {BoxFragment({}, {}, 0)}, 1));
  EXPECT_TRUE(WholeTensor({}).Validate().ok());
  EXPECT_TRUE(WholeTensor({0, 3}).Validate().ok());
}

TEST(ShardTest, SplitAlongDimUneven) {
  Result<ShardSpec> r = SplitAlongDim({10, 6}, 0, {3, 0, 7}, 2, 1);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r, Spec({10, 6}, {BoxFragment({3, 0}, {7, 6}, 0, 1)}, 42));
  r = SplitAlongDim({10, 6}, 0, {3, 0, 7}, 1);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, Spec({10, 6}, {BoxFragment({3, 0}, {0, 6}, 0)}, 0));
  EXPECT_TRUE(r->Validate().ok());
  r = SplitAlongDim({10, 6}, 1, {1, 5}, 1);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, Spec({10, 6}, {BoxFragment({0, 1}, {10, 5}, 0)}, 50));

  ExpectError(SplitAlongDim({10, 6}, 0, {3, 3}, 0), "part sizes sum to 6 but shape [10,6] dim 0 is 10");
  ExpectError(SplitAlongDim({10, 6}, 2, {10}, 0), "dim 2 is outside the rank 2 of shape [10,6]");
  ExpectError(SplitAlongDim({10, 6}, -1, {6}, 0), "dim -1 is outside the rank 2");
  ExpectError(SplitAlongDim({10, 6}, 0, {3, 7}, 2), "index 2 is outside [0,2)");
  ExpectError(SplitAlongDim({10, 6}, 0, {-1, 11}, 0), "part 0 size -1 is invalid");
  ExpectError(SplitAlongDim({10, 6}, 0, {}, 0), "parts 0 must be at least 1");
  ExpectError(SplitAlongDim({10, -6}, 0, {10}, 0), "shape [10,-6] has negative dim 1");
}

TEST(ShardTest, SplitEvenlyFollowsTensorSplit) {
  // torch.tensor_split(10 rows, 4) -> 3, 3, 2, 2.
  const Shape offsets = {0, 3, 6, 8};
  const Shape sizes = {3, 3, 2, 2};
  for (int i = 0; i < 4; ++i) {
    Result<ShardSpec> r = SplitEvenly({10, 3}, 0, 4, i);
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(*r, Spec({10, 3}, {BoxFragment({offsets[i], 0}, {sizes[i], 3}, 0)}, sizes[i] * 3));
  }
  // More parts than rows: 1, 1, 0.
  Result<ShardSpec> r = SplitEvenly({2}, 0, 3, 2);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, Spec({2}, {BoxFragment({2}, {0}, 0)}, 0));
  r = SplitEvenly({4, 7}, 1, 2, 1, 3);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, Spec({4, 7}, {BoxFragment({0, 4}, {4, 3}, 0, 3)}, 12));

  ExpectError(SplitEvenly({10, 3}, 0, 0, 0), "parts 0 must be at least 1");
  ExpectError(SplitEvenly({10, 3}, 0, 4, 4), "index 4 is outside [0,4)");
  ExpectError(SplitEvenly({10, 3}, 0, 4, -1), "index -1 is outside [0,4)");
  ExpectError(SplitEvenly({}, 0, 1, 0), "dim 0 is outside the rank 0 of shape []");
}

TEST(ShardTest, FusedSubParamSplitQkv) {
  // GQA: q 8 rows, k 2, v 2, hidden 4, two TP ranks; rank 1 holds q[4:8], k[1:2], v[1:2].
  Result<ShardSpec> r = FusedSubParamSplit({12, 4}, 0, {8, 2, 2}, 2, 1);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r, Spec({12, 4},
                     {BoxFragment({4, 0}, {4, 4}, 0), BoxFragment({9, 0}, {1, 4}, 16),
                      BoxFragment({11, 0}, {1, 4}, 20)},
                     24));
  EXPECT_TRUE(r->Validate().ok());

  // A sub-tensor smaller than the part count leaves an empty slice on the last ranks.
  r = FusedSubParamSplit({7, 2}, 0, {5, 1, 1}, 2, 1, 1);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, Spec({7, 2},
                     {BoxFragment({3, 0}, {2, 2}, 0, 1), BoxFragment({6, 0}, {0, 2}, 4, 1),
                      BoxFragment({7, 0}, {0, 2}, 4, 1)},
                     4));
  EXPECT_TRUE(r->Validate().ok());

  // Along dim 1 (gate|up columns): each local run holds its box row-major.
  r = FusedSubParamSplit({2, 6}, 1, {4, 2}, 2, 0);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, Spec({2, 6}, {BoxFragment({0, 0}, {2, 2}, 0), BoxFragment({0, 4}, {2, 1}, 4)}, 6));

  ExpectError(FusedSubParamSplit({12, 4}, 0, {8, 2, 1}, 2, 0), "sub-tensor sizes sum to 11 but shape [12,4] dim 0 is 12");
  ExpectError(FusedSubParamSplit({12, 4}, 0, {14, -2}, 2, 0), "sub-tensor 1 size -2 is invalid");
  ExpectError(FusedSubParamSplit({12, 4}, 0, {8, 2, 2}, 2, 2), "index 2 is outside [0,2)");
  ExpectError(FusedSubParamSplit({12, 4}, 3, {8, 2, 2}, 2, 0), "dim 3 is outside the rank 2");
}

TEST(ShardTest, ZeroFlatPartition) {
  // 12 + 5 + 4 = 21 elements, padded to a multiple of 2 * 4 = 24: 6 per rank.
  const std::vector<Shape> shapes = {{3, 4}, {5}, {2, 2}};
  EXPECT_EQ(ZeroPartitionSize(shapes, 4, 2), 6);
  EXPECT_EQ(ZeroPartitionSize(shapes, 4), 6);   // 21 -> 24
  EXPECT_EQ(ZeroPartitionSize(shapes, 2), 11);  // 21 -> 22
  EXPECT_EQ(ZeroPartitionSize(shapes, 0), -1);
  EXPECT_EQ(ZeroPartitionSize(shapes, 2, 0), -1);
  EXPECT_EQ(ZeroPartitionSize({}, 3), 0);

  auto entry = [](ShardSpec spec, int64_t offset) {
    FlatPartitionEntry e;
    e.spec = std::move(spec);
    e.partition_offset = offset;
    return e;
  };
  const std::vector<std::vector<FlatPartitionEntry>> want = {
      {entry(Spec({3, 4}, {FlatFragment(0, 6, 0)}, 6), 0), entry(Spec({5}, {}, 0), 6),
       entry(Spec({2, 2}, {}, 0), 6)},
      {entry(Spec({3, 4}, {FlatFragment(6, 6, 0)}, 6), 0), entry(Spec({5}, {}, 0), 6),
       entry(Spec({2, 2}, {}, 0), 6)},
      {entry(Spec({3, 4}, {}, 0), 0), entry(Spec({5}, {FlatFragment(0, 5, 0)}, 5), 0),
       entry(Spec({2, 2}, {FlatFragment(0, 1, 0)}, 1), 5)},
      {entry(Spec({3, 4}, {}, 0), 0), entry(Spec({5}, {}, 0), 0),
       entry(Spec({2, 2}, {FlatFragment(1, 3, 0)}, 3), 0)},
  };
  for (int r = 0; r < 4; ++r) {
    Result<std::vector<FlatPartitionEntry>> got = ZeroFlatPartition(shapes, 4, r, 2);
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    ASSERT_EQ(got->size(), 3u);
    for (size_t p = 0; p < 3; ++p) {
      EXPECT_EQ((*got)[p].spec, want[r][p].spec) << "rank " << r << " param " << p << ": "
                                                 << (*got)[p].spec.DebugString();
      EXPECT_EQ((*got)[p].partition_offset, want[r][p].partition_offset) << "rank " << r << " param " << p;
      EXPECT_TRUE((*got)[p].spec.Validate().ok());
    }
  }

  ExpectError(ZeroFlatPartition(shapes, 0, 0), "dp 0 must be at least 1");
  ExpectError(ZeroFlatPartition(shapes, 4, 4), "dp_index 4 is outside [0,4)");
  ExpectError(ZeroFlatPartition(shapes, 4, 0, 0), "alignment 0 must be at least 1");
  ExpectError(ZeroFlatPartition({{3}, {-1}}, 2, 0), "parameter 1: shape [-1] has negative dim 0");
}

TEST(ShardTest, VocabPaddedSplit) {
  // GPT-2: 50257 rows padded to a multiple of 128 * 4 = 512 -> 50688, 12672 rows per rank.
  Result<ShardSpec> r = VocabPaddedSplit(50257, 8, 128, 4, 3, 1);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r, Spec({50688, 8}, {BoxFragment({38016, 0}, {12672, 8}, 0, 1)}, 12672 * 8, {50257, 8}));
  EXPECT_TRUE(r->Validate().ok());
  EXPECT_EQ(r->DebugString(), "[50688,8] orig[50257,8] box(38016:50688,0:8)@0/r1");

  r = VocabPaddedSplit(1024, 2, 64, 2, 0);  // already a multiple: no padding
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, Spec({1024, 2}, {BoxFragment({0, 0}, {512, 2}, 0)}, 1024, {1024, 2}));

  ExpectError(VocabPaddedSplit(100, 8, 0, 2, 0), "multiple 0 must be at least 1");
  ExpectError(VocabPaddedSplit(-1, 8, 8, 2, 0), "vocab -1 and hidden 8 must not be negative");
  ExpectError(VocabPaddedSplit(100, 8, 8, 2, 2), "index 2 is outside [0,2)");
}

TEST(ShardTest, DebugString) {
  Result<ShardSpec> r = SplitEvenly({1024, 512}, 1, 2, 0);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->DebugString(), "[1024,512] box(0:1024,0:256)@0");
  EXPECT_EQ(Spec({4, 6}, {FlatFragment(3, 6, 2, 1)}, 10).DebugString(), "[4,6] flat(3:9)@2/r1 local=10");
  EXPECT_EQ(Spec({12, 4}, {BoxFragment({4, 0}, {4, 4}, 0), BoxFragment({9, 0}, {1, 4}, 16)}, 20).DebugString(),
            "[12,4] box(4:8,0:4)@0 box(9:10,0:4)@16");
  EXPECT_EQ(WholeTensor({}).DebugString(), "[] box()@0");
}

TEST(ShardTest, ValidateShapes) {
  ExpectInvalid(Spec({4, -1}, {}, 0), "global_shape [4,-1] has negative dim 1");
  ExpectInvalid(Spec({int64_t{1} << 40, int64_t{1} << 40}, {}, 0),
                "global_shape [1099511627776,1099511627776] has more elements than int64 can count");
  // Empty, but its row-major strides would overflow (found by fuzz_native_meta: UBSan, shard.cc).
  ExpectInvalid(Spec({0, int64_t{1} << 61, 8}, {}, 0),
                "global_shape [0,2305843009213693952,8] has more elements than int64 can count");
  ExpectInvalid(Spec({4}, {}, -1), "local_numel -1 is negative");
  ExpectInvalid(Spec({8, 4}, {}, 0, {8}), "original_shape [8] and global_shape [8,4] differ in rank");
  ExpectInvalid(Spec({8, 4}, {}, 0, {9, 4}), "original_shape [9,4] has more rows than global_shape [8,4]");
  ExpectInvalid(Spec({8, 4}, {}, 0, {7, 3}), "original_shape [7,3] and global_shape [8,4] differ in dim 1");
  ExpectInvalid(Spec({8, 4}, {}, 0, {-7, 4}), "original_shape [-7,4] has negative dim 0");
  EXPECT_TRUE(Spec({8, 4}, {}, 0, {7, 4}).Validate().ok());
  EXPECT_TRUE(Spec({}, {FlatFragment(0, 1, 0)}, 1).Validate().ok());
  EXPECT_TRUE(Spec({0, 5}, {BoxFragment({0, 2}, {0, 3}, 0)}, 0).Validate().ok());
}

TEST(ShardTest, ValidateFragmentBounds) {
  ExpectInvalid(Spec({4, 4}, {BoxFragment({0}, {4}, 0)}, 4),
                "fragment 0: box has 1 offsets and 1 lengths but global_shape [4,4] has rank 2");
  ExpectInvalid(Spec({4, 4}, {BoxFragment({0, 0}, {4}, 0)}, 4),
                "fragment 0: box has 2 offsets and 1 lengths but global_shape [4,4] has rank 2");
  ExpectInvalid(Spec({4, 4}, {BoxFragment({0, 0}, {1, 4}, 0), BoxFragment({2, 0}, {3, 4}, 4)}, 16),
                "fragment 1: box dim 0 [2,5) lies outside [0,4) of global_shape [4,4]");
  ExpectInvalid(Spec({4, 4}, {BoxFragment({0, -1}, {4, 2}, 0)}, 8), "fragment 0: box dim 1 [-1,1) lies outside [0,4)");
  ExpectInvalid(Spec({4, 4}, {BoxFragment({0, 2}, {4, -1}, 0)}, 8), "fragment 0: box dim 1 [2,1) lies outside [0,4)");
  ExpectInvalid(Spec({4, 4}, {FlatFragment(10, 10, 0)}, 10),
                "fragment 0: flat range [10,20) lies outside [0,16) of global_shape [4,4]");
  ExpectInvalid(Spec({4, 4}, {FlatFragment(-1, 2, 0)}, 10), "fragment 0: flat range [-1,1) lies outside [0,16)");
  ExpectInvalid(Spec({4, 4}, {FlatFragment(0, -2, 0)}, 10), "fragment 0: flat range [0,-2) lies outside [0,16)");
  ExpectInvalid(Spec({4, 4}, {FlatFragment(0, 4, 0), BoxFragment({1, 0}, {2, 4}, 8)}, 12),
                "fragment 1: local run [8,16) exceeds local_numel 12");
  ExpectInvalid(Spec({4, 4}, {FlatFragment(0, 4, -1)}, 12), "fragment 0: local_offset -1 is negative");
  ExpectInvalid(Spec({4, 4}, {FlatFragment(0, 4, 0, -2)}, 12), "fragment 0: replica_id -2 is negative");
  Fragment bad = FlatFragment(0, 4, 0);
  bad.kind = static_cast<Fragment::Kind>(7);
  ExpectInvalid(Spec({4, 4}, {FlatFragment(4, 4, 4), bad}, 12), "fragment 1: kind 7 is neither box (0) nor flat (1)");
}

TEST(ShardTest, ValidateLocalOverlap) {
  ExpectInvalid(Spec({4, 4}, {BoxFragment({0, 0}, {2, 4}, 0), BoxFragment({2, 0}, {2, 4}, 4)}, 12),
                "fragment 1 local run [4,12) overlaps fragment 0 local run [0,8)");
  // Runs 1 and 2 both overlap run 0: the first in local order is named.
  ExpectInvalid(Spec({4, 8},
                     {FlatFragment(0, 20, 0), FlatFragment(20, 2, 5), FlatFragment(24, 4, 10)}, 30),
                "local run [5,7) overlaps fragment 0 local run [0,20)");
  // Zero-length runs overlap nothing.
  EXPECT_TRUE(Spec({4, 4}, {BoxFragment({0, 0}, {4, 4}, 0), FlatFragment(3, 0, 5), BoxFragment({1, 1}, {0, 2}, 7)}, 16)
                  .Validate()
                  .ok());
}

TEST(ShardTest, ValidateGlobalOverlap) {
  // Box/box: rows 1 of both, columns 3..5 -> first shared element 1 * 6 + 3.
  ExpectInvalid(Spec({4, 6}, {BoxFragment({0, 0}, {2, 6}, 0), BoxFragment({1, 3}, {3, 3}, 12)}, 21),
                "fragment 1 overlaps fragment 0 at global element 9");
  // Box/flat: columns 0..2 against flat [4,10): (0,4), (0,5) are outside, (1,0) = 6 is inside.
  ExpectInvalid(Spec({4, 6}, {BoxFragment({0, 0}, {4, 3}, 0), FlatFragment(4, 6, 12)}, 18),
                "fragment 1 overlaps fragment 0 at global element 6");
  ExpectInvalid(Spec({4, 6}, {FlatFragment(4, 6, 0), BoxFragment({0, 0}, {4, 3}, 6)}, 18),
                "fragment 1 overlaps fragment 0 at global element 6");
  // Flat/flat.
  ExpectInvalid(Spec({4, 6}, {FlatFragment(7, 5, 0), FlatFragment(0, 10, 5)}, 15),
                "fragment 1 overlaps fragment 0 at global element 7");
  // The pair with the lowest later index is named: 2 overlaps 0; 1 is disjoint from both.
  ExpectInvalid(Spec({4, 6},
                     {BoxFragment({0, 0}, {2, 2}, 0), BoxFragment({2, 0}, {2, 6}, 4), FlatFragment(1, 2, 16)},
                     18),
                "fragment 2 overlaps fragment 0 at global element 1");
  // Scalars: two fragments of the one element.
  ExpectInvalid(Spec({}, {FlatFragment(0, 1, 0), BoxFragment({}, {}, 1)}, 2),
                "fragment 1 overlaps fragment 0 at global element 0");
  // Boxes that interleave in row-major order but do not meet, and a flat range between them.
  EXPECT_TRUE(Spec({4, 6},
                   {BoxFragment({0, 0}, {4, 2}, 0), BoxFragment({0, 4}, {4, 2}, 8), FlatFragment(2, 2, 16),
                    BoxFragment({1, 2}, {3, 2}, 18)},
                   24)
                  .Validate()
                  .ok());
  // The same region on two replicas is fine across specs, not within one.
  ExpectInvalid(Spec({4}, {BoxFragment({0}, {4}, 0, 0), BoxFragment({0}, {4}, 4, 1)}, 8),
                "fragment 1 overlaps fragment 0 at global element 0");
}

TEST(ShardTest, FlatRangeToBoxesExample) {
  // [7, 47) of a [3,4,5] tensor: the tail of row (0,1), rows (0,2..3), plane 1, row (2,0), head of (2,1).
  const std::vector<Box> want = {
      {{0, 1, 2}, {1, 1, 3}}, {{0, 2, 0}, {1, 2, 5}}, {{1, 0, 0}, {1, 4, 5}},
      {{2, 0, 0}, {1, 1, 5}}, {{2, 1, 0}, {1, 1, 2}},
  };
  EXPECT_EQ(FlatRangeToBoxes({3, 4, 5}, 7, 40), want);
  EXPECT_EQ(FlatRangeToBoxes({3, 4, 5}, 0, 60), std::vector<Box>({{{0, 0, 0}, {3, 4, 5}}}));
  EXPECT_EQ(FlatRangeToBoxes({3, 4, 5}, 20, 0), std::vector<Box>());
  EXPECT_EQ(FlatRangeToBoxes({0, 4}, 0, 0), std::vector<Box>());
  EXPECT_EQ(FlatRangeToBoxes({}, 0, 1), std::vector<Box>({Box{}}));
  EXPECT_EQ(FlatRangeToBoxes({10}, 3, 4), std::vector<Box>({{{3}, {4}}}));
}

// Every range of random shapes: the boxes, walked row-major one after another, are the range.
TEST(ShardTest, FlatRangeToBoxesRandom) {
  std::mt19937_64 rng(20240611);
  int checked = 0;
  for (int iter = 0; iter < 3000; ++iter) {
    const size_t rank = 1 + rng() % 4;
    Shape shape(rank);
    for (auto& d : shape) d = 1 + static_cast<int64_t>(rng() % 6);
    const int64_t numel = NumElements(shape);
    const int64_t begin = static_cast<int64_t>(rng() % static_cast<uint64_t>(numel + 1));
    const int64_t length = static_cast<int64_t>(rng() % static_cast<uint64_t>(numel - begin + 1));
    const std::vector<Box> boxes = FlatRangeToBoxes(shape, begin, length);
    ASSERT_LE(boxes.size(), 2 * rank - 1);
    int64_t next = begin;
    for (const Box& b : boxes) {
      ASSERT_EQ(b.offsets.size(), rank);
      ASSERT_GT(b.numel(), 0);
      std::vector<int64_t> idx(rank, 0);
      for (int64_t e = 0; e < b.numel(); ++e) {
        int64_t g = 0;
        for (size_t d = 0; d < rank; ++d) g = g * shape[d] + b.offsets[d] + idx[d];
        ASSERT_EQ(g, next) << "shape " << ShapeString(shape) << " range " << begin << "+" << length;
        ++next;
        for (size_t d = rank; d-- > 0;) {
          if (++idx[d] < b.lengths[d]) break;
          idx[d] = 0;
        }
      }
    }
    ASSERT_EQ(next, begin + length);
    ++checked;
  }
  EXPECT_EQ(checked, 3000);
}

}  // namespace
}  // namespace memento
