// memento diff of committed native checkpoints (converters/diff.h): each tensor consolidated from
// every rank's shards (TP boxes, ZeRO flat partitions, vocab padding cut) and compared with its
// universal form, with another native checkpoint and refused when the metadata is partial; the CLI's
// output and exit codes.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "converters/diff.h"
#include "core/dtype.h"
#include "core/file_system.h"
#include "core/shard.h"
#include "proto/shard_convert.h"
#include "ucp_format/native_checkpoint.h"
#include "ucp_format/universal.h"

#include "tests/converters/test_util.h"

namespace memento {
namespace {

using test::Quote;
using test::TestRoot;

// A tensor of a tp 2 job: each rank's spec and the global (padded) values.
struct Tensor {
  std::string name;
  ShardSpec spec[2];
  std::vector<float> global;
};

// Rank r's local buffer of `t`: every fragment's elements from the global values.
std::vector<float> Local(const Tensor& t, int r) {
  const ShardSpec& s = t.spec[r];
  std::vector<float> local(static_cast<size_t>(s.local_numel), 0.0f);
  for (const Fragment& f : s.fragments) {
    if (f.kind == Fragment::Kind::kFlat) {
      for (int64_t k = 0; k < f.flat_length; ++k) local[static_cast<size_t>(f.local_offset + k)] = t.global[static_cast<size_t>(f.flat_begin + k)];
      continue;
    }
    // Box, row-major inside the run (2-d here).
    const int64_t cols = s.global_shape.size() > 1 ? s.global_shape[1] : 1;
    const int64_t rows = f.box.lengths[0], width = f.box.lengths.size() > 1 ? f.box.lengths[1] : 1;
    const int64_t col0 = f.box.offsets.size() > 1 ? f.box.offsets[1] : 0;
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < width; ++j) {
        local[static_cast<size_t>(f.local_offset + i * width + j)] = t.global[static_cast<size_t>((f.box.offsets[0] + i) * cols + col0 + j)];
      }
    }
  }
  return local;
}

// Writes the committed native checkpoint <root>/<job>/step-1 of two ranks holding `tensors`.
std::string WriteNative(const std::string& root, const std::string& job, const std::vector<Tensor>& tensors) {
  const std::string dir = CheckpointDir(root, job, 1);
  std::vector<proto::ManifestRank> entries;
  for (int r = 0; r < 2; ++r) {
    proto::RankRecord rec;
    rec.set_rank(r);
    rec.set_world_size(2);
    std::vector<uint8_t> slot;
    for (const Tensor& t : tensors) {
      proto::TensorRecord* tr = rec.add_tensors();
      tr->set_name(t.name);
      tr->set_dtype(static_cast<int32_t>(DType::kF32));
      ToProto(t.spec[r], tr->mutable_spec());
      tr->set_slot_offset(slot.size());
      const std::vector<float> local = Local(t, r);
      tr->set_bytes(local.size() * 4);
      slot.resize(slot.size() + 4096);
      std::memcpy(slot.data() + tr->slot_offset(), local.data(), local.size() * 4);
    }
    rec.set_slot_bytes(slot.size());
    RankImage image{r, 2, &rec, slot.data()};
    Result<proto::ManifestRank> e = WriteRankFiles(PosixFileSystem(), dir, job, 1, image, PersistOptions{});
    EXPECT_TRUE(e.ok()) << e.status().ToString();
    entries.push_back(*e);
  }
  EXPECT_TRUE(CommitManifest(PosixFileSystem(), dir, BuildManifest(job, 1, 2, entries)).ok());
  return dir;
}

// A vocab-padded embedding (5 rows padded to 8, split on dim 0), a weight split on dim 1 and its
// Adam moment in ZeRO flat partitions.
std::vector<Tensor> Tensors() {
  std::vector<Tensor> ts(3);
  ts[0].name = "embed.w";
  ts[1].name = "w";
  ts[2].name = "w.exp_avg";
  for (int r = 0; r < 2; ++r) {
    ts[0].spec[r] = *VocabPaddedSplit(5, 2, 2, 2, r);
    ts[1].spec[r] = *SplitEvenly({4, 4}, 1, 2, r);
    ts[2].spec[r] = (*ZeroFlatPartition({{4, 4}}, 2, r))[0].spec;
    ts[2].spec[r].local_numel = ZeroPartitionSize({{4, 4}}, 2);
  }
  for (int i = 0; i < 16; ++i) ts[0].global.push_back(i < 10 ? 0.5f * static_cast<float>(i) : 99.0f);  // rows 5..7: padding
  for (int i = 0; i < 16; ++i) ts[1].global.push_back(static_cast<float>(i) - 3.0f);
  for (int i = 0; i < 16; ++i) ts[2].global.push_back(0.25f * static_cast<float>(i));
  return ts;
}

struct Output {
  int exit_code = -1;
  std::string out;
};

Output RunDiff(const std::string& args) {
  Output o;
  FILE* p = ::popen((std::string(MEMENTO_BIN_DIR) + "/memento diff " + args + " 2>&1").c_str(), "r");
  if (p == nullptr) return o;
  char buf[4096];
  size_t n = 0;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) o.out.append(buf, n);
  const int status = ::pclose(p);
  o.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return o;
}

TEST(DiffNativeTest, NativeAgainstUniversalAndNative) {
  FileSystem* fs = PosixFileSystem();
  const std::string root = TestRoot();
  std::vector<Tensor> ts = Tensors();
  const std::string a = WriteNative(root, "a", ts);
  // b: two elements of w differ: -3 -> -3.25 (abs 0.25, rel 0.25 / 3.25) and 8 -> 8.5 (abs 0.5, rel 0.5 / 8.5).
  ts[1].global[0] = -3.25f;
  ts[1].global[11] = 8.5f;
  const std::string b = WriteNative(root, "b", ts);
  const std::string ucp = root + "/ucp";
  ASSERT_TRUE(ConvertNativeToUniversal(fs, a, ucp).ok());

  // Native against its universal form: the same names, logical shapes and values.
  Result<DiffReport> r = DiffCheckpoints(fs, a, ucp);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->differing, 0);
  ASSERT_EQ(r->tensors.size(), 3u);
  EXPECT_EQ(r->tensors[0].name, "embed.w");
  EXPECT_EQ(r->tensors[0].shape_a, (std::vector<int64_t>{5, 2}));
  EXPECT_EQ(r->tensors[0].shape_b, (std::vector<int64_t>{5, 2}));
  EXPECT_EQ(r->tensors[1].name, "w");
  EXPECT_EQ(r->tensors[2].name, "w.exp_avg");
  for (const TensorDiff& d : r->tensors) {
    EXPECT_EQ(d.what, "equal") << d.name;
    EXPECT_EQ(d.max_abs, 0.0) << d.name;
  }

  // Native against native.
  r = DiffCheckpoints(fs, a, b);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->differing, 1);
  EXPECT_EQ(r->tensors[0].what, "equal");
  EXPECT_EQ(r->tensors[1].what, "differs");
  EXPECT_EQ(r->tensors[1].max_abs, 0.5);
  EXPECT_EQ(r->tensors[1].max_rel, 0.25 / 3.25);
  EXPECT_EQ(r->tensors[2].what, "equal");
  r = DiffCheckpoints(fs, a, b, DiffOptions{.atol = 0.5});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->differing, 0);
  EXPECT_EQ(r->tensors[1].what, "equal");

  // The CLI: exit 0 when nothing differs, 1 when something does.
  Output o = RunDiff(Quote(a) + " " + Quote(ucp));
  EXPECT_EQ(o.exit_code, 0) << o.out;
  EXPECT_EQ(o.out,
            "TENSOR     SHAPE  MAX_ABS  MAX_REL  RESULT\n"
            "embed.w    [5,2]  0        0        equal\n"
            "w          [4,4]  0        0        equal\n"
            "w.exp_avg  [4,4]  0        0        equal\n"
            "0 of 3 tensors differ\n");
  o = RunDiff(Quote(a) + " " + Quote(b));
  EXPECT_EQ(o.exit_code, 1) << o.out;
  EXPECT_EQ(o.out,
            "TENSOR     SHAPE  MAX_ABS  MAX_REL  RESULT\n"
            "embed.w    [5,2]  0        0        equal\n"
            "w          [4,4]  0.5      0.0769   differs\n"
            "w.exp_avg  [4,4]  0        0        equal\n"
            "1 of 3 tensors differ\n");
  // Swapped, |a - b| / |b| takes a's values: 0.25 / 3 and 0.5 / 8; within atol 0.5.
  o = RunDiff("--json --atol 0.5 " + Quote(b) + " " + Quote(a));
  EXPECT_EQ(o.exit_code, 0) << o.out;
  EXPECT_NE(o.out.find("{\"name\":\"w\",\"result\":\"equal\",\"shape\":\"[4,4]\",\"max_abs\":0.500000000,\"max_rel\":0.083333333}"),
            std::string::npos) << o.out;
  EXPECT_NE(o.out.find("\"differing\":0}"), std::string::npos) << o.out;
}

// Ranks that each describe their local tensor as a whole one: partial metadata, refused with the
// path and the tensor named (as `memento convert` without a pattern spec refuses it).
TEST(DiffNativeTest, PartialMetadataIsRefused) {
  const std::string root = TestRoot();
  std::vector<Tensor> ts(1);
  ts[0].name = "b";
  ts[0].spec[0] = ts[0].spec[1] = WholeTensor({4});
  ts[0].global = {1, 2, 3, 4};
  const std::string a = WriteNative(root, "a", ts);
  Result<DiffReport> r = DiffCheckpoints(PosixFileSystem(), a, a);
  EXPECT_EQ(r.status().ToString(), "FailedPrecondition: " + a + " (a native checkpoint): tensor 'b': ranks 0, 1 saved 8 elements of "
                                   "replica 0 for a tensor of 4 [4]: its layout metadata is partial: add a pattern spec rule for it");
  Output o = RunDiff(Quote(a) + " " + Quote(a));
  EXPECT_EQ(o.exit_code, 1);
}

}  // namespace
}  // namespace memento
